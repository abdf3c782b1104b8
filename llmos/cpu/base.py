"""The CPU device protocol: what every LLM backend (local or remote) offers the kernel.

A backend takes a `ChatRequest` and returns a `ChatResult`. Streaming is not a second code
path: the caller passes `on_text`, which receives each piece of generated text as it appears,
and the same call still returns the complete result (counted once).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, Field

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


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Prompt tokens that were not evaluated again because a cached prefix covered them.
    reused_prompt_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: Usage) -> Usage:
        return Usage(
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
    usage: Usage = Field(default_factory=Usage)
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
