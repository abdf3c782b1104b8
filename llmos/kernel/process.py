"""Processes: what the kernel knows about each agent run (the program's handle is program.Process)."""

from __future__ import annotations

import asyncio
import fnmatch
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field

from llmos.config import Budget as Budget  # re-exported: part of the process model
from llmos.kernel.program import Dispatch, ErrorCode, Reply


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
    # It read untrusted data, or was spawned by a process that had: see LiveProcess.tainted.
    tainted: bool = False

    def allows(self, capability: str) -> bool:
        return any(fnmatch.fnmatchcase(capability, pattern) for pattern in self.capabilities)


@dataclass(frozen=True)
class Cover:
    """A risky call in flight: the policy decided on it once, so the syscalls it makes itself (the
    python tool's sandbox.exec) are not asked about again, and may use the capabilities it grants."""

    seq: int
    grants: frozenset[str]

    def allows(self, capability: str) -> bool:
        return any(fnmatch.fnmatchcase(capability, pattern) for pattern in self.grants)


Listener = Callable[[str, dict[str, Any]], None]


class LiveProcess:
    """The kernel's side of a running process: its row of the process table, its task, what it
    and its descendants consumed, its taint, and the journaled results a resume replays. Its
    program sees only `handle` (a `Process`: syscall and emit)."""

    def __init__(self, info: ProcessInfo, replay: dict[int, dict[str, Any]]) -> None:
        self.info = info
        self.handle: Process  # what its program holds; the kernel binds its syscalls to it
        self.task: asyncio.Task[Any] | None = None
        self.finished = asyncio.Event()
        # Why the task was cancelled: (state, error). None means the kernel shut down under it.
        self.stop_reason: tuple[State, str] | None = None
        self.started = time.monotonic()
        self.wall_time_before = info.usage.wall_time_s  # from earlier runs, before a resume
        # What this process and all its descendants consumed: what its budget is checked against.
        self.tree_usage = info.usage.model_copy()
        self._next_seq = 0
        self._replay = replay  # journaled results by syscall number: returned, not re-executed
        self.listeners: list[Listener] = []
        # The risky call in flight (a tool call) whose decision covers the syscalls it makes.
        self.cover: Cover | None = None

    @property
    def pid(self) -> int:
        return self.info.pid

    @property
    def tainted(self) -> bool:
        """It read untrusted data (a web page, an API, a tainted process's message): what it
        does next may be an attacker's instruction, and what it passes on carries the taint."""
        return self.info.tainted

    def next_seq(self) -> int:
        self._next_seq += 1
        return self._next_seq

    def skip_to(self, seq: int) -> None:
        """Continue numbering after `seq`: a replayed call's nested syscalls are not made again."""
        self._next_seq = max(self._next_seq, seq)

    @property
    def last_seq(self) -> int:
        return self._next_seq

    def replayed(self, seq: int) -> dict[str, Any] | None:
        return self._replay.pop(seq, None)

    def wall_time(self) -> float:
        return self.wall_time_before + (time.monotonic() - self.started)


def budget_owner(proc: LiveProcess, holder: LiveProcess) -> str:
    """Names the budget's process when it is an ancestor's, to end a refusal with."""
    if holder is proc:
        return ""
    return f"; it is the budget of process {holder.pid} ({holder.info.name}), which covers this one"


class Process:
    """A program's handle on its process: `await proc.syscall(name, **args)` and `proc.emit(...)`.

    It holds nothing of the kernel, so every action a program takes is a syscall the kernel
    checks, charges and journals. `child(pid)` gives the handle of a live descendant, for a
    program that acts as its children (an AutoGen team runs its members' agents in its own
    task): the child's syscalls are checked against the child's capabilities and charged to it.
    """

    def __init__(
        self, live: LiveProcess, *, dispatch: Dispatch, emit: Listener, child: Callable[[int], Process]
    ) -> None:
        self._live = live
        self._dispatch = dispatch
        self._emit = emit
        self._child = child

    def __repr__(self) -> str:
        return f"<Process {self.pid} {self.name}>"

    @property
    def pid(self) -> int:
        return self._live.info.pid

    @property
    def name(self) -> str:
        return self._live.info.name

    @property
    def state(self) -> State:
        return self._live.info.state

    @property
    def finished(self) -> asyncio.Event:
        """Set when the process has ended."""
        return self._live.finished

    @property
    def stopping(self) -> str | None:
        """Why the kernel is stopping this process (killed, a budget used up), or None: not being
        stopped, or stopped only because its kernel shuts down (then it resumes later)."""
        return self._live.stop_reason[1] if self._live.stop_reason is not None else None

    async def syscall(self, call: str, /, **args: Any) -> Reply:
        return await self._dispatch(call, args)

    def emit(self, kind: str, data: dict[str, Any]) -> None:
        """Tell whoever watches this process (CLI, shell, an embedding app) what just happened."""
        self._emit(kind, data)

    def listen(self, listener: Listener) -> Callable[[], None]:
        """Watch this process's events (the text its model calls stream, ...); returns the undo."""
        self._live.listeners.append(listener)
        return lambda: self._live.listeners.remove(listener) if listener in self._live.listeners else None

    def child(self, pid: int) -> Process:
        return self._child(pid)


def detached(pid: int = 0, name: str = "detached") -> Process:
    """A handle outside any kernel, for calling a tool directly (a test, a LangChain tool used on
    its own): it emits to no one, and each syscall fails with one sentence saying why."""

    async def refuse(call: str, args: dict[str, Any]) -> Reply:
        return Reply.fail(
            ErrorCode.FAILED, f"{call} needs a kernel: this was called outside a kernel process"
        )

    def no_child(child: int) -> Process:
        raise LookupError(f"Process {child} is not a child of a detached handle.")

    live = LiveProcess(ProcessInfo(pid=pid, name=name), {})
    return Process(live, dispatch=refuse, emit=lambda kind, data: None, child=no_child)
