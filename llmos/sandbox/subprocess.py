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
from pathlib import Path

from llmos.sandbox.base import Limits, worker_args, worker_source
from llmos.sandbox.frame import WorkerSandbox
from llmos.sandbox.session import WorkerSession

UNSANDBOXED_NOTICE = "[llmos] this code ran UNSANDBOXED (sandbox.backend = subprocess): no isolation"


def host_python() -> str:
    """The interpreter the worker runs on: the system python3 if there is one, else ours."""
    return shutil.which("python3", path="/usr/bin:/bin") or sys.executable


class SubprocessWorker(WorkerSession):
    """The worker as a child process in its own process group, so a time-out kills its children
    too (a setsid daemon escapes)."""

    backend = "subprocess"
    sandboxed = False
    notice = UNSANDBOXED_NOTICE

    def __init__(self, sandbox: SubprocessSandbox, workspace: Path) -> None:
        super().__init__(workspace, max_calls=sandbox.config.sandbox.max_calls_per_session)
        self._sandbox = sandbox
        self._pgid: int | None = None

    async def _spawn(self, limits: Limits) -> asyncio.subprocess.Process:
        workspace = self._sandbox.ready_workspace(self.workspace)
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
            start_new_session=True,
        )
        self._pgid = proc.pid
        return proc

    async def _teardown(self) -> None:
        pgid, self._pgid = self._pgid, None
        if pgid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)


class SubprocessSandbox(WorkerSandbox[SubprocessWorker]):
    name = "subprocess"
    sandboxed = False

    def _worker(self, workspace: Path) -> SubprocessWorker:
        return SubprocessWorker(self, workspace)
