"""The subprocess backend: the worker as a plain child process with rlimits. NOT a sandbox.

Code run here can read what the user can read, open sockets, signal the user's processes and
leave daemons behind. It exists for machines with neither docker nor bubblewrap and is used only
when `sandbox.backend = "subprocess"` is configured; every result says `sandboxed=False` and its
stderr starts with a line saying so.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys

from llmos.sandbox.base import Limits, WorkerSandbox, WorkerSession, worker_args, worker_source

UNSANDBOXED_NOTICE = "[llmos] this code ran UNSANDBOXED (sandbox.backend = subprocess): no isolation"


def host_python() -> str:
    """The interpreter the worker runs on: the system python3 if there is one, else ours."""
    return shutil.which("python3", path="/usr/bin:/bin") or sys.executable


class SubprocessSandbox(WorkerSandbox):
    name = "subprocess"
    sandboxed = False

    def _new_session(self, session: str) -> WorkerSession:
        workspace = self.workspace(session)
        group: dict[str, int] = {}

        async def spawn(limits: Limits) -> asyncio.subprocess.Process:
            proc = await asyncio.create_subprocess_exec(
                host_python(),
                "-I",
                "-c",
                worker_source(),
                *worker_args(str(workspace), limits),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=workspace,
                env={"PATH": "/usr/bin:/bin", "HOME": str(workspace), "LANG": "C.UTF-8"},
                # Its own process group, so a timeout kills the children too (a setsid daemon escapes).
                start_new_session=True,
            )
            group["pgid"] = proc.pid
            return proc

        async def teardown() -> None:
            pgid = group.pop("pgid", None)
            if pgid is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, signal.SIGKILL)

        return WorkerSession(
            spawn,
            teardown,
            backend=self.name,
            sandboxed=False,
            max_calls=self.config.sandbox.max_calls_per_session,
            notice=UNSANDBOXED_NOTICE,
        )
