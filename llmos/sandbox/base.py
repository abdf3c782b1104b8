"""What every part of the sandbox device shares: its errors, session names, the worker's command
line, and when a running worker's limits fit a call.

Every backend runs the same worker (worker.py) as a long-lived interpreter per session:
`python3 -I -c <worker_source()> <worker_args(...)>`. The host side of one worker is in session.py,
the disk cap of its workspace in quota.py, workers started ahead in pool.py, and the frame the
backends fill in (sessions by name) in frame.py.
"""

from __future__ import annotations

import re
from pathlib import Path

from llmos.config import SandboxLimits

Limits = SandboxLimits

WORKER_PATH = Path(__file__).with_name("worker.py")
SESSION_CPU_CALLS = 200
_SESSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class SandboxUnavailable(Exception):
    """No sandbox backend can run here; the message says why and what to do."""


class SandboxError(Exception):
    """A caller mistake (e.g. a bad session name); the message says what to do."""


def check_session_name(session: str) -> str:
    if not _SESSION_RE.match(session):
        raise SandboxError(
            f"Bad sandbox session name {session!r}: use 1-64 letters, digits, '.', '_' or '-'."
        )
    return session


def refuse_link(workspace: Path) -> None:
    """A workspace must be a folder: preparing or adopting a link would act on whatever it points to."""
    if workspace.is_symlink():
        raise SandboxError(f"The workspace {workspace} is a symbolic link; remove it, it must be a folder.")


def worker_source() -> str:
    return WORKER_PATH.read_text()


def worker_args(
    workspace: str, limits: Limits, *, uid: int | None = None, nproc: int | None = None
) -> list[str]:
    """Arguments after `python3 -I -c <worker_source()>`; the session-wide hard limits."""
    args = [
        "--workspace",
        workspace,
        # Per-call CPU is the soft limit, moved each call. The hard limit is a session's whole
        # budget (SESSION_CPU_CALLS calls' worth): code that raises its own soft limit still meets
        # the wall-clock timeout, and a long-lived notebook is not killed for its history.
        "--cpu-s",
        str(int(limits.cpu_s * SESSION_CPU_CALLS) + 1),
        "--memory-mb",
        str(limits.memory_mb),
        "--file-size-mb",
        str(limits.file_size_mb),
        "--nproc",
        str(nproc if nproc is not None else limits.pids),
    ]
    if uid is not None:
        args += ["--uid", str(uid), "--gid", str(uid)]
    return args


def limits_fit(running: Limits, wanted: Limits) -> bool:
    """Whether a worker started with `running` limits may serve a call that asks for `wanted`:
    the limits fixed at start must match, and its CPU limit must not be smaller."""
    fixed = (running.memory_mb, running.pids, running.file_size_mb)
    return fixed == (wanted.memory_mb, wanted.pids, wanted.file_size_mb) and wanted.cpu_s <= running.cpu_s
