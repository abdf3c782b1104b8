"""OpenAIBackend against a real OpenAI-compatible server: llama.cpp's, with SmolLM2, on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession, web
from loopback import free_port, llama_server

from llmos.config import Config, LLMConfig
from llmos.cpu import LLMBackend, LLMError, open_backend
from llmos.cpu.openai import MAX_REPAIRS, OpenAIBackend
from llmos.kernel.devices import ChatRequest, Message, ToolSpec

pytestmark = pytest.mark.slow

ADD = ToolSpec(
    name="add",
    description="Add two integers.",
    parameters={
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"],
    },
)


@pytest.fixture(scope="module")
def server(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with llama_server(smollm2_path, tmp_path_factory.mktemp("server")) as (url, _):
        yield url


@pytest.fixture
async def backend(server: str) -> AsyncIterator[OpenAIBackend]:
    llm = OpenAIBackend(server, model="smollm2", retry_base_s=0.01)
    yield llm
    await llm.aclose()


def ask(text: str, **kw: Any) -> ChatRequest:
    return ChatRequest(
        messages=[Message(role="user", content=text)], max_tokens=kw.pop("max_tokens", 24), **kw
    )


async def test_chat(backend: OpenAIBackend) -> None:
    assert isinstance(backend, LLMBackend)
    result = await backend.chat(ask("What is the capital of France? Answer in one word."))
    assert result.text.strip()
    assert result.finish_reason in ("stop", "length")
    assert result.usage.prompt_tokens > 0 and 0 < result.usage.completion_tokens <= 24
    assert result.backend == "openai:smollm2"


async def test_streaming_pieces_join_to_the_text_and_usage_is_counted_once(backend: OpenAIBackend) -> None:
    request = ask("Write a sentence about the sea.", max_tokens=20, seed=1)
    pieces: list[str] = []
    streamed = await backend.chat(request, on_text=pieces.append)
    assert len(pieces) > 1
    assert "".join(pieces) == streamed.text
    assert streamed.time_to_first_token_s is not None
    # Not compared with a plain call's text: the server serves the repeated prompt from its KV
    # cache, and llama.cpp's greedy output may differ between a cold and a cached prompt.
    plain = await backend.chat(request)
    # llama.cpp sends no usage chunk, so the backend counts the answer itself, once: a double
    # count would pass max_tokens. (The prompt is approximated: SmolLM2's template adds a system
    # prompt the client cannot see.)
    for result in (streamed, plain):
        assert 0 < result.usage.completion_tokens <= 20
    assert abs(streamed.usage.completion_tokens - backend.count_tokens(streamed.text)) <= 2
    assert 0 < streamed.usage.prompt_tokens <= plain.usage.prompt_tokens


async def test_streaming_usage_from_the_server_is_taken_as_is() -> None:
    """A server that honours stream_options.include_usage: its figures, not ours on top of them."""

    def chunk(delta: dict[str, Any], finish: str | None = None, usage: dict[str, int] | None = None) -> bytes:
        choices = [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish}]
        body = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "m", "choices": choices}
        if usage:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n".encode()

    seen: list[dict[str, Any]] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        seen.append(await request.json())
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for piece in ("Hel", "lo", " there"):
            await response.write(chunk({"content": piece}))
        await response.write(chunk({}, finish="stop"))
        await response.write(
            chunk({}, usage={"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14})
        )
        await response.write(b"data: [DONE]\n\n")
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    llm = OpenAIBackend(f"http://127.0.0.1:{port}/v1", model="m")
    pieces: list[str] = []
    try:
        result = await llm.chat(ask("hi"), on_text=pieces.append)
    finally:
        await llm.aclose()
        await runner.cleanup()
    assert pieces == ["Hel", "lo", " there"] and result.text == "Hello there"
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (11, 3)
    assert seen[0]["stream_options"] == {"include_usage": True}


async def test_logprobs(backend: OpenAIBackend) -> None:
    result = await backend.chat(ask("Say hello.", max_tokens=6, logprobs=True))
    assert result.logprobs and all(t.logprob <= 0 for t in result.logprobs)
    assert "".join(t.token for t in result.logprobs) == result.text


async def test_structured_output_matches_the_schema(backend: OpenAIBackend) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
        "required": ["city", "population"],
    }
    result = await backend.chat(
        ask("Name a city and its population as JSON.", response_schema=schema, max_tokens=60)
    )
    data = json.loads(result.text)
    assert isinstance(data["city"], str) and isinstance(data["population"], int)


async def test_native_tool_call_has_schema_valid_arguments(server: str) -> None:
    llm = OpenAIBackend(server, model="smollm2", native_tool_calls=True)
    try:
        result = await llm.chat(ask("Add 2 and 3.", tools=[ADD], tool_choice="add", max_tokens=40))
    finally:
        await llm.aclose()
    assert result.finish_reason == "tool_calls"
    [call] = result.tool_calls
    assert call.name == "add" and call.id
    assert set(call.arguments) == {"a", "b"} and all(isinstance(v, int) for v in call.arguments.values())


async def test_native_tool_call_streamed(server: str) -> None:
    llm = OpenAIBackend(server, model="smollm2", native_tool_calls=True)
    pieces: list[str] = []
    try:
        result = await llm.chat(
            ask("Add 2 and 3.", tools=[ADD], tool_choice="add", max_tokens=40), on_text=pieces.append
        )
    finally:
        await llm.aclose()
    [call] = result.tool_calls
    assert call.name == "add" and set(call.arguments) == {"a", "b"}
    assert "".join(pieces) == result.text


async def test_cut_off_tool_call_comes_back_as_data(backend: OpenAIBackend) -> None:
    """max_tokens too small for the JSON: the repairs fail too, and the bad output is returned, not raised."""
    request = ask("Add 2 and 3 with the add tool.", tools=[ADD], tool_choice="required", max_tokens=4)
    result = await backend.chat(request)
    assert result.finish_reason == "error" and not result.tool_calls
    assert "[invalid output:" in result.text
    # Every attempt is counted: the first and MAX_REPAIRS repairs, 4 tokens each.
    assert result.usage.completion_tokens == 4 * (MAX_REPAIRS + 1)


async def test_constrained_tool_call_has_schema_valid_arguments(backend: OpenAIBackend) -> None:
    assert not backend.info.native_tool_calls  # llama.cpp's templates do not parse tool calls
    result = await backend.chat(
        ask("Add 2 and 3 with the add tool.", tools=[ADD], tool_choice="required", max_tokens=60)
    )
    [call] = result.tool_calls
    assert call.name == "add"
    assert set(call.arguments) == {"a", "b"} and all(isinstance(v, int) for v in call.arguments.values())
    assert result.finish_reason == "tool_calls"


async def test_count_tokens_uses_the_server_tokenizer(backend: OpenAIBackend) -> None:
    assert backend.count_tokens("") == 0
    assert backend.count_tokens("hello world, how are you") == 6  # SmolLM2's tokenizer, via /extras/tokenize


# ---- failures: a proxy on loopback that fails on purpose --------------------------------


class FlakyProxy:
    """Forwards to the server, except that it first answers `failures` requests with an error:
    an HTTP status, "drop" (close the connection) or "stall" (never answer)."""

    def __init__(self, upstream: str, failures: list[int | str]) -> None:
        self.upstream = upstream.removesuffix("/v1")
        self.failures = list(failures)
        self.seen = 0
        self._released = asyncio.Event()
        self.client_left = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._session: ClientSession | None = None

    async def __aenter__(self) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self._session = ClientSession()
        return f"http://127.0.0.1:{port}/v1"

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None and self._session is not None
        self._released.set()  # let a stalled handler finish, so the server stops at once
        await self._session.close()
        await self._runner.cleanup()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        is_chat = request.path.endswith("/chat/completions")
        self.seen += is_chat
        if self.failures and is_chat:
            failure = self.failures.pop(0)
            if failure == "drop":
                assert request.transport is not None
                request.transport.close()
                return web.Response(status=500)
            if failure == "stall":
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._released.wait(), 30)
            return web.json_response({"error": {"message": "server busy (test)"}}, status=int(failure))
        assert self._session is not None
        headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
        async with self._session.request(
            request.method, self.upstream + request.path, data=body, headers=headers
        ) as up:
            response = web.StreamResponse(
                status=up.status, headers={"Content-Type": up.headers["Content-Type"]}
            )
            await response.prepare(request)
            try:
                async for chunk in up.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
            except ConnectionError:
                self.client_left.set()
            return response


@pytest.mark.parametrize("failures", [[503], [429, 502], ["drop"]])
async def test_retry_succeeds_after_the_server_fails(server: str, failures: list[int | str]) -> None:
    proxy = FlakyProxy(server, failures)
    async with proxy as url:
        llm = OpenAIBackend(url, model="smollm2", retry_base_s=0.01)
        try:
            result = await llm.chat(ask("Say hello.", max_tokens=8))
        finally:
            await llm.aclose()
    assert result.text.strip()
    assert proxy.seen == len(failures) + 1 == llm.requests_sent


async def test_streaming_request_is_retried_before_any_text(server: str) -> None:
    proxy = FlakyProxy(server, [503])
    async with proxy as url:
        llm = OpenAIBackend(url, model="smollm2", retry_base_s=0.01)
        pieces: list[str] = []
        try:
            result = await llm.chat(ask("Say hello.", max_tokens=8), on_text=pieces.append)
        finally:
            await llm.aclose()
    assert "".join(pieces) == result.text and result.text
    assert proxy.seen == 2


async def test_cancelling_a_streamed_chat_drops_the_connection(server: str) -> None:
    proxy = FlakyProxy(server, [])
    async with proxy as url:
        llm = OpenAIBackend(url, model="smollm2")
        first_piece = asyncio.Event()
        task = asyncio.create_task(
            llm.chat(ask("Tell a long story.", max_tokens=400), on_text=lambda _: first_piece.set())
        )
        await asyncio.wait_for(first_piece.wait(), 60)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The server side sees the client go away (so llama.cpp stops generating).
        await asyncio.wait_for(proxy.client_left.wait(), 60)
        await llm.aclose()


async def test_gives_up_after_max_retries_with_one_sentence(server: str) -> None:
    proxy = FlakyProxy(server, [503, 503, 503])
    async with proxy as url:
        llm = OpenAIBackend(url, model="smollm2", max_retries=1, retry_base_s=0.01)
        with pytest.raises(
            LLMError, match=r"kept failing with HTTP 503 after 2 attempts \(server busy \(test\)\)"
        ):
            await llm.chat(ask("Say hello."))
        await llm.aclose()
    assert proxy.seen == 2


async def test_timeout_is_a_clear_error(server: str) -> None:
    async with FlakyProxy(server, ["stall"]) as url:
        llm = OpenAIBackend(url, model="smollm2", timeout_s=0.5, max_retries=0)
        with pytest.raises(LLMError, match=r"did not answer within 0.5 s; .* raise llm.timeout_s"):
            await llm.chat(ask("Say hello."))
        await llm.aclose()


async def test_server_down_is_one_sentence_with_the_fix() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    llm = OpenAIBackend(url, model="smollm2", max_retries=2, retry_base_s=0.01)
    with pytest.raises(LLMError) as caught:
        await llm.chat(ask("hello"))
    await llm.aclose()
    assert (
        str(caught.value) == f"No OpenAI-compatible server answers at {url}; start one or set llm.base_url."
    )
    assert llm.requests_sent == 3
    assert llm.count_tokens("four words right here") == 6  # no tokenizer to ask: ~len/4


# ---- the factory --------------------------------------------------------------------------


async def test_open_backend_picks_the_openai_backend(server: str, tmp_path: Path) -> None:
    config = Config(home=tmp_path, llm=LLMConfig(base_url=server, model="smollm2", n_ctx=2048))
    llm = open_backend(config)
    assert isinstance(llm, OpenAIBackend) and llm.info.context_length == 2048
    await llm.aclose()
    llm = open_backend(Config(home=tmp_path), "openai:gpt-4o-mini")
    assert isinstance(llm, OpenAIBackend) and llm.model == "gpt-4o-mini" and llm.info.native_tool_calls
    await llm.aclose()
    with pytest.raises(LLMError, match="names no model"):
        open_backend(Config(home=tmp_path), "openai:")


async def test_open_backend_runs_catalog_models_and_gguf_files_locally(
    smollm2_path: Path, tmp_path: Path
) -> None:
    from llmos.cpu.llamacpp import LlamaCppBackend

    config = Config(home=tmp_path, models_dir=smollm2_path.parent.parent, llm=LLMConfig(n_ctx=512))
    llm = open_backend(config, "smollm2-135m-instruct")
    assert isinstance(llm, LlamaCppBackend) and llm.name == "smollm2-135m-instruct"
    await llm.aclose()
    llm = open_backend(config, str(smollm2_path))
    assert isinstance(llm, LlamaCppBackend) and llm.name == smollm2_path.stem
    await llm.aclose()
    with pytest.raises(LLMError, match="Unknown model 'gpt-17'; run `llmos models list`"):
        open_backend(config, "gpt-17")


async def test_a_pool_spreads_calls_over_servers_and_survives_one_going_down(
    server: str, smollm2_path: Path, tmp_path: Path
) -> None:
    from llmos.cpu.pool import ServerPool

    with llama_server(smollm2_path, tmp_path) as (second, second_process):
        config = Config(home=tmp_path, llm=LLMConfig(model="openai:smollm2", base_url=f"{server}, {second}"))
        pool = open_backend(config)
        assert isinstance(pool, ServerPool)
        request = ChatRequest(messages=[Message(role="user", content="Say hi.")], max_tokens=4)
        results = await asyncio.gather(*(pool.chat(request) for _ in range(4)))
        assert all(r.finish_reason in ("stop", "length") and r.usage.prompt_tokens > 0 for r in results)
        assert [s.served for s in pool.servers] == [2, 2]  # the least busy server gets each call

        second_process.kill()
        second_process.wait()
        results = await asyncio.gather(*(pool.chat(request) for _ in range(3)))
        assert len(results) == 3 and pool.servers[0].served == 5
        assert not pool.servers[1].healthy
        await pool.aclose()

    everything_down = ServerPool([OpenAIBackend(second, model="smollm2", max_retries=0)])
    with pytest.raises(LLMError, match="No server of the pool"):
        await everything_down.chat(request)
