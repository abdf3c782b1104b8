"""Syscalls: everything a process can ask of the kernel. The table is at the bottom of this file.

Each row names a pydantic model for the arguments, the model of the result (what `reply.value`
is, also when replayed from the journal), the capability the call needs (a string, or a
function of the arguments when it depends on them, like `tool:{name}`), its risk class for the
approval policy when it is a risky action, the budgets checked before it runs, and a handler. A handler
returns an `Outcome`: the result, what it cost, and whether it holds untrusted data. The kernel
does the rest (kernel.py `dispatch`): validate, check, approve, journal, charge, taint.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from llmos.kernel.devices import (
    ChatRequest,
    ChatResult,
    ExecResult,
    LLMBackend,
    Memory,
    MemoryHit,
    MemoryRecord,
    MetaValue,
    ModelInfo,
    NewRecord,
    Risk,
    Sandbox,
    ToolResult,
    Tools,
    ToolSpec,
    Where,
)
from llmos.kernel.journal import Journal
from llmos.kernel.mailbox import Mail, Mailboxes, MailSent
from llmos.kernel.process import Budget, Charge, LiveProcess, ProcessInfo, State, budget_owner
from llmos.kernel.program import ErrorCode, Program
from llmos.kernel.scheduler import Scheduler


@dataclass(frozen=True)
class Action:
    """A risky action as the approval policy and a person see it."""

    risk: Risk
    what: str  # the tool's name, or the syscall's
    arguments: dict[str, Any]  # as a person is shown them
    grants: frozenset[str] = frozenset()  # capabilities the syscalls it makes itself may use


@dataclass
class Outcome:
    value: Any = None
    charge: Charge | None = None
    untrusted: bool = False  # the value holds data from outside, or from a tainted process


class HandlerError(Exception):
    """Raised by a handler to fail the syscall with a specific code and a message for the caller."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class Services(Protocol):
    """What syscall handlers use of the kernel; kernel.py's `Kernel` provides it."""

    mailboxes: Mailboxes
    scheduler: Scheduler

    @property
    def journal(self) -> Journal: ...

    @property
    def tools(self) -> Tools: ...

    async def spawn(
        self,
        program: Program | str,
        *,
        name: str | None = None,
        args: dict[str, Any] | None = None,
        capabilities: list[str] | None = None,
        budget: Budget | None = None,
        parent: int | None = None,
    ) -> int: ...

    async def wait(self, pid: int, timeout_s: float | None = None) -> ProcessInfo: ...

    async def kill(self, pid: int) -> None: ...

    def is_descendant(self, pid: int, of: int) -> bool: ...

    async def llm(self, model: str | None = None) -> LLMBackend: ...

    async def sandbox(self) -> Sandbox: ...

    async def memory(self) -> Memory: ...

    def token_allowance(self, proc: LiveProcess) -> tuple[int, LiveProcess] | None: ...

    async def call_tool(
        self, proc: LiveProcess, name: str, arguments: dict[str, Any] | str
    ) -> ToolResult: ...


# --- argument and result models -----------------------------------------------------------------


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


class ProcessExit(BaseModel):
    """How a waited-for process ended."""

    pid: int
    state: State
    result: Any = None
    error: str | None = None
    tainted: bool = False  # it had read untrusted data: its result may carry an attacker's words


class ChatArgs(ChatRequest):
    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(None, description="catalog name, .gguf path or openai:NAME; None = default")


class ModelArgs(Args):
    model: str | None = None


class CountArgs(Args):
    texts: list[str] = Field(max_length=10_000)
    model: str | None = None


class ToolListArgs(Args):
    names: list[str] | None = Field(None, description="None: every tool the process may call")


class ToolCallArgs(Args):
    name: str
    arguments: dict[str, Any] | str = Field(default_factory=dict)


class SandboxExecArgs(Args):
    code: str


class MemoryWrite(Args):
    text: str = Field(min_length=1)
    namespace: str = "shared"
    source: str = "process"
    trust: Literal["user", "model", "tool", "web"] = "model"
    metadata: dict[str, MetaValue] = Field(default_factory=dict)
    id: str | None = Field(None, description="an id replaces the record of that id")


class MemAddArgs(Args):
    records: list[MemoryWrite] = Field(min_length=1, max_length=1000)


class MemSearchArgs(Args):
    query: str
    namespaces: list[str] = Field(default_factory=lambda: ["shared"])
    k: int = Field(5, ge=1, le=100)
    where: Where | None = None


class MemGetArgs(Args):
    id: str


class SendArgs(Args):
    to: int
    body: Any


class ReceiveArgs(Args):
    sender: int | None = Field(None, description="only a message from this pid")
    timeout_s: float | None = Field(None, ge=0, description="msg.wait: None waits until one comes")


# --- handlers -------------------------------------------------------------------------------------


async def sys_noop(k: Services, proc: LiveProcess, args: NoArgs) -> Outcome:
    return Outcome()


async def sys_clock_now(k: Services, proc: LiveProcess, args: NoArgs) -> Outcome:
    # Through the journal, so a resumed process sees the time it saw before the crash.
    return Outcome(time.time())


async def sys_sleep(k: Services, proc: LiveProcess, args: SleepArgs) -> Outcome:
    await asyncio.sleep(args.seconds)
    return Outcome()


async def sys_spawn(k: Services, proc: LiveProcess, args: SpawnArgs) -> Outcome:
    # A child of a tainted parent starts tainted (kernel.spawn): its arguments may carry the taint.
    pid = await k.spawn(
        args.program,
        name=args.name,
        args=args.args,
        capabilities=args.capabilities,
        budget=args.budget,
        parent=proc.pid,
    )
    return Outcome(pid)


async def sys_wait(k: Services, proc: LiveProcess, args: WaitArgs) -> Outcome:
    info = await k.wait(args.pid, timeout_s=args.timeout_s)
    exit = ProcessExit(
        pid=info.pid, state=info.state, result=info.result, error=info.error, tainted=info.tainted
    )
    return Outcome(exit, untrusted=exit.tainted)


async def sys_kill(k: Services, proc: LiveProcess, args: PidArgs) -> Outcome:
    if not k.is_descendant(args.pid, of=proc.pid):
        raise HandlerError(ErrorCode.DENIED, f"process {args.pid} is not a child of process {proc.pid}")
    await k.kill(args.pid)
    return Outcome()


async def sys_llm_chat(k: Services, proc: LiveProcess, args: ChatArgs) -> Outcome:
    backend = await k.llm(args.model)
    request = ChatRequest.model_validate(args.model_dump(exclude={"model"}))
    request.session = str(proc.pid)  # per-process KV state in backends that keep it
    async with k.scheduler.slot("llm", proc.info.priority):
        # Asked only now: while this call waited for the model, others under the same budget
        # (its parent's, say) may have spent it. One call at a time holds the slot.
        allowance = k.token_allowance(proc)
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
        result = await backend.chat(request, on_text=lambda text: proc.handle.emit("text", {"text": text}))
    usage = result.usage
    charge = Charge(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        reused_prompt_tokens=usage.reused_prompt_tokens,
        backend=result.backend or backend.name,
    )
    return Outcome(result, charge)


async def sys_llm_info(k: Services, proc: LiveProcess, args: ModelArgs) -> Outcome:
    return Outcome((await k.llm(args.model)).info)


async def sys_llm_count(k: Services, proc: LiveProcess, args: CountArgs) -> Outcome:
    backend = await k.llm(args.model)
    return Outcome(await asyncio.to_thread(lambda: [backend.count_tokens(text) for text in args.texts]))


async def sys_tool_list(k: Services, proc: LiveProcess, args: ToolListArgs) -> Outcome:
    names = args.names if args.names is not None else k.tools.names()
    tools = [k.tools.get(name) for name in names]  # UnknownTool: not_found
    return Outcome(
        [tool.spec() for tool in tools if args.names is not None or proc.info.allows(tool.capability)]
    )


def tool_capability(k: Services, args: ToolCallArgs) -> str:
    return k.tools.get(args.name).capability


def tool_action(k: Services, args: ToolCallArgs) -> Action:
    tool = k.tools.get(args.name)
    shown = args.arguments if isinstance(args.arguments, dict) else {"raw": args.arguments}
    return Action(tool.risk, tool.name, shown, grants=tool.uses)


def code_action(k: Services, args: SandboxExecArgs) -> Action:
    return Action(Risk.EXECUTE, "sandbox.exec", {"code": args.code})


async def sys_tool_call(k: Services, proc: LiveProcess, args: ToolCallArgs) -> Outcome:
    result = await k.call_tool(proc, args.name, args.arguments)
    charge = Charge(tool_calls=1, sandbox_cpu_s=result.sandbox_cpu_s)
    return Outcome(result, charge, untrusted=result.untrusted)


async def sys_sandbox_exec(k: Services, proc: LiveProcess, args: SandboxExecArgs) -> Outcome:
    result = await (await k.sandbox()).exec(str(proc.pid), args.code)
    return Outcome(result, Charge(sandbox_cpu_s=result.cpu_s))


async def sys_mem_add(k: Services, proc: LiveProcess, args: MemAddArgs) -> Outcome:
    store = await k.memory()
    # Who wrote it and whether it had read untrusted data are the kernel's to say, not the caller's.
    records = [NewRecord(**w.model_dump(), pid=proc.pid, tainted=proc.tainted) for w in args.records]
    return Outcome(await asyncio.to_thread(store.add_many, records))


async def sys_mem_search(k: Services, proc: LiveProcess, args: MemSearchArgs) -> Outcome:
    store = await k.memory()
    hits = await asyncio.to_thread(
        lambda: store.search(args.query, namespaces=args.namespaces, k=args.k, where=args.where)
    )
    return Outcome(hits, untrusted=any(hit.provenance.untrusted for hit in hits))


async def sys_mem_get(k: Services, proc: LiveProcess, args: MemGetArgs) -> Outcome:
    record = await asyncio.to_thread((await k.memory()).get, args.id)
    return Outcome(record, untrusted=record is not None and record.provenance.untrusted)


async def sys_send(k: Services, proc: LiveProcess, args: SendArgs) -> Outcome:
    target = k.journal.process(args.to, with_usage=False)
    if target is None or target.state.finished:
        raise HandlerError(ErrorCode.NOT_FOUND, f"process {args.to} does not exist or has ended")
    return Outcome(k.mailboxes.send(proc.pid, args.to, args.body, tainted=proc.tainted))


async def sys_receive(k: Services, proc: LiveProcess, args: ReceiveArgs) -> Outcome:
    mail = k.mailboxes.take(proc.pid, args.sender)
    return Outcome(mail, untrusted=mail is not None and mail.tainted)


async def sys_wait_message(k: Services, proc: LiveProcess, args: ReceiveArgs) -> Outcome:
    mail = await k.mailboxes.wait(proc.pid, args.sender, args.timeout_s)
    return Outcome(mail, untrusted=mail is not None and mail.tainted)


# --- the table --------------------------------------------------------------------------------------

Handler = Callable[[Services, LiveProcess, Any], Awaitable[Outcome]]
CapabilityOf = Callable[[Services, Any], str]
ActionOf = Callable[[Services, Any], Action]
WALL = "wall_time_s"


@dataclass(frozen=True)
class Syscall:
    name: str
    args: type[BaseModel]
    result: Any  # a type pydantic can validate: what `reply.value` is
    capability: str | CapabilityOf | None  # None: every process may make it
    action: ActionOf | None  # a risky action the approval policy decides on; None: not one
    budgets: Sequence[str]  # budgets checked before it runs
    handler: Handler
    waits: bool = True  # may take a while: its call is journaled (committed) before it runs

    @property
    def results(self) -> TypeAdapter[Any]:
        return _ADAPTERS[self.name]


TABLE: dict[str, Syscall] = {
    s.name: s
    for s in [
        #       name            args             result               capability       action           budgets checked first                handler
        Syscall("noop",         NoArgs,          None,                None,            None,            (),                                  sys_noop, waits=False),
        Syscall("clock.now",    NoArgs,          float,               None,            None,            (),                                  sys_clock_now, waits=False),
        Syscall("sleep",        SleepArgs,       None,                None,            None,            (WALL,),                             sys_sleep),
        Syscall("proc.spawn",   SpawnArgs,       int,                 "proc.spawn",    None,            (WALL,),                             sys_spawn),
        Syscall("proc.wait",    WaitArgs,        ProcessExit,         None,            None,            (),                                  sys_wait),
        Syscall("proc.kill",    PidArgs,         None,                None,            None,            (),                                  sys_kill),
        Syscall("llm.chat",     ChatArgs,        ChatResult,          "llm",           None,            (WALL, "tokens"),                    sys_llm_chat),
        Syscall("llm.info",     ModelArgs,       ModelInfo,           "llm",           None,            (),                                  sys_llm_info),
        Syscall("llm.count",    CountArgs,       list[int],           "llm",           None,            (),                                  sys_llm_count),
        Syscall("tool.list",    ToolListArgs,    list[ToolSpec],      None,            None,            (),                                  sys_tool_list),
        Syscall("tool.call",    ToolCallArgs,    ToolResult,          tool_capability, tool_action,     (WALL, "tool_calls", "sandbox_cpu_s"), sys_tool_call),
        Syscall("sandbox.exec", SandboxExecArgs, ExecResult,          "sandbox",       code_action,     (WALL, "sandbox_cpu_s"),             sys_sandbox_exec),
        Syscall("mem.add",      MemAddArgs,      list[str],           "memory",        None,            (WALL,),                             sys_mem_add),
        Syscall("mem.search",   MemSearchArgs,   list[MemoryHit],     "memory",        None,            (WALL,),                             sys_mem_search),
        Syscall("mem.get",      MemGetArgs,      MemoryRecord | None, "memory",        None,            (WALL,),                             sys_mem_get),
        Syscall("msg.send",     SendArgs,        MailSent,            "msg",           None,            (),                                  sys_send, waits=False),
        Syscall("msg.recv",     ReceiveArgs,     Mail | None,         None,            None,            (),                                  sys_receive, waits=False),
        Syscall("msg.wait",     ReceiveArgs,     Mail | None,         None,            None,            (),                                  sys_wait_message),
    ]
}  # fmt: skip

_ADAPTERS: dict[str, TypeAdapter[Any]] = {name: TypeAdapter(row.result) for name, row in TABLE.items()}
