"""The device protocols: what the kernel needs of each device, and the models that cross to it.

The kernel drives four devices, each behind a small protocol here; a device package implements
one and imports only these protocols of the kernel:

- `LLMBackend` (the CPU, `llmos/cpu/`): chat completions, token counts, the model's size.
- `Sandbox` (`llmos/sandbox/`): run code in a process's session, in its workspace.
- `Memory` (`llmos/memory/`): records with provenance, searched by meaning.
- `Tools` (`llmos/tools/`): what a process may call, each `Tool` with a capability and a risk
  class.

`Devices` is what a kernel is booted with (`llmos/boot.py` builds it from the config). Each
device is opened on first use, so a kernel that never chats never loads a model.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, Field

from llmos.config import SandboxLimits
from llmos.kernel.process import Process
from llmos.kernel.secrets import redact

# --- the CPU: LLM backends ------------------------------------------------------------------------

Role = Literal["system", "user", "assistant", "tool"]


class ToolCall(BaseModel):
    id: str
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)


class Message(BaseModel):
    role: Role
    content: str = ""
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)


class ToolSpec(BaseModel):
    """A tool as the model sees it: a name, what it does, and a JSON schema of its arguments."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})


class ChatRequest(BaseModel):
    messages: list[Message]
    tools: list[ToolSpec] = Field(default_factory=list)
    # "auto": text or a tool call; "required": must call some tool; "none": text only;
    # any other string: must call the tool of that name.
    tool_choice: str = "auto"
    # JSON schema the answer text must validate against (structured output).
    response_schema: dict[str, Any] | None = None
    max_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    logprobs: bool = False
    # Who is asking: a backend that keeps per-caller state (KV snapshots) keys it by this.
    session: str | None = None


class TokenUsage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Prompt tokens that were not evaluated again because a cached prefix covered them.
    reused_prompt_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: TokenUsage) -> TokenUsage:
        return TokenUsage(
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
            reused_prompt_tokens=self.reused_prompt_tokens + other.reused_prompt_tokens,
        )


class TokenLogprob(BaseModel):
    token: str
    logprob: float


FinishReason = Literal["stop", "length", "tool_calls", "cancelled", "error"]


class ChatResult(BaseModel):
    text: str = ""
    tool_calls: list[ToolCall] = Field(default_factory=list)
    finish_reason: FinishReason = "stop"
    usage: TokenUsage = Field(default_factory=TokenUsage)
    model: str = ""
    backend: str = ""
    logprobs: list[TokenLogprob] | None = None
    time_to_first_token_s: float | None = None
    duration_s: float = 0.0


class ModelInfo(BaseModel):
    name: str
    context_length: int
    native_tool_calls: bool = False
    structured_output: bool = True
    logprobs: bool = False
    family: str = "unknown"


TextCallback = Callable[[str], None]


class LLMError(Exception):
    """A backend failure a user has to fix (server down, model missing): one sentence with the fix."""


@runtime_checkable
class LLMBackend(Protocol):
    name: str

    @property
    def info(self) -> ModelInfo: ...

    async def chat(self, request: ChatRequest, on_text: TextCallback | None = None) -> ChatResult: ...

    def count_tokens(self, text: str) -> int: ...

    async def aclose(self) -> None: ...


# --- the sandbox ----------------------------------------------------------------------------------


class ExecResult(BaseModel):
    stdout: str = ""
    stderr: str = ""
    value: str | None = None  # repr of a final bare expression, REPL-style
    files: list[str] = []  # workspace-relative paths created or changed by this call
    exit_status: int = 0  # 0 ok, 1 the code raised, negative: the worker was killed by that signal
    timed_out: bool = False
    error: str | None = None  # traceback or why the worker died
    cpu_s: float = 0.0
    wall_s: float = 0.0
    memory_peak_mb: float | None = None  # the session's peak so far (cgroup, else the worker's maxrss)
    backend: str
    sandboxed: bool
    restarted: bool = False  # the session was restarted: its variables are lost
    truncated: bool = False  # output cut at limits.output_bytes

    @property
    def ok(self) -> bool:
        return self.error is None and not self.timed_out


@runtime_checkable
class Sandbox(Protocol):
    """Runs code in named sessions (the kernel names them by pid), each working in its workspace."""

    name: str
    sandboxed: bool

    async def exec(self, session: str, code: str, limits: SandboxLimits | None = None) -> ExecResult: ...

    def workspace(self, session: str) -> Path: ...

    async def close_session(self, session: str) -> None: ...

    async def aclose(self) -> None: ...


# --- memory ---------------------------------------------------------------------------------------

# Where a record's text came from. "tool" and "web" are data from outside: read, never obeyed.
Trust = Literal["user", "model", "tool", "web"]
UNTRUSTED_SOURCES: frozenset[str] = frozenset({"tool", "web"})
MetaValue = str | int | float | bool
SHARED = "shared"


def namespace_for_agent(name: str) -> str:
    return f"agent:{name}"


class Provenance(BaseModel):
    pid: int | None = None
    source: str
    time: float
    trust: Trust
    # Written by a process that had read untrusted data: whatever it says may be an attacker's.
    tainted: bool = False

    @property
    def untrusted(self) -> bool:
        return self.tainted or self.trust in UNTRUSTED_SOURCES


class NewRecord(BaseModel):
    """A record to write; with an id it replaces the record of that id (upsert)."""

    text: str
    namespace: str
    source: str
    trust: Trust
    pid: int | None = None
    tainted: bool = False
    metadata: dict[str, MetaValue] = Field(default_factory=dict)
    id: str | None = None


class MemoryRecord(BaseModel):
    id: str
    text: str
    namespace: str
    provenance: Provenance
    metadata: dict[str, MetaValue] = Field(default_factory=dict)


class MemoryHit(MemoryRecord):
    # Cosine similarity of query and record, 1.0 for the same meaning.
    score: float


# A metadata filter: {"kind": "turn"}, or with an operator: {"kind": {"$nin": ["turn", "core"]}}.
Where = dict[str, MetaValue | dict[str, MetaValue | list[MetaValue]]]


@runtime_checkable
class Memory(Protocol):
    def add_many(self, records: Sequence[NewRecord]) -> list[str]: ...

    def search(
        self, query: str, *, namespaces: Sequence[str], k: int = 5, where: Where | None = None
    ) -> list[MemoryHit]: ...

    def get(self, id: str) -> MemoryRecord | None: ...

    def close(self) -> None: ...


# --- tools ----------------------------------------------------------------------------------------


class Risk(StrEnum):
    """How much harm a call can do; policy decides which risks need approval."""

    READ = "read"
    WRITE = "write"
    NETWORK = "network"  # reads from the network (GET); a call with side effects there is WRITE
    EXECUTE = "execute"
    IRREVERSIBLE = "irreversible"


class ToolResult(BaseModel):
    ok: bool
    content: Any = None  # JSON-able
    error: str | None = None
    # Content came from outside (a web page, an API, another server): treat it as data, not orders.
    untrusted: bool = False
    sandbox_cpu_s: float = 0.0

    @classmethod
    def failure(cls, error: str, **extra: Any) -> ToolResult:
        return cls(ok=False, error=error, **extra)

    def without_secrets(self, secrets: Iterable[str]) -> ToolResult:
        """This result with every secret redacted: an exception or a server's answer that quotes
        a key must not carry it to the model or the journal."""
        secrets = [secret for secret in secrets if secret]
        if not secrets:
            return self
        return self.model_copy(
            update={"content": redact(self.content, secrets), "error": redact(self.error, secrets)}
        )

    def render(self) -> str:
        """The text the model sees as the tool message."""
        if not self.ok:
            return f"error: {self.error}"
        if isinstance(self.content, str):
            return self.content
        return json.dumps(self.content, ensure_ascii=False)


@dataclass(frozen=True)
class ToolContext:
    """What the kernel hands a tool for one call: the calling process's handle (a tool acts
    through its syscalls, like any program), its workspace, and the secrets the tool declared."""

    process: Process
    workspace: Path
    workspace_limit_bytes: int | None = None  # sandbox.limits.workspace_mb: file tools keep to it too
    secrets: Mapping[str, str] = field(default_factory=dict, repr=False)
    untrusted: bool = False  # the process has read untrusted data: what it writes carries that

    @property
    def pid(self) -> int:
        return self.process.pid


class UnknownTool(LookupError):
    def __init__(self, name: str, available: Iterable[str]) -> None:
        self.name = name
        self.available = sorted(available)
        close = difflib.get_close_matches(name, self.available, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        listing = ", ".join(self.available) or "none"
        super().__init__(f"There is no tool named '{name}'.{hint} Available tools: {listing}.")


class Tool(Protocol):
    name: str
    capability: str
    risk: Risk
    secret_names: frozenset[str]
    # Capabilities of the syscalls the tool makes itself ("sandbox" for the python tool): a
    # process allowed to call the tool may use them through it.
    uses: frozenset[str]

    def spec(self) -> ToolSpec: ...

    async def invoke(self, arguments: dict[str, Any] | str, ctx: ToolContext) -> ToolResult: ...


class Tools(Protocol):
    def get(self, name: str) -> Tool:
        """The tool of that name, or raise UnknownTool."""
        ...

    def names(self) -> list[str]: ...

    def __contains__(self, name: object) -> bool: ...


# --- what a kernel is booted with ----------------------------------------------------------------


@dataclass
class Devices:
    """A kernel's devices. The model, the sandbox and the memory store are opened on first use,
    once (`llm(None)` opens the configured default model); the tools are a registry the app may
    add to."""

    tools: Tools
    llm: Callable[[str | None], Awaitable[LLMBackend]]
    sandbox: Callable[[], Awaitable[Sandbox]]
    memory: Callable[[], Awaitable[Memory]]
