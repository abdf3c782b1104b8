"""The scheduler: who gets a device next when several processes want it at once.

A local model computes one request at a time, so LLM syscalls queue for it. Waiters are served
by priority (higher first), then in arrival order, which is what the shell's `/top` shows as waiting.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager


class DeviceQueue:
    def __init__(self, name: str, capacity: int = 1) -> None:
        self.name = name
        self.capacity = capacity
        self.busy = 0
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    @property
    def waiting(self) -> int:
        return sum(1 for *_, future in self._waiters if not future.done())

    @asynccontextmanager
    async def slot(self, priority: int = 0) -> AsyncIterator[None]:
        if self.busy < self.capacity and not self.waiting:
            self.busy += 1
        else:
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            heapq.heappush(self._waiters, (-priority, next(self._order), future))
            try:
                await future  # the releaser hands its slot over: `busy` already counts us
            except asyncio.CancelledError:
                if future.done() and not future.cancelled():
                    self._release()  # we were handed the slot just as we were cancelled
                raise
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        while self._waiters:
            *_, future = heapq.heappop(self._waiters)
            if not future.done():
                future.set_result(None)
                return
        self.busy -= 1


class Scheduler:
    """One queue per device; created on first use."""

    def __init__(self) -> None:
        self.queues: dict[str, DeviceQueue] = {}

    def queue(self, device: str) -> DeviceQueue:
        if device not in self.queues:
            self.queues[device] = DeviceQueue(device)
        return self.queues[device]

    def slot(self, device: str, priority: int = 0) -> AbstractAsyncContextManager[None]:
        return self.queue(device).slot(priority)
