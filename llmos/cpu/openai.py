"""A CPU backend for any OpenAI-compatible server (OpenAI, llama.cpp's server, vLLM, Ollama...).

Two ways to get tool calls out of a model:
- native: the server takes `tools` and returns `tool_calls` (OpenAI proper does this well);
- constrained: the tools are described in the system prompt and the answer is forced to match a
  JSON schema through `response_format` (llmos.cpu.toolcalls builds the schema and parses the
  answer). This works with servers whose chat templates do not parse tool calls, e.g. llama.cpp.

Retries: 429, 5xx, connection errors and timeouts are retried with exponential backoff by our own
loop (the client's is off), so a retry never sends text to `on_text` twice: a stream that already
produced text is not retried.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import httpx
import openai
from openai import AsyncOpenAI, AsyncStream
from openai.types.chat import ChatCompletionChunk
from pydantic import SecretStr

from llmos.cpu import toolcalls
from llmos.cpu.toolcalls import MAX_REPAIRS
from llmos.kernel.devices import (
    ChatRequest,
    ChatResult,
    FinishReason,
    LLMError,
    Message,
    ModelInfo,
    TextCallback,
    TokenLogprob,
    TokenUsage,
    ToolCall,
)

T = TypeVar("T")

# Status codes worth another try: the server is busy or had a transient failure.
RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
MAX_BACKOFF_S = 8.0
# Rough characters per token for text in European languages and code, when the server cannot tell.
CHARS_PER_TOKEN = 4
_TOKEN_CACHE_SIZE = 512
# Role markers and separators a chat template puts around each message (ChatML: 5, OpenAI: 3-4).
TEMPLATE_TOKENS_PER_MESSAGE = 5

ResponseFormatMode = Literal["json_schema", "json_object"]


class _Attempt:
    """Output of one request: enough to build a ChatResult."""

    def __init__(self) -> None:
        self.text = ""
        self.tool_calls: list[ToolCall] = []
        self.finish_reason: str | None = None
        self.usage: TokenUsage | None = None
        self.logprobs: list[TokenLogprob] | None = None
        self.pieces = 0
        self.started = time.perf_counter()
        self.first_token_at: float | None = None


class OpenAIBackend:
    """`LLMBackend` over the chat completions API of an OpenAI-compatible server."""

    def __init__(
        self,
        base_url: str,
        *,
        model: str,
        api_key: SecretStr | str | None = None,
        timeout_s: float = 120,
        max_retries: int = 3,
        context_length: int = 4096,
        native_tool_calls: bool | None = None,
        retry_base_s: float = 0.5,
    ) -> None:
        """`native_tool_calls` None uses native tool calls only for api.openai.com, whose models
        are trained for them; other servers get schema-constrained JSON, which works everywhere
        `response_format` does."""
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.name = f"openai:{model}"
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.retry_base_s = retry_base_s
        host = urlsplit(self.base_url).hostname or ""
        self.native_tool_calls = (
            host.endswith("openai.com") if native_tool_calls is None else native_tool_calls
        )
        self._info = ModelInfo(
            name=model,
            context_length=context_length,
            native_tool_calls=self.native_tool_calls,
            structured_output=True,
            logprobs=True,
            family="openai-compatible",
        )
        self._api_key = SecretStr(api_key) if isinstance(api_key, str) else api_key
        # Servers that ignore the key still need a non-empty one for the client to start.
        self._client = AsyncOpenAI(
            base_url=self.base_url, api_key=self._key() or "not-needed", timeout=timeout_s, max_retries=0
        )
        # OpenAI's json_schema first; llama.cpp's server only knows json_object with a "schema".
        self._format_mode: ResponseFormatMode = "json_schema"
        self._server_tokenizes: bool | None = None  # does the server tokenize? None: not asked yet
        self._token_cache: OrderedDict[str, int] = OrderedDict()
        # Counted on the event loop and on worker threads (see `_stream`).
        self._token_lock = threading.Lock()
        self.requests_sent = 0

    # ---- LLMBackend ----------------------------------------------------------------------

    @property
    def info(self) -> ModelInfo:
        return self._info

    async def chat(self, request: ChatRequest, on_text: TextCallback | None = None) -> ChatResult:
        started = time.perf_counter()
        use_tools = toolcalls.uses_tools(request)
        if use_tools and self.native_tool_calls:
            attempt = await self._send(self._native_body(request), on_text)
            result = self._result(attempt, attempt.text, attempt.tool_calls)
        elif use_tools or request.response_schema is not None:
            result = await self._constrained_chat(request, on_text)
        else:
            attempt = await self._send(self._plain_body(request), on_text)
            result = self._result(attempt, attempt.text, [])
        result.duration_s = time.perf_counter() - started
        return result

    def count_tokens(self, text: str) -> int:
        """Exact when the server tokenizes for us (llama.cpp's /extras/tokenize), else ~len/4."""
        if not text:
            return 0
        cached = self._cached_count(text)
        if cached is not None:
            return cached
        count: int | None = None
        if self._server_tokenizes is not False:
            try:
                response = httpx.post(
                    self._tokenize_endpoint,
                    json={"input": text},
                    headers=self._auth_headers(),
                    timeout=self._tokenize_timeout,
                )
                count = self._read_count(response)
            except httpx.HTTPError:
                pass
        return self._remember_count(text, count)

    async def answers(self, timeout_s: float) -> bool:
        """Health check: the server lists its models (to us: a server that wants a key gets it)."""
        try:
            await self._client.models.list(timeout=timeout_s)
        except (openai.OpenAIError, ValueError):  # ValueError: a 200 that is not JSON
            return False
        return True

    async def aclose(self) -> None:
        await self._client.close()

    def _key(self) -> str:
        """The API key's text, read only where a request or a message needs it."""
        return self._api_key.get_secret_value() if self._api_key is not None else ""

    def _auth_headers(self) -> dict[str, str]:
        """For the requests that bypass the OpenAI client (llama.cpp's tokenizer)."""
        key = self._key()
        return {"Authorization": f"Bearer {key}"} if key else {}

    # ---- request bodies ------------------------------------------------------------------

    def _common(self, request: ChatRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "temperature": request.temperature,
            "top_p": request.top_p,
        }
        if request.max_tokens is not None:
            body["max_tokens"] = request.max_tokens
        if request.seed is not None:
            body["seed"] = request.seed
        if request.stop:
            body["stop"] = request.stop
        if request.logprobs:
            # llama.cpp's server returns logprobs only when top_logprobs asks for some.
            body["logprobs"] = True
            body["top_logprobs"] = 1
        return body

    def _messages(self, request: ChatRequest) -> list[Message]:
        """What the model is shown. Without native tool calls the tools go into the system prompt
        and calls and results become text: servers whose chat templates drop tool roles
        (llama.cpp's do) would otherwise lose them."""
        return list(request.messages) if self.native_tool_calls else toolcalls.prompt_messages(request)

    def _plain_body(self, request: ChatRequest) -> dict[str, Any]:
        return {**self._common(request), "messages": [_wire_message(m) for m in self._messages(request)]}

    def _native_body(self, request: ChatRequest) -> dict[str, Any]:
        body = self._plain_body(request)
        body["tools"] = [
            {
                "type": "function",
                "function": {"name": t.name, "description": t.description, "parameters": t.parameters},
            }
            for t in request.tools
        ]
        choice = request.tool_choice
        body["tool_choice"] = (
            choice
            if choice in ("auto", "required", "none")
            else {"type": "function", "function": {"name": choice}}
        )
        return body

    def _constrained_body(self, request: ChatRequest, messages: list[Message]) -> dict[str, Any]:
        schema = toolcalls.constrained_schema(request)
        body = {**self._common(request), "messages": [_wire_message(m) for m in messages]}
        if schema is not None:
            body["response_format"] = self._response_format(schema)
        return body

    def _response_format(self, schema: dict[str, Any]) -> dict[str, Any]:
        if self._format_mode == "json_schema":
            return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
        return {"type": "json_object", "schema": schema}

    # ---- constrained tool calls and structured output ------------------------------------

    async def _constrained_chat(self, request: ChatRequest, on_text: TextCallback | None) -> ChatResult:
        """Ask for JSON matching the schema, with up to MAX_REPAIRS retries that show the model what
        was wrong. Text goes to `on_text` once parsed, as one piece: raw JSON is not worth watching."""
        messages = self._messages(request)
        usage = TokenUsage()
        for repair in range(MAX_REPAIRS + 1):
            attempt = await self._send_constrained(request, messages)
            usage += attempt.usage or TokenUsage()
            try:
                text, calls = toolcalls.parse_output(attempt.text, request)
            except toolcalls.OutputInvalid as exc:
                if repair == MAX_REPAIRS:
                    # A model error, not a user error: the bad output goes back as data.
                    failed = self._result(attempt, toolcalls.invalid_output_text(attempt.text, exc), [])
                    failed.finish_reason = "error"
                    failed.usage = usage
                    return failed
                messages = self._messages(toolcalls.repair_request(request, attempt.text, str(exc)))
                continue
            if text and on_text is not None:
                on_text(text)
            result = self._result(attempt, text, calls)
            result.usage = usage
            return result
        raise AssertionError("unreachable: the repair loop always returns")

    async def _send_constrained(self, request: ChatRequest, messages: list[Message]) -> _Attempt:
        try:
            return await self._send(self._constrained_body(request, messages), None)
        except _FormatRejected:
            self._format_mode = "json_object"
            return await self._send(self._constrained_body(request, messages), None)

    # ---- sending, streaming, retrying ----------------------------------------------------

    async def _send(self, body: dict[str, Any], on_text: TextCallback | None) -> _Attempt:
        if on_text is None:
            return await self._with_retries(lambda: self._complete(body), lambda: False)
        attempt_box: list[_Attempt] = []

        async def run() -> _Attempt:
            attempt = _Attempt()
            attempt_box[:] = [attempt]
            return await self._stream(body, attempt, on_text)

        # Once text reached the caller, a retry would show it twice: give up instead.
        return await self._with_retries(run, lambda: bool(attempt_box and attempt_box[0].pieces))

    async def _with_retries(self, call: Callable[[], Awaitable[T]], streamed: Callable[[], bool]) -> T:
        attempt = 0
        while True:
            self.requests_sent += 1
            try:
                return await call()
            except openai.APIStatusError as exc:
                if _format_rejected(exc, self._format_mode):
                    raise _FormatRejected() from exc
                if exc.status_code not in RETRY_STATUS or attempt >= self.max_retries or streamed():
                    raise self._status_error(exc) from None
                delay = _retry_after(exc.response.headers.get("retry-after")) or self._backoff(attempt)
            except openai.APIConnectionError as exc:  # timeouts included
                if attempt >= self.max_retries or streamed():
                    raise self._connection_error(exc) from None
                delay = self._backoff(attempt)
            attempt += 1
            await asyncio.sleep(delay)

    def _backoff(self, attempt: int) -> float:
        return float(min(MAX_BACKOFF_S, self.retry_base_s * 2**attempt))

    async def _complete(self, body: dict[str, Any]) -> _Attempt:
        response = await self._client.chat.completions.create(**body)
        attempt = _Attempt()
        if response.usage is not None:
            attempt.usage = TokenUsage(
                prompt_tokens=response.usage.prompt_tokens, completion_tokens=response.usage.completion_tokens
            )
        if not response.choices:
            raise LLMError(f"The server at {self.base_url} returned no answer; check its logs.")
        choice = response.choices[0]
        attempt.finish_reason = choice.finish_reason
        attempt.text = choice.message.content or ""
        for call in choice.message.tool_calls or []:
            function = getattr(call, "function", None)
            if function is not None:
                attempt.tool_calls.append(_tool_call(call.id, function.name, function.arguments))
        if choice.logprobs is not None and choice.logprobs.content is not None:
            attempt.logprobs = [
                TokenLogprob(token=t.token, logprob=t.logprob) for t in choice.logprobs.content
            ]
        return attempt

    async def _stream(self, body: dict[str, Any], attempt: _Attempt, on_text: TextCallback) -> _Attempt:
        stream: AsyncStream[ChatCompletionChunk] = await self._client.chat.completions.create(
            **body, stream=True, stream_options={"include_usage": True}
        )
        pending_calls: dict[int, dict[str, str]] = {}
        # Closing the stream on the way out, a cancelled task included, drops the connection:
        # that is how a server learns to stop generating.
        async with stream:
            async for chunk in stream:
                if chunk.usage is not None:
                    attempt.usage = TokenUsage(
                        prompt_tokens=chunk.usage.prompt_tokens,
                        completion_tokens=chunk.usage.completion_tokens,
                    )
                for choice in chunk.choices:
                    delta = choice.delta
                    if delta.content:
                        if attempt.first_token_at is None:
                            attempt.first_token_at = time.perf_counter()
                        attempt.text += delta.content
                        attempt.pieces += 1
                        on_text(delta.content)
                    for call in delta.tool_calls or []:
                        slot = pending_calls.setdefault(call.index, {"id": "", "name": "", "arguments": ""})
                        slot["id"] = call.id or slot["id"]
                        if call.function is not None:
                            # OpenAI sends the name in the first delta only; llama.cpp repeats it in each.
                            slot["name"] = slot["name"] or call.function.name or ""
                            slot["arguments"] += call.function.arguments or ""
                    if choice.logprobs is not None and choice.logprobs.content is not None:
                        attempt.logprobs = attempt.logprobs or []
                        attempt.logprobs.extend(
                            TokenLogprob(token=t.token, logprob=t.logprob) for t in choice.logprobs.content
                        )
                    if choice.finish_reason is not None:
                        attempt.finish_reason = choice.finish_reason
        attempt.tool_calls = [
            _tool_call(slot["id"], slot["name"], slot["arguments"])
            for _, slot in sorted(pending_calls.items())
        ]
        if attempt.usage is None:
            # The server did not send a usage chunk: count ourselves, once, after the stream.
            messages = body["messages"]
            prompt = "\n".join(m.get("content") or "" for m in messages)
            # On a thread: counting may ask the server's tokenizer, which must not block the loop.
            prompt_count, completion_count = await asyncio.to_thread(
                lambda: (self.count_tokens(prompt), self.count_tokens(attempt.text))
            )
            attempt.usage = TokenUsage(
                # The chat template adds a few tokens around each message.
                prompt_tokens=prompt_count + TEMPLATE_TOKENS_PER_MESSAGE * len(messages),
                completion_tokens=completion_count,
            )
        return attempt

    def _result(self, attempt: _Attempt, text: str, calls: list[ToolCall]) -> ChatResult:
        finish: FinishReason = _finish_reason(attempt.finish_reason)
        if calls:
            finish = "tool_calls"
        return ChatResult(
            text=text,
            tool_calls=calls,
            finish_reason=finish,
            usage=attempt.usage or TokenUsage(),
            model=self.model,
            backend=self.name,
            logprobs=attempt.logprobs,
            time_to_first_token_s=None
            if attempt.first_token_at is None
            else attempt.first_token_at - attempt.started,
        )

    # ---- errors --------------------------------------------------------------------------

    def _connection_error(self, exc: Exception) -> LLMError:
        if isinstance(exc, openai.APITimeoutError):
            return LLMError(
                f"The OpenAI-compatible server at {self.base_url} did not answer within "
                f"{self.timeout_s:g} s; check that it is not overloaded or raise llm.timeout_s."
            )
        return LLMError(
            f"No OpenAI-compatible server answers at {self.base_url}; start one or set llm.base_url."
        )

    def _status_error(self, exc: openai.APIStatusError) -> LLMError:
        detail = _error_detail(exc)
        if key := self._key():  # a server may quote the key it refused
            detail = detail.replace(key, "**********")
        if exc.status_code in (401, 403):
            return LLMError(f"The server at {self.base_url} refused the API key ({detail}); set llm.api_key.")
        if exc.status_code == 404:
            return LLMError(
                f"The server at {self.base_url} has no model '{self.model}' or no chat API ({detail}); "
                "check llm.model and llm.base_url (it usually ends in /v1)."
            )
        if exc.status_code in RETRY_STATUS:
            return LLMError(
                f"The server at {self.base_url} kept failing with HTTP {exc.status_code} after "
                f"{self.max_retries + 1} attempts ({detail}); check its logs or try again later."
            )
        return LLMError(
            f"The server at {self.base_url} rejected the request with HTTP {exc.status_code} ({detail})."
        )

    # ---- token counting ------------------------------------------------------------------

    @property
    def _tokenize_endpoint(self) -> str:
        return f"{self.base_url.removesuffix('/v1')}/extras/tokenize/count"

    @property
    def _tokenize_timeout(self) -> float:
        return min(5.0, self.timeout_s)

    def _read_count(self, response: httpx.Response) -> int | None:
        try:
            response.raise_for_status()
            return int(response.json()["count"])
        except (httpx.HTTPError, KeyError, ValueError, TypeError):
            return None

    def _cached_count(self, text: str) -> int | None:
        with self._token_lock:
            count = self._token_cache.get(text)
            if count is not None:
                self._token_cache.move_to_end(text)
            return count

    def _remember_count(self, text: str, count: int | None) -> int:
        if count is None:
            # No tokenizer endpoint (not llama.cpp) or the server is away: approximate from now on.
            self._server_tokenizes = False
            return max(1, -(-len(text) // CHARS_PER_TOKEN))
        self._server_tokenizes = True
        with self._token_lock:
            self._token_cache[text] = count
            if len(self._token_cache) > _TOKEN_CACHE_SIZE:
                self._token_cache.popitem(last=False)
        return count


class _FormatRejected(Exception):
    """The server does not know `response_format` type json_schema."""


def _format_rejected(exc: openai.APIStatusError, mode: ResponseFormatMode) -> bool:
    # llama.cpp's server answers 500 with a pydantic error naming response_format; others 400/422.
    if mode != "json_schema" or exc.status_code not in (400, 422, 500):
        return False
    message = str(exc)
    return "response_format" in message and "json_schema" in message


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (the date form is rare from APIs: back off instead)."""
    try:
        return min(MAX_BACKOFF_S, max(0.0, float(value))) if value else None
    except ValueError:
        return None


def _error_detail(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        message = body.get("message") or body.get("detail") or body.get("error")
        if isinstance(message, dict):
            message = message.get("message")
        if message:
            return str(message).strip().splitlines()[0][:200]
    return str(exc).strip().splitlines()[0][:200]


def _finish_reason(raw: str | None) -> FinishReason:
    if raw == "length":
        return "length"
    if raw in ("tool_calls", "function_call"):
        return "tool_calls"
    return "stop"


def _tool_call(call_id: str | None, name: str, arguments: str) -> ToolCall:
    try:
        parsed = json.loads(arguments) if arguments.strip() else {}
    except json.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict):
        # The model wrote arguments that are not a JSON object: keep them so the tool layer can
        # answer with an error the model can act on.
        parsed = {"_invalid_arguments": arguments}
    return ToolCall(id=call_id or f"call_{name}", name=name, arguments=parsed)


def _wire_message(message: Message) -> dict[str, Any]:
    out: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.name is not None and message.role in ("user", "system"):
        out["name"] = message.name
    if message.role == "tool":
        out["tool_call_id"] = message.tool_call_id or ""
    if message.tool_calls:
        out["tool_calls"] = [
            {
                "id": c.id,
                "type": "function",
                "function": {"name": c.name, "arguments": json.dumps(c.arguments)},
            }
            for c in message.tool_calls
        ]
    return out


__all__ = ["OpenAIBackend"]
