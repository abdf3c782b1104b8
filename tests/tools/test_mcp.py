"""A real MCP server process (the SDK's MCPServer, formerly FastMCP) mounted over stdio."""

from __future__ import annotations

import asyncio
import os
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from llmos import Kernel
from llmos.config import load_config
from llmos.kernel.process import Process
from llmos.tools import Risk, Tool, ToolContext, ToolRegistry
from llmos.tools.mcp import McpServer, McpStartError

pytestmark = pytest.mark.asyncio(loop_scope="module")

SERVER = textwrap.dedent(
    '''
    import os
    from pydantic import BaseModel
    from mcp.server.mcpserver import MCPServer
    from mcp.types import ToolAnnotations

    app = MCPServer("demo")

    class Box(BaseModel):
        width: int
        height: int

    @app.tool()
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    @app.tool()
    def area(box: Box, scale: float = 1.0) -> float:
        """Area of a box."""
        return box.width * box.height * scale

    @app.tool(structured_output=False)
    def shout(text: str) -> str:
        """Upper-case a text."""
        return text.upper()

    @app.tool()
    def fail(reason: str) -> str:
        """Always fails."""
        raise ValueError(reason)

    @app.tool()
    def env(name: str) -> str:
        """Read a variable from the server's environment."""
        return os.environ.get(name, "<unset>")

    @app.tool()
    async def slow(seconds: float) -> str:
        """Sleep, then answer."""
        import asyncio

        await asyncio.sleep(seconds)
        return "done"

    @app.tool(annotations=ToolAnnotations(destructive_hint=True))
    def wipe() -> str:
        """Pretend to wipe everything."""
        return "wiped"

    @app.tool()
    def die() -> str:
        """Exit the server process."""
        os._exit(3)

    @app.tool()
    def pid() -> int:
        """The server's process id."""
        return os.getpid()

    app.run()
    '''
)


@pytest.fixture(scope="module")
def server_script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("mcp") / "demo_server.py"
    path.write_text(SERVER)
    return path


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(server_script: Path) -> AsyncIterator[McpServer]:
    # a secret in our own environment must not reach the server: only `env=` and the basics do
    os.environ["LLMOS_TEST_HOST_SECRET"] = "hunter2"
    try:
        mounted = await McpServer.start(
            "demo", sys.executable, [str(server_script)], env={"DEMO_SETTING": "from-env"}
        )
    finally:
        del os.environ["LLMOS_TEST_HOST_SECRET"]
    try:
        yield mounted
    finally:
        await mounted.aclose()


def _tools(server: McpServer) -> dict[str, Tool]:
    return {t.name: t for t in server.tools}


async def test_tools_are_listed_with_their_schemas(server: McpServer) -> None:
    tools = _tools(server)
    assert set(tools) == {
        "demo__add",
        "demo__area",
        "demo__shout",
        "demo__fail",
        "demo__env",
        "demo__slow",
        "demo__wipe",
        "demo__die",
        "demo__pid",
    }
    add = tools["demo__add"].spec()
    assert add.description == "Add two integers."
    assert add.parameters["required"] == ["a", "b"]
    assert add.parameters["properties"]["a"] == {"type": "integer"}
    box = tools["demo__area"].spec().parameters["properties"]["box"]
    assert box["properties"]["width"] == {"type": "integer"}  # the server's $ref is inlined
    assert tools["demo__add"].capability == "tool:demo__add"


async def test_risk_defaults_to_execute_and_destructive_hint_raises_it(server: McpServer) -> None:
    tools = _tools(server)
    assert tools["demo__add"].risk is Risk.EXECUTE
    assert tools["demo__wipe"].risk is Risk.IRREVERSIBLE
    assert all(t.untrusted_output for t in tools.values())


async def test_calls_return_results(server: McpServer, ctx: ToolContext) -> None:
    tools = _tools(server)
    added = await tools["demo__add"].invoke('{"a": 2, "b": 40}', ctx)
    assert added.ok and added.content == {"result": 42} and added.untrusted
    area = await tools["demo__area"].invoke({"box": {"width": 2, "height": 3}, "scale": 0.5}, ctx)
    assert area.content == {"result": 3.0}
    shout = await tools["demo__shout"].invoke({"text": "hi"}, ctx)
    assert shout.content == "HI"
    env = await tools["demo__env"].invoke({"name": "DEMO_SETTING"}, ctx)
    assert env.content == {"result": "from-env"}


async def test_the_server_does_not_inherit_the_hosts_secrets(server: McpServer, ctx: ToolContext) -> None:
    leaked = await _tools(server)["demo__env"].invoke({"name": "LLMOS_TEST_HOST_SECRET"}, ctx)
    assert leaked.content == {"result": "<unset>"}


async def test_concurrent_calls_share_one_session(server: McpServer, ctx: ToolContext) -> None:
    add = _tools(server)["demo__add"]
    results = await asyncio.gather(*(add.invoke({"a": i, "b": i}, ctx) for i in range(8)))
    assert [r.content for r in results] == [{"result": 2 * i} for i in range(8)]


async def test_bad_arguments_are_refused_before_the_call(server: McpServer, ctx: ToolContext) -> None:
    add = _tools(server)["demo__add"]
    wrong = await add.invoke({"a": "two", "b": 1}, ctx)
    assert not wrong.ok and "argument 'a'" in (wrong.error or "") and "integer" in (wrong.error or "")
    missing = await add.invoke({"a": 1}, ctx)
    assert "'b' is a required property" in (missing.error or "")
    broken = await add.invoke('{"a": 1', ctx)
    assert "not valid JSON" in (broken.error or "")


async def test_a_tool_error_is_a_failed_result(server: McpServer, ctx: ToolContext) -> None:
    failed = await _tools(server)["demo__fail"].invoke({"reason": "no"}, ctx)
    assert not failed.ok and "fail" in (failed.error or "")


async def test_the_tools_fit_a_registry(server: McpServer) -> None:
    registry = ToolRegistry(server.tools)
    assert "demo__add" in registry
    assert len(registry.specs()) == len(server.tools)


async def test_risk_override_and_a_server_that_dies(server_script: Path, ctx: ToolContext) -> None:
    async with await McpServer.start(
        "mortal",
        sys.executable,
        [str(server_script)],
        risk=Risk.READ,
        risks={"wipe": Risk.WRITE},
        call_timeout_s=0.5,
    ) as mortal:
        tools = _tools(mortal)
        slow = await tools["mortal__slow"].invoke({"seconds": 5}, ctx)
        assert not slow.ok and "did not answer within 0.5 s" in (slow.error or "")
        assert (await tools["mortal__slow"].invoke({"seconds": 0}, ctx)).ok  # still usable after
        assert tools["mortal__add"].risk is Risk.READ
        assert tools["mortal__wipe"].risk is Risk.IRREVERSIBLE  # the server's own hint can only raise it
        assert mortal.restarts == 0


async def test_a_server_that_dies_mid_call_is_restarted_for_the_next_call(
    server_script: Path, ctx: ToolContext, tmp_path: Path
) -> None:
    async with await McpServer.start(
        "mortal", sys.executable, [str(server_script)], max_restarts=1, log_dir=tmp_path
    ) as mortal:
        tools = _tools(mortal)
        first_pid = (await tools["mortal__pid"].invoke({}, ctx)).content["result"]
        died = await tools["mortal__die"].invoke({}, ctx)
        assert not died.ok
        assert "exited during the call to 'die'" in (died.error or "")
        assert "call again only if repeating the call is safe" in (died.error or "")
        # The next call starts the server again before it is sent.
        after = await tools["mortal__add"].invoke({"a": 1, "b": 2}, ctx)
        assert after.ok and after.content == {"result": 3}
        assert mortal.restarts == 1 and mortal.running
        assert (await tools["mortal__pid"].invoke({}, ctx)).content["result"] != first_pid

        # Past the restart limit the tools stay down, with one clear sentence.
        await tools["mortal__die"].invoke({}, ctx)
        down = await tools["mortal__add"].invoke({"a": 1, "b": 2}, ctx)
        assert not down.ok
        assert "MCP server 'mortal' is unavailable: it exited 2 times (restart limit 1" in (down.error or "")
        assert not mortal.running
    assert list(tmp_path.glob("llmos-mcp-mortal-*.log")), "a server that died keeps its logs"


async def test_a_server_killed_while_idle_comes_back(
    server_script: Path, ctx: ToolContext, tmp_path: Path
) -> None:
    async with await McpServer.start("idle", sys.executable, [str(server_script)], log_dir=tmp_path) as idle:
        tools = _tools(idle)
        pid = (await tools["idle__pid"].invoke({}, ctx)).content["result"]
        os.kill(pid, 9)
        for _ in range(50):  # the transport sees the server's output end
            if not idle.running:
                break
            await asyncio.sleep(0.1)
        # The call was never sent to the dead server, so it can go to the new one at once.
        after = await tools["idle__add"].invoke({"a": 2, "b": 2}, ctx)
        assert after.ok and after.content == {"result": 4}
        assert idle.restarts == 1


async def test_a_command_that_does_not_exist_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(McpStartError, match="Could not start MCP server 'nope'"):
        await McpServer.start("nope", str(tmp_path / "no-such-program"), log_dir=tmp_path)


async def test_a_program_that_does_not_speak_mcp_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(McpStartError, match="MCP server 'mute'") as info:
        await McpServer.start(
            "mute",
            sys.executable,
            ["-c", "import sys, time; print('booting', file=sys.stderr, flush=True); time.sleep(30)"],
            startup_timeout_s=1,
            log_dir=tmp_path,
        )
    (log,) = tmp_path.glob("llmos-mcp-mute-*.log")
    assert str(log) in str(info.value) and "booting" in log.read_text()


async def add_through_the_kernel(proc: Process) -> Any:
    reply = await proc.syscall("tool.call", name="demo__add", arguments={"a": 20, "b": 22})
    return reply.unwrap()


async def test_an_mcp_tool_called_through_the_kernel(server: McpServer, tmp_path: Path) -> None:
    async with Kernel(load_config(env={"LLMOS_HOME": str(tmp_path)})) as kernel:
        kernel.tools.register(*server.tools)
        pid = await kernel.spawn(add_through_the_kernel, capabilities=["tool:*"])
        info = await kernel.wait(pid, timeout_s=60)
        assert info.error is None, info.error
        assert info.result["ok"] and info.result["content"] == {"result": 42}
        assert info.result["untrusted"] is True
        assert info.usage.tool_calls == 1
