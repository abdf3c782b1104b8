"""The warm pool: workers started ahead of their sessions, so a new session's first call is warm.

Each warm worker waits in a spare directory of its own under the backend's `spares/`. A session
that needs a worker takes one whose limits fit, and the spare directory is renamed to the session's
workspace (`adopt_spare`): a running worker has its directory mounted (or as its working directory),
and that follows the directory, not its name. The pool refills in the background; closing it stops
every worker still waiting and removes their spare directories.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Generic, TypeVar

from llmos.sandbox.base import Limits, refuse_link
from llmos.sandbox.session import WorkerSession

W = TypeVar("W", bound=WorkerSession)


def adopt_spare(spare: Path, workspace: Path) -> None:
    """Give a warm worker's spare directory the workspace's name, keeping the files already there.

    Every rename stays within $LLMOS_HOME, so on one file system.
    """
    refuse_link(workspace)  # its entries would be moved out of whatever it points to
    if workspace.exists():
        for entry in workspace.iterdir():
            entry.rename(spare / entry.name)
        workspace.rmdir()
    workspace.parent.mkdir(parents=True, exist_ok=True)
    spare.rename(workspace)


class WarmPool(Generic[W]):
    """Up to `size` started workers with `limits`, each in a spare directory under `spares`.

    `new_worker(spare)` makes a (not yet started) worker for a directory: the backend's part.
    """

    def __init__(self, size: int, limits: Limits, spares: Path, new_worker: Callable[[Path], W]) -> None:
        self.size = size
        self.limits = limits
        self.spares = spares
        self._new_worker = new_worker
        self._ready: list[W] = []
        self._starting: set[asyncio.Task[None]] = set()
        self._stopping: set[asyncio.Task[None]] = set()  # dead warm workers being cleaned up
        self._closed = False

    @property
    def pids(self) -> list[int]:
        """Pids of the workers waiting for a session (a worker that died waits for nothing)."""
        return [pid for worker in self._ready if worker.running and (pid := worker.pid) is not None]

    def take(self, limits: Limits, workspace: Path) -> W | None:
        """A started worker that fits `limits`, now working in `workspace`; None if none is ready.

        Either way the pool refills in the background.
        """
        refuse_link(workspace)
        for dead in [worker for worker in self._ready if not worker.running]:
            self._ready.remove(dead)
            self._in_background(self._stopping, self._discard(dead))
        worker = next((worker for worker in self._ready if worker.fits(limits)), None)
        if worker is not None:
            self._ready.remove(worker)
            try:
                adopt_spare(worker.workspace, workspace)
            except BaseException:
                self._in_background(self._stopping, self._discard(worker))
                raise
            worker.workspace = workspace
        self.fill()
        return worker

    def fill(self) -> None:
        """Start workers in the background until `size` are ready or starting."""
        if self._closed:
            return
        for _ in range(self.size - len(self._ready) - len(self._starting)):
            self._in_background(self._starting, self._add())

    async def warm_up(self) -> None:
        """Fill the pool and wait until its workers have started (or failed to: then the first
        session starts its own worker and says what is wrong)."""
        self.fill()
        await asyncio.gather(*self._starting, return_exceptions=True)

    async def close(self) -> None:
        """Stop every waiting worker and remove its spare directory; start no more."""
        self._closed = True
        # Workers being started are waited for, not cancelled: one cut off halfway could leave a
        # container or a cgroup that nothing remembers.
        await asyncio.gather(*self._starting, *self._stopping, return_exceptions=True)
        ready, self._ready = self._ready, []
        await asyncio.gather(*(self._discard(worker) for worker in ready))

    async def _add(self) -> None:
        self.spares.mkdir(parents=True, exist_ok=True)
        worker = self._new_worker(Path(tempfile.mkdtemp(prefix=".warm-", dir=self.spares)))
        try:
            await worker.start(self.limits)
        except BaseException:
            await self._discard(worker)
            raise
        if self._closed:
            await self._discard(worker)
        else:
            self._ready.append(worker)

    async def _discard(self, worker: W) -> None:
        """Stop a worker that no session took, and remove its spare directory."""
        await worker.close()
        if worker.workspace.parent == self.spares:  # never a session's workspace
            shutil.rmtree(worker.workspace, ignore_errors=True)

    @staticmethod
    def _in_background(tasks: set[asyncio.Task[None]], work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        tasks.add(task)
        task.add_done_callback(_forget(tasks))


def _forget(tasks: set[asyncio.Task[None]]) -> Callable[[asyncio.Task[None]], None]:
    def done(task: asyncio.Task[None]) -> None:
        tasks.discard(task)
        if not task.cancelled():
            # In the background a failure only means one warm worker fewer; the session that
            # starts its own worker instead reports what is wrong.
            task.exception()

    return done
