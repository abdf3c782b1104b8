"""The frame the worker backends fill in: named sessions, each a worker in the process's workspace.

A session's workspace is `$LLMOS_HOME/workspaces/<session>`, the directory the kernel gives the
file tools for the process of that pid, so both see the same files. It belongs to the process,
not to the sandbox: closing a session or the sandbox leaves it in place.

A backend subclass sets `name` and `sandboxed` (and `pooled`, to keep warm workers) and says how
to make a worker for a directory: `_worker(workspace)`, a `WorkerSession` subclass. The
frame does the rest: sessions by name, idle sessions stopped, a new session served by a warm
worker of the pool when one fits, the workspace made ready whenever a worker starts in it.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Generic, Self

from llmos.config import Config
from llmos.kernel.devices import ExecResult
from llmos.sandbox.base import Limits, SandboxError, check_session_name, refuse_link
from llmos.sandbox.pool import W, WarmPool


class WorkerSandbox(Generic[W]):
    """Sessions by name for one backend: opened on first use, stopped when idle too long."""

    name: str = "worker"
    sandboxed: bool = True
    pooled: bool = False  # keep config.sandbox.pool_size workers started ahead of their sessions

    def __init__(self, config: Config) -> None:
        self.config = config
        self.root = config.home / "sandbox" / self.name
        self.spares = self.root / "spares"
        self._sessions: dict[str, W] = {}
        size = config.sandbox.pool_size if self.pooled else 0
        self._pool = WarmPool(size, config.sandbox.limits, self.spares, self._worker)

    # -- what a backend says -------------------------------------------------------------------

    def _worker(self, workspace: Path) -> W:
        """A worker (not started) for `workspace`: a session's, or a warm worker's spare directory."""
        raise NotImplementedError

    def _prepare_workspace(self, path: Path) -> None:
        """Hook: e.g. hand the directory to the sandbox uid."""

    # -- sessions ------------------------------------------------------------------------------

    def ready_workspace(self, path: Path) -> Path:
        """`path` made and handed to the sandbox; backends call this as a worker starts in it.

        Done when a worker starts, not on every call: a running worker keeps the directory it
        started in, whatever happens to the name.
        """
        refuse_link(path)  # preparing it would change the owner of whatever it points to
        path.mkdir(parents=True, exist_ok=True)
        self._prepare_workspace(path)
        return path

    def workspace(self, session: str) -> Path:
        """The session's workspace, made and handed to the sandbox."""
        return self.ready_workspace(self.config.workspace(check_session_name(session)))

    async def warm_up(self) -> None:
        """Start the warm pool's workers now, so the first sessions are warm (the kernel's boot
        calls this once); a backend without a pool has nothing to do."""
        await self._pool.warm_up()

    @property
    def warm_pids(self) -> list[int]:
        """Pids of the warm workers waiting for a session."""
        return self._pool.pids

    async def exec(self, session: str, code: str, limits: Limits | None = None) -> ExecResult:
        limits = limits if limits is not None else self.config.sandbox.limits
        worker = self._sessions.get(session)
        if worker is None:
            worker = self._sessions[session] = self._open(session, limits)
        await self._stop_idle()
        return await worker.request(code, limits)

    def _open(self, session: str, limits: Limits) -> W:
        workspace = self.config.workspace(check_session_name(session))
        warm = self._pool.take(limits, workspace)
        return warm if warm is not None else self._worker(workspace)

    async def _stop_idle(self) -> None:
        idle = self.config.sandbox.idle_timeout_s
        now = time.monotonic()
        for worker in list(self._sessions.values()):
            if worker.running and now - worker.last_used > idle:
                # Free the worker but keep the session (and its workspace): the next call starts
                # a fresh interpreter and its result says the variables were lost.
                await worker.close()
                worker.state_lost = True

    @property
    def running_sessions(self) -> list[str]:
        """The sessions whose worker is running now."""
        return [name for name, worker in self._sessions.items() if worker.running]

    def session(self, session: str) -> W:
        """The host side of a session's worker (stats: cold_start_s, starts, calls, pid)."""
        try:
            return self._sessions[session]
        except KeyError:
            raise SandboxError(f"The sandbox has no session {session!r}; run code in it first.") from None

    async def close_session(self, session: str) -> None:
        """Stop the session's worker and everything it started; its workspace stays."""
        worker = self._sessions.pop(check_session_name(session), None)
        if worker is not None:
            await worker.close()

    async def aclose(self) -> None:
        """Stop every worker, warm or in a session; the workspaces stay."""
        await self._pool.close()
        sessions, self._sessions = self._sessions, {}
        await asyncio.gather(*(worker.close() for worker in sessions.values()))

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
