"""Secrets stay secret: the LLM API key and the kernel's tool secrets never reach an output, a log
or the journal, and still reach the server that needs them. OPENAI_API_KEY and OPENAI_BASE_URL
are honoured the way OpenAI clients honour them, below the config file and LLMOS_* variables."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from loopback import free_port
from typer.testing import CliRunner

from llmos import Kernel
from llmos.cli import app
from llmos.config import ConfigError, load_config
from llmos.cpu import LLMError, open_backend
from llmos.cpu.openai import OpenAIBackend
from llmos.cpu.pool import ServerPool
from llmos.kernel import Process
from llmos.kernel.devices import ChatRequest, Message
from llmos.tools import ToolContext, tool

KEY = "sk-llmos-test-9c41d2e7b3"
OTHER_KEY = "sk-other-test-51aa07f6"


def hidden_everywhere(key: str, text: str) -> bool:
    """Neither the key nor its base64 (an Authorization: Basic header, say) is in `text`."""
    return key not in text and base64.b64encode(key.encode()).decode() not in text


# ---- the config: `llmos config show`, repr, dumps --------------------------------------------


@pytest.mark.parametrize("source", ["file", "LLMOS_LLM__API_KEY", "OPENAI_API_KEY"])
def test_config_show_says_the_key_is_set_and_never_prints_it(
    source: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    file = tmp_path / "config.toml"
    file.write_text(f'[llm]\napi_key = "{KEY}"\n' if source == "file" else "")
    monkeypatch.setenv("LLMOS_CONFIG", str(file))
    if source != "file":
        monkeypatch.setenv(source, KEY)
    shown = CliRunner().invoke(app, ["config", "show"])
    assert shown.exit_code == 0, shown.output
    assert "# api_key = (set, hidden)" in shown.output
    assert hidden_everywhere(KEY, shown.output)

    config = load_config()
    assert config.llm.api_key is not None and config.llm.api_key.get_secret_value() == KEY
    for text in (
        repr(config),
        str(config),
        repr(config.llm),
        config.model_dump_json(),
        json.dumps(config.model_dump(mode="json")),
        str(config.model_dump()),
    ):
        assert hidden_everywhere(KEY, text)


def test_config_show_says_when_no_key_is_set(tmp_path: Path) -> None:
    file = tmp_path / "config.toml"
    file.write_text("")
    shown = CliRunner().invoke(app, ["config", "show"], env={"LLMOS_CONFIG": str(file)})
    assert shown.exit_code == 0 and "# api_key = (unset)" in shown.output


def test_a_key_of_the_wrong_type_is_reported_without_its_value(tmp_path: Path) -> None:
    file = tmp_path / "config.toml"
    file.write_text("[llm]\napi_key = 918273645546\n")
    with pytest.raises(ConfigError, match=r"Bad config value llm\.api_key=\(hidden\)") as caught:
        load_config(env={"LLMOS_CONFIG": str(file)})
    assert "918273645546" not in str(caught.value)


# ---- OPENAI_API_KEY and OPENAI_BASE_URL --------------------------------------------------------


@pytest.mark.parametrize(
    ("openai_env", "in_file", "llmos_env", "expected"),
    [
        (KEY, None, None, KEY),  # OPENAI_API_KEY alone is used
        (OTHER_KEY, KEY, None, KEY),  # the file beats OPENAI_API_KEY
        (OTHER_KEY, OTHER_KEY, KEY, KEY),  # LLMOS_LLM__API_KEY beats both
        ("", None, None, None),  # an empty variable sets nothing
    ],
)
def test_key_precedence_is_openai_then_file_then_llmos(
    tmp_path: Path, openai_env: str, in_file: str | None, llmos_env: str | None, expected: str | None
) -> None:
    file = tmp_path / "config.toml"
    file.write_text(f'[llm]\napi_key = "{in_file}"\n' if in_file else "")
    env = {"LLMOS_CONFIG": str(file), "OPENAI_API_KEY": openai_env}
    if llmos_env:
        env["LLMOS_LLM__API_KEY"] = llmos_env
    key = load_config(env=env).llm.api_key
    assert (key.get_secret_value() if key else None) == expected


async def test_openai_base_url_is_where_openai_models_go_and_the_local_model_stays_local(
    tmp_path: Path,
) -> None:
    file = tmp_path / "config.toml"
    file.write_text("")
    env = {"LLMOS_CONFIG": str(file), "OPENAI_BASE_URL": "http://127.0.0.1:9/v1"}
    config = load_config(env=env)
    assert config.llm.base_url is None and config.llm.openai_base_url == "http://127.0.0.1:9/v1"
    backend = open_backend(config, "openai:gpt-4o-mini")
    assert isinstance(backend, OpenAIBackend) and backend.base_url == "http://127.0.0.1:9/v1"
    await backend.aclose()
    # A name that is not openai:NAME is still looked up in the local catalog, not sent to the server.
    with pytest.raises(LLMError, match="Unknown model 'no-such-model'"):
        open_backend(config, "no-such-model")

    # The file and LLMOS_LLM__OPENAI_BASE_URL win over OPENAI_BASE_URL; without any: api.openai.com.
    file.write_text('[llm]\nopenai_base_url = "http://127.0.0.1:10/v1"\n')
    assert load_config(env=env).llm.openai_base_url == "http://127.0.0.1:10/v1"
    env["LLMOS_LLM__OPENAI_BASE_URL"] = "http://127.0.0.1:11/v1"
    assert load_config(env=env).llm.openai_base_url == "http://127.0.0.1:11/v1"
    file.write_text("")
    assert load_config(env={"LLMOS_CONFIG": str(file)}).llm.openai_base_url == "https://api.openai.com/v1"
    # llm.base_url still sends every model to its server(s).
    env = {"LLMOS_CONFIG": str(file), "LLMOS_LLM__BASE_URL": "http://127.0.0.1:12/v1"}
    backend = open_backend(load_config(env=env), "openai:m")
    assert isinstance(backend, OpenAIBackend) and backend.base_url == "http://127.0.0.1:12/v1"
    await backend.aclose()


# ---- the key reaches the server, and only the server ---------------------------------------


@dataclass
class KeyedServer:
    """An OpenAI-compatible server on loopback that wants `Bearer KEY` and records what it got."""

    url: str
    seen: list[tuple[str, str]] = field(default_factory=list)  # (path, Authorization header)


@pytest.fixture
async def keyed_server() -> AsyncIterator[KeyedServer]:
    server = KeyedServer(url="")

    def authorized(request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        server.seen.append((request.path, header))
        return header == f"Bearer {KEY}"

    def refused(request: web.Request) -> web.Response:
        # What OpenAI does: quote the key it was given in the error.
        got = request.headers.get("Authorization", "").removeprefix("Bearer ")
        return web.json_response({"error": {"message": f"Incorrect API key provided: {got}"}}, status=401)

    async def chat(request: web.Request) -> web.StreamResponse:
        if not authorized(request):
            return refused(request)
        if (await request.json()).get("stream"):
            chunk = {
                "id": "c1",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": "m",
                "choices": [{"index": 0, "delta": {"content": "hello"}, "finish_reason": "stop"}],
            }
            streamed = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await streamed.prepare(request)
            await streamed.write(f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode())
            return streamed
        answer = {"role": "assistant", "content": "hello"}
        return web.json_response(
            {
                "id": "c1",
                "object": "chat.completion",
                "created": 0,
                "model": "m",
                "choices": [{"index": 0, "message": answer, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
            }
        )

    async def models(request: web.Request) -> web.Response:
        if not authorized(request):
            return refused(request)
        return web.json_response({"object": "list", "data": [{"id": "m", "object": "model", "created": 0}]})

    async def tokenize(request: web.Request) -> web.Response:
        if not authorized(request):
            return refused(request)
        return web.json_response({"count": 42})

    application = web.Application()
    application.router.add_post("/v1/chat/completions", chat)
    application.router.add_get("/v1/models", models)
    application.router.add_post("/extras/tokenize/count", tokenize)
    runner = web.AppRunner(application)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    server.url = f"http://127.0.0.1:{port}/v1"
    try:
        yield server
    finally:
        await runner.cleanup()


HI = ChatRequest(messages=[Message(role="user", content="hi")], max_tokens=4)


async def test_the_openai_backend_sends_the_key_from_openai_env_variables(
    keyed_server: KeyedServer, tmp_path: Path
) -> None:
    (tmp_path / "config.toml").write_text("")
    env = {
        "LLMOS_CONFIG": str(tmp_path / "config.toml"),
        "OPENAI_API_KEY": KEY,
        "OPENAI_BASE_URL": keyed_server.url,
    }
    llm = open_backend(load_config(env=env), "openai:m")
    try:
        result = await llm.chat(HI)
        assert result.text == "hello"
        # llama.cpp's tokenizer endpoint gets the key too (on a thread: the server shares this loop)
        assert await asyncio.to_thread(llm.count_tokens, "some text") == 42
    finally:
        await llm.aclose()
    assert ("/v1/chat/completions", f"Bearer {KEY}") in keyed_server.seen
    assert ("/extras/tokenize/count", f"Bearer {KEY}") in keyed_server.seen


async def test_a_refused_key_is_reported_without_the_key(keyed_server: KeyedServer) -> None:
    llm = OpenAIBackend(keyed_server.url, model="m", api_key=OTHER_KEY, max_retries=0)
    try:
        with pytest.raises(LLMError, match="refused the API key") as caught:
            await llm.chat(HI)
    finally:
        await llm.aclose()
    assert hidden_everywhere(OTHER_KEY, str(caught.value))


async def test_the_pool_health_check_sends_the_key(keyed_server: KeyedServer) -> None:
    backends = [OpenAIBackend(keyed_server.url, model="m", api_key=KEY, max_retries=0) for _ in range(2)]
    pool = ServerPool(backends)
    try:
        for server in pool.servers:
            server.down_until = float("inf")  # both set aside: the pool must ask them again
        result = await pool.chat(HI)
    finally:
        await pool.aclose()
    assert result.text == "hello"
    assert ("/v1/models", f"Bearer {KEY}") in keyed_server.seen


# ---- kernel secrets: never in a tool result, the journal or `llmos log` -----------------------


async def test_a_tool_error_that_quotes_its_secret_reaches_no_journal_or_output(
    llmos_home: Path,
) -> None:
    async def missing(request: web.Request) -> web.Response:
        return web.Response(status=404, text="no such item")

    application = web.Application()
    application.router.add_get("/items/{item}", missing)
    runner = web.AppRunner(application)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()

    @tool(secrets=["INVENTORY_KEY"])
    async def fetch_inventory(item: str, ctx: ToolContext) -> Any:
        """Look an item up in the inventory API.

        Args:
            item: the item's name
        """
        async with httpx.AsyncClient(trust_env=False) as client:
            response = await client.get(
                f"http://127.0.0.1:{port}/items/{item}", params={"api_key": ctx.secrets["INVENTORY_KEY"]}
            )
            response.raise_for_status()  # the 404's message quotes the URL, the key in its query included
            return response.json()

    async def look_up(proc: Process) -> Any:
        return (await proc.syscall("tool.call", name="fetch_inventory", arguments={"item": "lamp"})).unwrap()

    try:
        async with Kernel(secrets={"INVENTORY_KEY": KEY}) as kernel:
            kernel.tools.register(fetch_inventory)
            pid = await kernel.spawn(look_up, capabilities=["tool:fetch_inventory"])
            info = await kernel.wait(pid, timeout_s=60)
            events = kernel.log(pid)
    finally:
        await runner.cleanup()
    assert info.result is not None and not info.result["ok"]
    error = info.result["error"]
    assert "HTTPStatusError" in error and "404" in error and "[redacted]" in error
    assert hidden_everywhere(KEY, error)
    assert hidden_everywhere(KEY, json.dumps([event.model_dump(mode="json") for event in events]))
    shown = CliRunner().invoke(app, ["log", str(pid)])
    assert shown.exit_code == 0 and hidden_everywhere(KEY, shown.output)
    stored = b"".join(p.read_bytes() for p in llmos_home.rglob("*") if p.is_file())
    assert KEY.encode() not in stored
