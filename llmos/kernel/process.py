"""Processes: what the kernel knows about each agent run, and the handle a program holds."""

from __future__ import annotations

import asyncio
import fnmatch
import time
from collections.abc import Awaitable, Callable, Collection
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

from llmos.config import Budget as Budget  # re-exported: part of the process model

if TYPE_CHECKING:
    from llmos.kernel.kernel import Kernel
    from llmos.kernel.syscalls import Reply


class State(StrEnum):
    READY = "ready"
    RUNNING = "running"
    WAITING = "waiting"  # inside a syscall that waits on a device or another process
    BLOCKED = "blocked-on-approval"
    INTERRUPTED = "interrupted"  # its host died while it ran: `kernel.resume(pid)` continues it
    DONE = "done"
    FAILED = "failed"
    KILLED = "killed"

    @property
    def finished(self) -> bool:
        return self in (State.DONE, State.FAILED, State.KILLED)


class Usage(BaseModel):
    """What a process has consumed so far. Every field but wall time is summed from the journal."""

    tokens: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reused_prompt_tokens: int = 0
    tool_calls: int = 0
    sandbox_cpu_s: float = 0.0
    syscalls: int = 0
    wall_time_s: float = 0.0

    def add(self, charge: Charge) -> None:
        self.tokens += charge.prompt_tokens + charge.completion_tokens
        self.prompt_tokens += charge.prompt_tokens
        self.completion_tokens += charge.completion_tokens
        self.reused_prompt_tokens += charge.reused_prompt_tokens
        self.tool_calls += charge.tool_calls
        self.sandbox_cpu_s += charge.sandbox_cpu_s
        self.syscalls += 1

    def add_usage(self, other: Usage) -> None:
        """Add what another process consumed (wall time excepted: processes run side by side)."""
        self.tokens += other.tokens
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.reused_prompt_tokens += other.reused_prompt_tokens
        self.tool_calls += other.tool_calls
        self.sandbox_cpu_s += other.sandbox_cpu_s
        self.syscalls += other.syscalls


class Charge(BaseModel):
    """What one syscall cost; journaled with its result, so accounting is derived from the journal."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    reused_prompt_tokens: int = 0
    tool_calls: int = 0
    sandbox_cpu_s: float = 0.0
    backend: str | None = None


def exhausted(budget: Budget, usage: Usage, fields: Collection[str]) -> str | None:
    """The first of the budget's `fields` that is used up, as a phrase for an error message, or None."""
    if "tokens" in fields and budget.tokens is not None and usage.tokens >= budget.tokens:
        return f"token budget of {budget.tokens} used up ({usage.tokens} used)"
    if "tool_calls" in fields and budget.tool_calls is not None and usage.tool_calls >= budget.tool_calls:
        return f"tool-call budget of {budget.tool_calls} used up"
    cpu = budget.sandbox_cpu_s
    if "sandbox_cpu_s" in fields and cpu is not None and usage.sandbox_cpu_s >= cpu:
        return f"sandbox CPU budget of {cpu:g}s used up"
    wall = budget.wall_time_s
    if "wall_time_s" in fields and wall is not None and usage.wall_time_s >= wall:
        return f"wall-time budget of {wall:g}s used up"
    return None


class ProcessInfo(BaseModel):
    """A row of the process table, as `ps` shows it and the journal stores it."""

    pid: int
    ppid: int | None = None
    name: str
    program: str | None = Field(None, description="'module:function' to run again on resume")
    args: dict[str, Any] = Field(default_factory=dict)
    state: State = State.READY
    capabilities: list[str] = Field(default_factory=list)
    budget: Budget = Field(default_factory=Budget)
    usage: Usage = Field(default_factory=Usage)
    priority: int = 0
    created_at: float = Field(default_factory=time.time)
    ended_at: float | None = None
    result: Any = None
    error: str | None = None

    def allows(self, capability: str) -> bool:
        return any(fnmatch.fnmatchcase(capability, pattern) for pattern in self.capabilities)


Program = Callable[..., Awaitable[Any]]


class Process:
    """The live side of a process: what its program holds to make syscalls.

    A program is `async def main(proc: Process, **args) -> result`. It acts on the world
    only through `await proc.syscall(name, **args)`, which is what makes it checkable,
    chargeable and resumable.
    """

    def __init__(self, kernel: Kernel, info: ProcessInfo, replay: dict[int, dict[str, Any]]) -> None:
        self.kernel = kernel
        self.info = info
        self.task: asyncio.Task[Any] | None = None
        self.finished = asyncio.Event()
        # Why the task was cancelled: (state, error). None means the kernel shut down under it.
        self.stop_reason: tuple[State, str] | None = None
        self.started = time.monotonic()
        self.wall_time_before = info.usage.wall_time_s  # from earlier runs, before a resume
        # What this process and all its descendants consumed: what its budget is checked against.
        self.tree_usage = info.usage.model_copy()
        self._next_seq = 0
        self.tainted = False  # a tool returned untrusted content since a person last approved
        self._replay = replay  # journaled results by syscall number: returned, not re-executed
        self.listeners: list[Callable[[str, dict[str, Any]], None]] = []

    @property
    def pid(self) -> int:
        return self.info.pid

    def next_seq(self) -> int:
        self._next_seq += 1
        return self._next_seq

    @property
    def last_seq(self) -> int:
        return self._next_seq

    def replayed(self, seq: int) -> dict[str, Any] | None:
        return self._replay.pop(seq, None)

    def wall_time(self) -> float:
        return self.wall_time_before + (time.monotonic() - self.started)

    async def syscall(self, call: str, /, **args: Any) -> Reply:
        return await self.kernel.dispatch(self, call, args)

    def emit(self, kind: str, data: dict[str, Any]) -> None:
        """Tell whoever watches this process (CLI, shell, an embedding app) what just happened."""
        for listener in [*self.listeners, *self.kernel.listeners]:
            listener(kind, {"pid": self.pid, **data})


def budget_owner(proc: Process, holder: Process) -> str:
    """Names the budget's process when it is an ancestor's, to end a refusal with."""
    if holder is proc:
        return ""
    return f"; it is the budget of process {holder.pid} ({holder.info.name}), which covers this one"
