"""Syscalls: everything a process can ask of the kernel. The table is at the bottom of this file.

Each syscall names a pydantic model for its arguments, the capability it needs (a string, or a
function of the arguments when it depends on them, like `tool:{name}`), the budgets it draws
on (checked before it runs), and a handler. A handler returns an `Outcome`: a JSON-able value
and the `Charge` it cost. The kernel does the rest (kernel.py `dispatch`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from llmos.cpu.base import ChatRequest
from llmos.kernel.process import Budget, Charge, Process, budget_owner

if TYPE_CHECKING:
    from llmos.kernel.kernel import Kernel


class ErrorCode(StrEnum):
    DENIED = "denied"  # the process lacks the capability
    BUDGET = "budget"  # a budget is used up
    INVALID_ARGS = "invalid_args"
    UNKNOWN_SYSCALL = "unknown_syscall"
    NOT_FOUND = "not_found"  # no such process, tool, ...
    FAILED = "failed"  # the device or handler failed
    CANCELLED = "cancelled"


class SyscallError(BaseModel):
    code: ErrorCode
    message: str


class SyscallFailed(Exception):
    def __init__(self, name: str, error: SyscallError) -> None:
        super().__init__(f"{name}: {error.message}")
        self.error = error


class Reply(BaseModel):
    """What a syscall returns to the process; journaled as its result."""

    ok: bool
    value: Any = None
    error: SyscallError | None = None

    @classmethod
    def fail(cls, code: ErrorCode, message: str) -> Reply:
        return cls(ok=False, error=SyscallError(code=code, message=message))

    def unwrap(self) -> Any:
        """The value, or raise SyscallFailed: for programs that treat any error as fatal."""
        if self.error is not None:
            raise SyscallFailed("syscall", self.error)
        return self.value


@dataclass
class Outcome:
    value: Any = None
    charge: Charge | None = None


class HandlerError(Exception):
    """Raised by a handler to fail the syscall with a specific code and a message for the caller."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


# --- argument models ----------------------------------------------------------------------------


class Args(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NoArgs(Args):
    pass


class SleepArgs(Args):
    seconds: float = Field(ge=0, le=86_400)


class SpawnArgs(Args):
    program: str = Field(description="'module:function' of an async program")
    name: str | None = None
    args: dict[str, Any] = Field(default_factory=dict)
    capabilities: list[str] | None = Field(None, description="None inherits the parent's")
    budget: Budget | None = None


class PidArgs(Args):
    pid: int


class WaitArgs(Args):
    pid: int
    timeout_s: float | None = Field(None, gt=0)


class ChatArgs(ChatRequest):
    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(None, description="catalog name, .gguf path or openai:NAME; None = default")


class ToolCallArgs(Args):
    name: str
    arguments: dict[str, Any] | str = Field(default_factory=dict)


class SandboxExecArgs(Args):
    code: str


class MemAddArgs(Args):
    text: str = Field(min_length=1)
    namespace: str = "shared"
    source: str = "process"
    trust: Literal["user", "model", "tool", "web"] = "model"
    metadata: dict[str, str | int | float | bool] = Field(default_factory=dict)


class MemSearchArgs(Args):
    query: str
    namespaces: list[str] = Field(default_factory=lambda: ["shared"])
    k: int = Field(5, ge=1, le=100)


class SendArgs(Args):
    to: int
    body: Any


class ReceiveArgs(Args):
    sender: int | None = Field(None, description="only a message from this pid")
    timeout_s: float | None = Field(None, ge=0, description="msg.wait: None waits until one comes")


# --- handlers -------------------------------------------------------------------------------------


async def sys_noop(kernel: Kernel, proc: Process, args: NoArgs) -> Outcome:
    return Outcome()


async def sys_clock_now(kernel: Kernel, proc: Process, args: NoArgs) -> Outcome:
    # Through the journal, so a resumed process sees the time it saw before the crash.
    return Outcome(time.time())


async def sys_sleep(kernel: Kernel, proc: Process, args: SleepArgs) -> Outcome:
    await asyncio.sleep(args.seconds)
    return Outcome()


async def sys_spawn(kernel: Kernel, proc: Process, args: SpawnArgs) -> Outcome:
    pid = await kernel.spawn(
        args.program,
        name=args.name,
        args=args.args,
        capabilities=args.capabilities,
        budget=args.budget,
        parent=proc.pid,
    )
    return Outcome(pid)


async def sys_wait(kernel: Kernel, proc: Process, args: WaitArgs) -> Outcome:
    info = await kernel.wait(args.pid, timeout_s=args.timeout_s)
    return Outcome(info.model_dump(mode="json", include={"pid", "state", "result", "error"}))


async def sys_kill(kernel: Kernel, proc: Process, args: PidArgs) -> Outcome:
    if not kernel.is_descendant(args.pid, of=proc.pid):
        raise HandlerError(ErrorCode.DENIED, f"process {args.pid} is not a child of process {proc.pid}")
    await kernel.kill(args.pid)
    return Outcome()


async def sys_llm_chat(kernel: Kernel, proc: Process, args: ChatArgs) -> Outcome:
    backend = await kernel.llm(args.model)
    request = ChatRequest.model_validate(args.model_dump(exclude={"model"}))
    request.session = str(proc.pid)  # per-process KV state in backends that keep it
    async with kernel.scheduler.slot("llm", proc.info.priority):
        # Asked only now: while this call waited for the model, others under the same budget
        # (its parent's, say) may have spent it. One call at a time holds the slot.
        allowance = kernel.token_allowance(proc)
        if allowance is not None:
            # The prompt is charged too: the answer may only have what the prompt leaves.
            remaining, holder = allowance
            text = "\n".join(message.content for message in request.messages)
            left = remaining - await asyncio.to_thread(backend.count_tokens, text)
            if left <= 0:
                message = (
                    f"llm.chat refused: token budget of {holder.info.budget.tokens} used up ({remaining} "
                    f"left, too few for the prompt){budget_owner(proc, holder)}"
                )
                raise HandlerError(ErrorCode.BUDGET, message)
            request.max_tokens = min(request.max_tokens or left, left)
        result = await backend.chat(request, on_text=lambda text: proc.emit("text", {"text": text}))
    usage = result.usage
    charge = Charge(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        reused_prompt_tokens=usage.reused_prompt_tokens,
        backend=result.backend or backend.name,
    )
    return Outcome(result.model_dump(mode="json"), charge)


def tool_capability(kernel: Kernel, args: ToolCallArgs) -> str:
    return kernel.tools.get(args.name).capability


async def sys_tool_call(kernel: Kernel, proc: Process, args: ToolCallArgs) -> Outcome:
    result = await kernel.call_tool(proc, args.name, args.arguments)
    charge = Charge(tool_calls=1, sandbox_cpu_s=result.sandbox_cpu_s)
    return Outcome(result.model_dump(mode="json"), charge)


async def sys_sandbox_exec(kernel: Kernel, proc: Process, args: SandboxExecArgs) -> Outcome:
    sandbox = await kernel.sandbox()
    result = await sandbox.exec(str(proc.pid), args.code)
    return Outcome(result.model_dump(mode="json"), Charge(sandbox_cpu_s=result.cpu_s))


async def sys_mem_add(kernel: Kernel, proc: Process, args: MemAddArgs) -> Outcome:
    store = await kernel.memory()
    record = args.model_dump()
    text = record.pop("text")
    return Outcome(await asyncio.to_thread(store.add, text, pid=proc.pid, **record))


async def sys_mem_search(kernel: Kernel, proc: Process, args: MemSearchArgs) -> Outcome:
    store = await kernel.memory()
    hits = await asyncio.to_thread(store.search, args.query, namespaces=args.namespaces, k=args.k)
    return Outcome([hit.model_dump(mode="json") for hit in hits])


async def sys_send(kernel: Kernel, proc: Process, args: SendArgs) -> Outcome:
    target = kernel.journal.process(args.to, with_usage=False)
    if target is None or target.state.finished:
        raise HandlerError(ErrorCode.NOT_FOUND, f"process {args.to} does not exist or has ended")
    return Outcome(kernel.mailboxes.send(proc.pid, args.to, args.body))


async def sys_receive(kernel: Kernel, proc: Process, args: ReceiveArgs) -> Outcome:
    message = kernel.mailboxes.take(proc.pid, args.sender)
    return Outcome(message.model_dump(mode="json") if message else None)


async def sys_wait_message(kernel: Kernel, proc: Process, args: ReceiveArgs) -> Outcome:
    message = await kernel.mailboxes.wait(proc.pid, args.sender, args.timeout_s)
    return Outcome(message.model_dump(mode="json") if message else None)


# --- the table --------------------------------------------------------------------------------------

Handler = Callable[["Kernel", Process, Any], Awaitable[Outcome]]
CapabilityOf = Callable[["Kernel", Any], str]


@dataclass(frozen=True)
class Syscall:
    name: str
    args: type[BaseModel]
    capability: str | CapabilityOf | None  # None: every process may make it
    budgets: tuple[str, ...]  # budgets checked before it runs (wall time is always checked)
    handler: Handler
    waits: bool = True  # may take a while: its call is journaled (committed) before it runs


TABLE: dict[str, Syscall] = {
    s.name: s
    for s in [
        #       name            args             capability       budgets checked first     handler
        Syscall("noop",         NoArgs,          None,            (),                       sys_noop, waits=False),
        Syscall("clock.now",    NoArgs,          None,            (),                       sys_clock_now, waits=False),
        Syscall("sleep",        SleepArgs,       None,            (),                       sys_sleep),
        Syscall("proc.spawn",   SpawnArgs,       "proc.spawn",    (),                       sys_spawn),
        Syscall("proc.wait",    WaitArgs,        None,            (),                       sys_wait),
        Syscall("proc.kill",    PidArgs,         None,            (),                       sys_kill),
        Syscall("llm.chat",     ChatArgs,        "llm",           ("tokens",),              sys_llm_chat),
        Syscall("tool.call",    ToolCallArgs,    tool_capability, ("tool_calls", "sandbox_cpu_s"), sys_tool_call),
        Syscall("sandbox.exec", SandboxExecArgs, "sandbox",       ("sandbox_cpu_s",),       sys_sandbox_exec),
        Syscall("mem.add",      MemAddArgs,      "memory",        (),                       sys_mem_add),
        Syscall("mem.search",   MemSearchArgs,   "memory",        (),                       sys_mem_search),
        Syscall("msg.send",     SendArgs,        "msg",           (),                       sys_send, waits=False),
        Syscall("msg.recv",     ReceiveArgs,     None,            (),                       sys_receive, waits=False),
        Syscall("msg.wait",     ReceiveArgs,     None,            (),                       sys_wait_message),
    ]
}  # fmt: skip
