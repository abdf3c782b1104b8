"""AutoGen teams on the llmos kernel: the one module that knows AutoGen.

AutoGen (autogen-agentchat / -core 0.7) is in maintenance mode, so everything it touches is
here, behind three small pieces:

- `KernelChatClient(proc, model)`: an AutoGen `ChatCompletionClient` whose every call is the
  `llm.chat` syscall of one llmos process, so it is scheduled, charged to that process and
  journaled like any other model call.
- `to_autogen_tool(tool, proc)`: an llmos tool as an AutoGen tool; running it is the
  `tool.call` syscall of that process.
- `team_program(proc, spec, task)`: a program that runs an AutoGen team (round robin,
  selector or swarm) as one llmos process with one child process per member. A member's model
  and tool calls are charged to its child; the selector's speaker choice to the team process.
  `llmos ps` shows the tree, and killing the team process stops every member and the run.
  The program and its JSON spec are importable, so an interrupted team resumes: the members'
  finished model calls are replayed from the journal, not asked of the model again.

    async with Kernel() as kernel:
        result = await run_team(kernel, TeamSpec(members=[...], max_turns=4), "Write ...")
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

try:
    import autogen_agentchat  # noqa: F401  # only to fail with the fix in the message
except ImportError as exc:
    raise ImportError("AutoGen is not installed; install it with: pip install 'llmos[autogen]'") from exc
from autogen_agentchat.agents import AssistantAgent
from autogen_agentchat.base import ChatAgent, TaskResult, Team, TerminationCondition
from autogen_agentchat.conditions import MaxMessageTermination, TextMentionTermination
from autogen_agentchat.messages import ModelClientStreamingChunkEvent
from autogen_agentchat.teams import RoundRobinGroupChat, SelectorGroupChat, Swarm
from autogen_core import CancellationToken, FunctionCall, Image
from autogen_core.models import (
    AssistantMessage,
    ChatCompletionClient,
    ChatCompletionTokenLogprob,
    CreateResult,
    FunctionExecutionResultMessage,
    LLMMessage,
    ModelCapabilities,
    ModelInfo,
    RequestUsage,
    SystemMessage,
    UserMessage,
)
from autogen_core.tools import BaseTool, ToolSchema
from autogen_core.tools import Tool as AutoGenTool
from pydantic import BaseModel, ConfigDict, Field, model_validator

from llmos.kernel.devices import ChatResult, Message, Tool, ToolCall, ToolResult, ToolSpec
from llmos.kernel.devices import ModelInfo as LLMModelInfo
from llmos.kernel.process import Budget, Process, ProcessInfo

if TYPE_CHECKING:
    from llmos.kernel.kernel import Kernel

MEMBER_PROGRAM = f"{__name__}:team_member"
TEAM_PROGRAM = f"{__name__}:team_program"
# How long a stopped team waits for AutoGen's runtime to wind down once its model calls fail.
STOP_TIMEOUT_S = 5.0
# Settings a caller may pass in `extra_create_args`, all of them llm.chat arguments.
CREATE_ARGS = frozenset({"max_tokens", "temperature", "top_p", "seed", "stop", "logprobs"})


class TeamSpecError(ValueError):
    """A team spec a user has to fix (unknown tool, duplicate member name, ...)."""


class ProcessStopped(RuntimeError):
    """The llmos process an AutoGen client or tool is bound to has ended; it makes no more calls."""


class LLMCallFailed(RuntimeError):
    """The llm.chat syscall was refused or failed (denied, budget used up, device error)."""


class MemberDied(RuntimeError):
    """A team member's process ended while its team still ran."""


# --- messages and results between AutoGen and llmos ---------------------------------------------


def _text_of(content: str | list[str | Image]) -> str:
    if isinstance(content, str):
        return content
    if any(isinstance(part, Image) for part in content):  # llmos messages carry text only
        raise ValueError("This model takes no images; send text only or use a model with vision.")
    return "\n".join(part for part in content if isinstance(part, str))


def _tool_call_of(call: FunctionCall) -> ToolCall:
    try:
        arguments = json.loads(call.arguments or "{}")
    except json.JSONDecodeError:
        arguments = None
    if not isinstance(arguments, dict):
        # Not an object: keep the text so the model sees what it sent (our own results never do this).
        arguments = {"arguments": call.arguments}
    return ToolCall(id=call.id, name=call.name, arguments=arguments)


def to_llmos_messages(messages: Sequence[LLMMessage]) -> list[Message]:
    """AutoGen's message types as llmos `Message`s (one tool message per function result)."""
    out: list[Message] = []
    for message in messages:
        if isinstance(message, SystemMessage):
            out.append(Message(role="system", content=message.content))
        elif isinstance(message, UserMessage):
            out.append(Message(role="user", content=_text_of(message.content), name=message.source))
        elif isinstance(message, AssistantMessage):
            if isinstance(message.content, str):
                out.append(Message(role="assistant", content=message.content, name=message.source))
            else:
                calls = [_tool_call_of(call) for call in message.content]
                out.append(
                    Message(
                        role="assistant", content=message.thought or "", name=message.source, tool_calls=calls
                    )
                )
        elif isinstance(message, FunctionExecutionResultMessage):
            out.extend(
                Message(role="tool", content=result.content, name=result.name, tool_call_id=result.call_id)
                for result in message.content
            )
        else:  # pragma: no cover - LLMMessage is a closed union
            raise TypeError(f"Unknown AutoGen message type {type(message).__name__}.")
    return out


def to_create_result(result: ChatResult) -> CreateResult:
    """An llmos `ChatResult` as AutoGen's `CreateResult` (tool calls become `FunctionCall`s)."""
    content: str | list[FunctionCall]
    if result.tool_calls:
        content = [
            FunctionCall(id=call.id, name=call.name, arguments=json.dumps(call.arguments))
            for call in result.tool_calls
        ]
        thought = result.text or None
    else:
        content, thought = result.text, None
    finish = (
        "function_calls"
        if result.tool_calls
        else {"stop": "stop", "length": "length"}.get(result.finish_reason, "unknown")
    )
    logprobs = (
        [ChatCompletionTokenLogprob(token=lp.token, logprob=lp.logprob) for lp in result.logprobs]
        if result.logprobs is not None
        else None
    )
    return CreateResult(
        finish_reason=finish,
        content=content,
        usage=RequestUsage(
            prompt_tokens=result.usage.prompt_tokens, completion_tokens=result.usage.completion_tokens
        ),
        cached=False,
        logprobs=logprobs,
        thought=thought,
    )


def _tool_spec(tool: AutoGenTool | ToolSchema) -> ToolSpec:
    schema: Mapping[str, Any] = tool.schema if isinstance(tool, AutoGenTool) else tool
    parameters = dict(schema.get("parameters") or {"type": "object", "properties": {}})
    return ToolSpec(name=schema["name"], description=schema.get("description", ""), parameters=parameters)


def _response_schema(json_output: bool | type[BaseModel] | None) -> dict[str, Any] | None:
    if json_output is None or json_output is False:
        return None
    if json_output is True:
        return {"type": "object"}
    return json_output.model_json_schema()


def _add(usage: RequestUsage, more: RequestUsage) -> RequestUsage:
    return RequestUsage(
        prompt_tokens=usage.prompt_tokens + more.prompt_tokens,
        completion_tokens=usage.completion_tokens + more.completion_tokens,
    )


# --- the model client -----------------------------------------------------------------------------


class KernelChatClient(ChatCompletionClient):
    """An AutoGen model client whose calls are `llm.chat` syscalls of the process `proc`.

    Pass the loaded `backend` (or build the client with `await KernelChatClient.open(proc, model)`)
    so `model_info` and `count_tokens` are the backend's own; without it the client still works,
    with a conservative model_info and a characters/4 token estimate. Every llmos backend can
    call tools (natively or by constrained output), so `function_calling` is always true.
    """

    component_type = "model"

    def __init__(
        self,
        proc: Process,
        model: str | None = None,
        *,
        info: LLMModelInfo | None = None,
        max_tokens: int | None = None,
        temperature: float = 0.0,
    ) -> None:
        self._proc = proc
        self._model = model
        self._info = info
        self._max_tokens = max_tokens
        self._temperature = temperature
        self._usage = RequestUsage(prompt_tokens=0, completion_tokens=0)
        self._last_usage = RequestUsage(prompt_tokens=0, completion_tokens=0)
        self._stopped: str | None = None
        self._stop_event = asyncio.Event()
        # One call at a time: a stream listens to the process's text events, which carry no call id.
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, proc: Process, model: str | None = None, **options: Any) -> KernelChatClient:
        """A client that knows its model (llm.info), so model_info is the backend's."""
        return cls(proc, model, info=(await proc.syscall("llm.info", model=model)).unwrap(), **options)

    @property
    def process(self) -> Process:
        return self._proc

    def _who(self) -> str:
        return f"process {self._proc.pid} ({self._proc.name})"

    # -- calls

    async def create(
        self,
        messages: Sequence[LLMMessage],
        *,
        tools: Sequence[AutoGenTool | ToolSchema] = [],
        tool_choice: AutoGenTool | Literal["auto", "required", "none"] = "auto",
        json_output: bool | type[BaseModel] | None = None,
        extra_create_args: Mapping[str, Any] = {},
        cancellation_token: CancellationToken | None = None,
    ) -> CreateResult:
        args = self._chat_args(messages, tools, tool_choice, json_output, extra_create_args)
        async with self._lock:
            return await self._chat(args, cancellation_token)

    async def create_stream(
        self,
        messages: Sequence[LLMMessage],
        *,
        tools: Sequence[AutoGenTool | ToolSchema] = [],
        tool_choice: AutoGenTool | Literal["auto", "required", "none"] = "auto",
        json_output: bool | type[BaseModel] | None = None,
        extra_create_args: Mapping[str, Any] = {},
        cancellation_token: CancellationToken | None = None,
    ) -> AsyncGenerator[str | CreateResult, None]:
        """Yield the text as the backend generates it (the process's "text" events), then the result."""
        args = self._chat_args(messages, tools, tool_choice, json_output, extra_create_args)
        async with self._lock:
            chunks: asyncio.Queue[str] = asyncio.Queue()

            def listen(kind: str, data: dict[str, Any]) -> None:
                if kind == "text":
                    chunks.put_nowait(str(data.get("text", "")))

            stop_listening = self._proc.listen(listen)
            call = asyncio.ensure_future(self._chat(args, cancellation_token))
            streamed: list[str] = []
            try:
                while not call.done():
                    getter = asyncio.ensure_future(chunks.get())
                    await asyncio.wait({call, getter}, return_when=asyncio.FIRST_COMPLETED)
                    if getter.done():
                        streamed.append(getter.result())
                        yield streamed[-1]
                    else:
                        getter.cancel()
                await asyncio.sleep(0)  # text callbacks scheduled just before the result came
                while not chunks.empty():
                    streamed.append(chunks.get_nowait())
                    yield streamed[-1]
                result = call.result()
                # A replayed (resumed) call streams nothing: send what the stream missed.
                text = "".join(streamed)
                if isinstance(result.content, str) and result.content.startswith(text):
                    rest = result.content[len(text) :]
                    if rest:
                        yield rest
                yield result
            finally:
                stop_listening()
                if not call.done():
                    call.cancel()
                    with contextlib.suppress(BaseException):
                        await call

    def _chat_args(
        self,
        messages: Sequence[LLMMessage],
        tools: Sequence[AutoGenTool | ToolSchema],
        tool_choice: AutoGenTool | Literal["auto", "required", "none"],
        json_output: bool | type[BaseModel] | None,
        extra_create_args: Mapping[str, Any],
    ) -> dict[str, Any]:
        unknown = set(extra_create_args) - CREATE_ARGS
        if unknown:
            raise ValueError(
                f"extra_create_args {sorted(unknown)} are not supported; use {sorted(CREATE_ARGS)}."
            )
        args: dict[str, Any] = {
            "messages": [m.model_dump(exclude_defaults=True) for m in to_llmos_messages(messages)],
            "model": self._model,
            "temperature": self._temperature,
        }
        if tools:
            args["tools"] = [_tool_spec(tool).model_dump() for tool in tools]
            args["tool_choice"] = tool_choice.name if isinstance(tool_choice, AutoGenTool) else tool_choice
        schema = _response_schema(json_output)
        if schema is not None:
            args["response_schema"] = schema
        if self._max_tokens is not None:
            args["max_tokens"] = self._max_tokens
        args.update(extra_create_args)
        return args

    async def _chat(self, args: dict[str, Any], cancellation_token: CancellationToken | None) -> CreateResult:
        reply = await self._syscall(args, cancellation_token)
        if not reply.ok:
            assert reply.error is not None
            raise LLMCallFailed(f"llm.chat of {self._who()} failed: {reply.error.message}")
        result = to_create_result(reply.value)
        self._last_usage = result.usage
        self._usage = _add(self._usage, result.usage)
        return result

    async def _syscall(self, args: dict[str, Any], cancellation_token: CancellationToken | None) -> Any:
        """The syscall, abandoned (cancelled) at once if the process ends or the client is stopped."""
        self._check_alive()
        call = asyncio.ensure_future(self._proc.syscall("llm.chat", **args))
        if cancellation_token is not None:
            cancellation_token.link_future(call)
        ended = asyncio.ensure_future(self._proc.finished.wait())
        stopped = asyncio.ensure_future(self._stop_event.wait())
        try:
            await asyncio.wait({call, ended, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ended.cancel()
            stopped.cancel()
            if not call.done():
                call.cancel()
                with contextlib.suppress(BaseException):
                    await call
        if call.cancelled():
            self._check_alive()
        return call.result()  # raises CancelledError when AutoGen cancelled the call

    def _check_alive(self) -> None:
        if self._stopped is not None:
            raise ProcessStopped(f"The model client of {self._who()} is stopped: {self._stopped}.")
        if self._proc.finished.is_set():
            state = self._proc.state.value
            raise ProcessStopped(f"{self._who()} has ended ({state}); it makes no more calls.")

    def stop(self, reason: str) -> None:
        """Refuse further calls and abandon the one in flight (it raises `ProcessStopped`)."""
        self._stopped = reason
        self._stop_event.set()

    async def close(self) -> None:
        self.stop("closed")

    # -- accounting and model facts

    def actual_usage(self) -> RequestUsage:
        return self._last_usage

    def total_usage(self) -> RequestUsage:
        return self._usage

    @staticmethod
    def _count(text: str) -> int:
        # AutoGen asks synchronously; a syscall is asynchronous. An estimate, as AutoGen's own
        # clients make one (without their tokenizer download); the charged counts are the backend's.
        return len(text) // 4 + 1

    def count_tokens(
        self, messages: Sequence[LLMMessage], *, tools: Sequence[AutoGenTool | ToolSchema] = []
    ) -> int:
        total = 0
        for message in to_llmos_messages(messages):
            total += self._count(message.content) + 4  # role and separators
            total += sum(self._count(json.dumps(call.arguments)) + 4 for call in message.tool_calls)
        total += sum(self._count(json.dumps(_tool_spec(tool).model_dump())) for tool in tools)
        return total

    def remaining_tokens(
        self, messages: Sequence[LLMMessage], *, tools: Sequence[AutoGenTool | ToolSchema] = []
    ) -> int:
        context = self._info.context_length if self._info is not None else 4096
        return max(0, context - self.count_tokens(messages, tools=tools))

    @property
    def capabilities(self) -> ModelCapabilities:  # deprecated by AutoGen, still abstract
        info = self.model_info
        return ModelCapabilities(
            vision=info["vision"], function_calling=info["function_calling"], json_output=info["json_output"]
        )

    @property
    def model_info(self) -> ModelInfo:
        info = self._info
        structured = info.structured_output if info is not None else True
        return ModelInfo(
            vision=False,  # llmos messages carry text only
            function_calling=True,
            json_output=structured,
            structured_output=structured,
            family=info.family if info is not None else "unknown",
            multiple_system_messages=True,
        )


# --- tools ------------------------------------------------------------------------------------------


class _AnyArgs(BaseModel):
    """Arguments of a tool described by a raw JSON schema: the kernel validates them."""

    model_config = ConfigDict(extra="allow")


class ToolCallFailed(RuntimeError):
    """The tool said no (bad arguments, a crash inside it, a denial); AutoGen shows this to the model."""


class KernelTool(BaseTool[BaseModel, BaseModel]):
    """An llmos tool as an AutoGen tool: running it is a `tool.call` syscall of `proc`."""

    def __init__(self, spec: ToolSpec, proc: Process) -> None:
        super().__init__(
            args_type=_AnyArgs,
            return_type=str,  # type: ignore[arg-type]  # AutoGen accepts str; its generic bound says BaseModel
            name=spec.name,
            description=spec.description,
        )
        self._spec = spec
        self._proc = proc

    @property
    def schema(self) -> ToolSchema:
        # The llmos schema as is: simplified for small models, and the one the kernel validates.
        return ToolSchema(
            name=self._spec.name,
            description=self._spec.description,
            parameters=self._spec.parameters,  # type: ignore[typeddict-item]
        )

    async def run(self, args: BaseModel, cancellation_token: CancellationToken) -> Any:
        return await self.run_json(args.model_dump(), cancellation_token)

    async def run_json(
        self, args: Mapping[str, Any], cancellation_token: CancellationToken, call_id: str | None = None
    ) -> Any:
        # Raw arguments straight to the kernel: it validates them and explains mistakes to the model.
        if self._proc.finished.is_set():
            raise ProcessStopped(f"process {self._proc.pid} has ended; tool '{self.name}' was not run.")
        reply = await self._proc.syscall("tool.call", name=self._spec.name, arguments=dict(args))
        if not reply.ok:
            assert reply.error is not None
            raise ToolCallFailed(reply.error.message)
        result: ToolResult = reply.value
        if not result.ok:
            raise ToolCallFailed(result.error or "the tool failed")
        return result.render()

    def return_value_as_string(self, value: Any) -> str:
        return str(value)


def to_autogen_tool(tool: Tool | ToolSpec, proc: Process) -> KernelTool:
    """`tool` for an AutoGen agent, its calls made (and charged) as process `proc`."""
    return KernelTool(tool if isinstance(tool, ToolSpec) else tool.spec(), proc)


# --- teams as processes -----------------------------------------------------------------------------


class MemberSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$", description="a Python identifier (AutoGen)")
    system_message: str = "You are a helpful assistant."
    description: str = Field("A helpful assistant.", description="what the selector reads about it")
    model: str | None = Field(None, description="None: the team's model")
    tools: list[str] = Field(default_factory=list, description="names of tools registered in the kernel")
    handoffs: list[str] = Field(default_factory=list, description="swarm: members it may hand off to")
    capabilities: list[str] | None = Field(None, description="None inherits the team's")
    budget: Budget | None = None


class TeamSpec(BaseModel):
    """A team as JSON: what `team_program` runs (and a resumed kernel rebuilds)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["round_robin", "selector", "swarm"] = "round_robin"
    members: list[MemberSpec] = Field(min_length=1)
    model: str | None = Field(None, description="None: the kernel's default model")
    max_turns: int | None = Field(4, ge=1)
    max_messages: int | None = Field(None, ge=1, description="stop after this many messages (task included)")
    termination_text: str | None = Field(None, description="stop when a message contains this text")
    max_tokens: int | None = Field(256, ge=1, description="per model call of a member")
    selector_max_tokens: int = Field(24, ge=1)
    selector_prompt: str | None = None
    allow_repeated_speaker: bool = False
    stream: bool = Field(True, description="members stream their text (the process's text events)")

    @model_validator(mode="after")
    def _check(self) -> TeamSpec:
        names = [m.name for m in self.members]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"member names must be unique; {duplicates} appear twice")
        if self.max_turns is None and self.max_messages is None and self.termination_text is None:
            raise ValueError("give max_turns, max_messages or termination_text, or the team never stops")
        for member in self.members:
            unknown = sorted(set(member.handoffs) - set(names))
            if unknown:
                raise ValueError(f"member {member.name!r} hands off to unknown members {unknown}")
        if self.kind == "swarm" and not any(m.handoffs for m in self.members) and len(self.members) > 1:
            raise ValueError("a swarm needs handoffs between its members")
        return self


class TeamMessage(BaseModel):
    source: str
    type: str
    content: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


class TeamResult(BaseModel):
    """What `team_program` returns (the team process's result)."""

    stop_reason: str | None
    messages: list[TeamMessage]
    members: dict[str, int] = Field(description="member name -> pid")
    # What AutoGen's model clients were told by the syscall replies, selector included.
    client_usage: dict[str, int]
    # Summed from the messages' models_usage: the members' calls as AutoGen reports them.
    message_usage: dict[str, int]


def _member(team: Process, pid: int) -> Process:
    try:
        return team.child(pid)
    except LookupError:
        raise MemberDied(f"Process {pid} ended before its team could use it.") from None


async def team_member(proc: Process, name: str, team: int) -> dict[str, Any]:
    """A team member's process. The team's AutoGen agent `name` makes its model and tool calls as
    this process (so they are charged to it); the process itself says it is ready, then waits
    for its team (process `team`) to say stop."""
    parent = team
    (await proc.syscall("msg.send", to=parent, body={"ready": name})).unwrap()
    (await proc.syscall("msg.wait", sender=parent)).unwrap()
    return {"member": name}


def _termination(spec: TeamSpec) -> TerminationCondition | None:
    condition: TerminationCondition | None = None
    if spec.max_messages is not None:
        condition = MaxMessageTermination(spec.max_messages)
    if spec.termination_text is not None:
        text = TextMentionTermination(spec.termination_text)
        condition = text if condition is None else condition | text
    return condition


def _build_team(
    spec: TeamSpec,
    team: Process,
    members: list[Process],
    models: dict[str | None, LLMModelInfo],
    tools: dict[str, ToolSpec],
) -> tuple[Team, list[KernelChatClient]]:
    clients: list[KernelChatClient] = []
    agents: list[ChatAgent] = []
    for member, proc in zip(spec.members, members, strict=True):
        model = member.model or spec.model
        client = KernelChatClient(proc, model, info=models[model], max_tokens=spec.max_tokens)
        clients.append(client)
        member_tools = [to_autogen_tool(tools[name], proc) for name in member.tools]
        agents.append(
            AssistantAgent(
                member.name,
                model_client=client,
                tools=list(member_tools) or None,
                handoffs=list(member.handoffs) or None,
                description=member.description,
                system_message=member.system_message,
                model_client_stream=spec.stream,
                reflect_on_tool_use=False,
            )
        )
    termination = _termination(spec)
    if spec.kind == "round_robin":
        return RoundRobinGroupChat(
            list(agents), termination_condition=termination, max_turns=spec.max_turns
        ), clients
    if spec.kind == "swarm":
        return Swarm(agents, termination_condition=termination, max_turns=spec.max_turns), clients
    selector = KernelChatClient(
        team, spec.model, info=models[spec.model], max_tokens=spec.selector_max_tokens
    )
    clients.append(selector)
    options: dict[str, Any] = {"selector_prompt": spec.selector_prompt} if spec.selector_prompt else {}
    return SelectorGroupChat(
        list(agents),
        model_client=selector,
        termination_condition=termination,
        max_turns=spec.max_turns,
        allow_repeated_speaker=spec.allow_repeated_speaker,
        **options,
    ), clients


async def _consume(proc: Process, team: Team, task: str) -> tuple[TaskResult, list[TeamMessage]]:
    messages: list[TeamMessage] = []
    result: TaskResult | None = None
    async for item in team.run_stream(task=task):
        if isinstance(item, TaskResult):
            result = item
        elif not isinstance(item, ModelClientStreamingChunkEvent):  # text came as "text" events
            usage = item.models_usage
            message = TeamMessage(
                source=item.source,
                type=type(item).__name__,
                content=item.to_text(),
                prompt_tokens=usage.prompt_tokens if usage else 0,
                completion_tokens=usage.completion_tokens if usage else 0,
            )
            messages.append(message)
            proc.emit("team.message", message.model_dump())
    assert result is not None, "an AutoGen team stream ends with its TaskResult"
    return result, messages


async def team_program(proc: Process, spec: dict[str, Any], task: str) -> dict[str, Any]:
    """Run the AutoGen team `spec` (a `TeamSpec` as JSON) on `task`; return a `TeamResult` as JSON."""
    team_spec = TeamSpec.model_validate(spec)
    names = sorted({name for member in team_spec.members for name in member.tools})
    listed = await proc.syscall("tool.list", names=names)
    if listed.error is not None:
        for member in team_spec.members:
            for name in member.tools:
                if (await proc.syscall("tool.list", names=[name])).error is not None:
                    raise TeamSpecError(
                        f"Member {member.name!r} names tool {name!r}, which this kernel does not have; "
                        "register it with kernel.tools.register(...)."
                    )
    tools: dict[str, ToolSpec] = {spec.name: spec for spec in listed.unwrap()}
    # Known up front: model_info must be the backend's when AutoGen reads it.
    models = {team_spec.model, *(m.model or team_spec.model for m in team_spec.members)}
    infos = {model: (await proc.syscall("llm.info", model=model)).unwrap() for model in models}

    pids: dict[str, int] = {}
    try:
        for member in team_spec.members:
            reply = await proc.syscall(
                "proc.spawn",
                program=MEMBER_PROGRAM,
                name=member.name,
                args={"name": member.name, "team": proc.pid},
                capabilities=member.capabilities,
                budget=member.budget.model_dump() if member.budget else None,
            )
            pids[member.name] = reply.unwrap()
        for pid in pids.values():  # ready: their own first syscalls come before any made for them
            (await proc.syscall("msg.wait", sender=pid)).unwrap()
        members = [_member(proc, pid) for pid in pids.values()]
        team, clients = _build_team(team_spec, proc, members, infos, tools)
        result, messages = await _run_guarded(proc, team, task, clients, members)
    except asyncio.CancelledError:
        await _stop_members(proc, pids, cancelled=True)
        raise
    except BaseException:
        await _stop_members(proc, pids, cancelled=False)
        raise
    await _stop_members(proc, pids, cancelled=False)
    usage = RequestUsage(prompt_tokens=0, completion_tokens=0)
    for client in clients:
        usage = _add(usage, client.total_usage())
    return TeamResult(
        stop_reason=result.stop_reason,
        messages=messages,
        members=pids,
        client_usage={"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens},
        message_usage={
            "prompt_tokens": sum(m.prompt_tokens for m in messages),
            "completion_tokens": sum(m.completion_tokens for m in messages),
        },
    ).model_dump(mode="json")


async def _run_guarded(
    proc: Process, team: Team, task: str, clients: list[KernelChatClient], members: list[Process]
) -> tuple[TaskResult, list[TeamMessage]]:
    """Run the team so that stopping this process stops AutoGen too.

    AutoGen's runtime runs agents in background tasks and, on cancellation, waits for them to
    finish; so a stopped team first stops its model clients (the call in flight fails at once and
    no new one starts), and only then cancels the run.
    """
    runner = asyncio.ensure_future(_consume(proc, team, task))
    try:
        return await asyncio.shield(runner)
    except asyncio.CancelledError:
        for client in clients:
            client.stop("the team process was stopped")
        runner.cancel()
        await asyncio.wait({runner}, timeout=STOP_TIMEOUT_S)
        raise
    except Exception as exc:
        dead = [member for member in members if member.finished.is_set()]
        if not dead:
            raise
        if proc.stopping is not None:
            # The kernel is killing the team and has killed its members first: wait for our own
            # cancellation, so the team ends `killed` like its members.
            await asyncio.Event().wait()
        names = ", ".join(f"{m.name} (pid {m.pid}, {m.state.value})" for m in dead)
        raise MemberDied(f"Team member {names} ended while the team ran: {exc}") from None


async def _stop_members(proc: Process, pids: dict[str, int], *, cancelled: bool) -> None:
    """Let members end with their team: told to stop when it finished, killed when it was stopped."""
    if cancelled and proc.stopping is None:
        return  # the kernel is shutting down: members are interrupted with the team, to resume
    for pid in pids.values():
        try:
            member = proc.child(pid)
        except LookupError:
            continue  # it has ended
        if cancelled:
            await proc.syscall("proc.kill", pid=pid)
        elif not member.finished.is_set():
            await proc.syscall("msg.send", to=pid, body={"stop": True})
            await proc.syscall("proc.wait", pid=pid)


async def run_team(
    kernel: Kernel,
    spec: TeamSpec,
    task: str,
    *,
    name: str = "team",
    capabilities: list[str] | None = None,
    budget: Budget | None = None,
) -> ProcessInfo:
    """Run a team as a process (its members as children) and wait for it; the info's result is
    a `TeamResult` as JSON."""
    pid = await spawn_team(kernel, spec, task, name=name, capabilities=capabilities, budget=budget)
    return await kernel.wait(pid)


async def spawn_team(
    kernel: Kernel,
    spec: TeamSpec,
    task: str,
    *,
    name: str = "team",
    capabilities: list[str] | None = None,
    budget: Budget | None = None,
) -> int:
    """Start a team process and return its pid."""
    return await kernel.spawn(
        TEAM_PROGRAM,
        name=name,
        args={"spec": spec.model_dump(mode="json"), "task": task},
        capabilities=capabilities,
        budget=budget,
    )
