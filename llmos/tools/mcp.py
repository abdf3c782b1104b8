"""Mount an MCP server (stdio transport) as llmos tools.

`await McpServer.start("files", "npx", ["-y", "@modelcontextprotocol/server-filesystem", "/data"])`
spawns the server, opens one MCP client session and lists its tools; `server.tools` are llmos
`Tool`s named `"{server}__{tool}"` whose arguments are checked against the server's own input
schema before the call leaves the process.

The session is owned by one background task: the SDK's transport and session are anyio
context managers that must be entered and left by the same task, while the kernel calls tools
from whichever task runs the process. Calls just send on the session's streams, which is safe
from any task of the same event loop.

A server that exits is started again on the next call (at most `max_restarts` times), before
that call is sent, so no call is ever sent twice: a call that was in flight when the server died
fails, and the model decides whether to call again.

Risk: a stdio MCP server is an arbitrary program running with the user's rights, and its tool
descriptions are its own claims, so every tool defaults to `Risk.EXECUTE`. Pass `risk=` to
change that for a server you trust, or `risks={"tool": Risk.READ}` per tool. A server's
`destructive_hint` can only raise a tool's risk (to IRREVERSIBLE), never lower it.
"""

from __future__ import annotations

import asyncio
import re
import shlex
import tempfile
from collections.abc import Mapping, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

import anyio

from llmos.kernel.devices import Risk, ToolContext, ToolResult
from llmos.tools.registry import Tool, simplify_schema

try:
    import mcp_types
    from mcp.client.session import ClientSession
    from mcp.client.stdio import StdioServerParameters, stdio_client
    from mcp.shared.exceptions import MCPError
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError("MCP support needs the `mcp` package: pip install 'llmos[mcp]'.") from exc

SEPARATOR = "__"  # OpenAI-style function names allow [A-Za-z0-9_-] only, so no "." or "/"


class McpStartError(RuntimeError):
    """The MCP server could not be started or did not answer the MCP handshake."""


class McpServer:
    """A running MCP server and the llmos tools it offers."""

    def __init__(
        self,
        name: str,
        params: StdioServerParameters,
        *,
        risk: Risk = Risk.EXECUTE,
        risks: Mapping[str, Risk] | None = None,
        untrusted_output: bool = True,
        call_timeout_s: float = 60.0,
        startup_timeout_s: float = 30.0,
        max_restarts: int = 3,
        log_dir: str | Path | None = None,
    ) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_\-]{1,40}", name):
            raise ValueError(f"MCP server name {name!r} is not allowed: use letters, digits, '_' or '-'.")
        self.name = name
        self.params = params
        self.risk = Risk(risk)
        self.risks = {k: Risk(v) for k, v in (risks or {}).items()}
        self.untrusted_output = untrusted_output
        self.call_timeout_s = call_timeout_s
        self.startup_timeout_s = startup_timeout_s
        self.max_restarts = max_restarts
        self.restarts = 0
        self.log_dir = log_dir
        self.tools: list[Tool] = []
        self.log_path: Path | None = None  # the server's stderr
        self._session: ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._log: TextIO | None = None
        self._closed = False
        self._died = False  # keep the logs then: they say why
        self._restart_lock = asyncio.Lock()

    @classmethod
    async def start(
        cls,
        name: str,
        command: str,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        *,
        cwd: str | Path | None = None,
        risk: Risk = Risk.EXECUTE,
        risks: Mapping[str, Risk] | None = None,
        untrusted_output: bool = True,
        call_timeout_s: float = 60.0,
        startup_timeout_s: float = 30.0,
        max_restarts: int = 3,
        log_dir: str | Path | None = None,
    ) -> McpServer:
        """Spawn the server, do the MCP handshake and list its tools.

        env: variables for the server on top of a minimal environment (PATH, HOME, ...); the
        rest of ours, API keys included, is not passed on. The server's stderr goes to a log
        file in `log_dir` (default: the temp dir), kept only when the server failed to start or died.
        """
        params = StdioServerParameters(
            command=command, args=list(args), env=dict(env) if env is not None else None, cwd=cwd
        )
        server = cls(
            name,
            params,
            risk=risk,
            risks=risks,
            untrusted_output=untrusted_output,
            call_timeout_s=call_timeout_s,
            startup_timeout_s=startup_timeout_s,
            max_restarts=max_restarts,
            log_dir=log_dir,
        )
        await server._open()
        return server

    @property
    def running(self) -> bool:
        alive = self._task is not None and not self._task.done() and not self._stop.is_set()
        return alive and self._session is not None

    async def _open(self) -> None:
        timeout_s = self.startup_timeout_s
        fd, path = tempfile.mkstemp(prefix=f"llmos-mcp-{self.name}-", suffix=".log", dir=self.log_dir)
        self.log_path = Path(path)
        self._log = open(fd, "w+")  # noqa: SIM115 - the server's stderr, closed by _stop_session()
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[list[mcp_types.Tool]] = loop.create_future()
        self._task = asyncio.create_task(self._own_session(ready, self._stop), name=f"mcp:{self.name}")
        command = shlex.join([self.params.command, *self.params.args])
        try:
            listed = await asyncio.wait_for(asyncio.shield(ready), timeout_s)
        except TimeoutError:
            await self._stop_session()
            raise McpStartError(
                f"MCP server '{self.name}' (`{command}`) did not finish the MCP handshake within "
                f"{timeout_s:g} s; check that it speaks MCP over stdio (its log: {self.log_path})."
            ) from None
        except asyncio.CancelledError:
            await self._stop_session()  # do not leave the server process behind
            raise
        except Exception as exc:
            await self._stop_session()
            raise McpStartError(
                f"Could not start MCP server '{self.name}' (`{command}`): {_reason(exc)}; "
                f"check the command and its log {self.log_path}."
            ) from exc
        self.tools = [self._make_tool(t) for t in listed]

    async def _own_session(self, ready: asyncio.Future[list[mcp_types.Tool]], stop: asyncio.Event) -> None:
        assert self._log is not None
        try:
            async with AsyncExitStack() as stack:
                read, write = await stack.enter_async_context(stdio_client(self.params, errlog=self._log))
                relayed_send, relayed = anyio.create_memory_object_stream[Any](0)
                relay = await stack.enter_async_context(anyio.create_task_group())
                stack.callback(relay.cancel_scope.cancel)
                relay.start_soon(self._relay, read, relayed_send, stop)
                session = await stack.enter_async_context(ClientSession(relayed, write))
                await session.initialize()
                listed = await _list_all_tools(session)
                self._session = session
                ready.set_result(listed)
                await stop.wait()
        except Exception as exc:
            if not ready.done():
                ready.set_exception(exc)
        except BaseException:
            ready.cancel()
            raise
        finally:
            self._session = None

    async def _relay(self, server_output: Any, session_input: Any, stop: asyncio.Event) -> None:
        """Pass the server's messages to the session, and notice the server exit while idle."""
        async with session_input:
            async for message in server_output:
                await session_input.send(message)
        if not stop.is_set():  # the output ended without us asking: the server exited
            self._died = True
            stop.set()  # the next call starts it again before sending

    def _make_tool(self, remote: mcp_types.Tool) -> Tool:
        remote_name = remote.name

        async def handler(arguments: dict[str, Any], ctx: ToolContext) -> ToolResult:
            return await self.call(remote_name, arguments)

        risk = self.risks.get(remote_name, self.risk)
        if remote.annotations is not None and remote.annotations.destructive_hint:
            risk = Risk.IRREVERSIBLE
        # OpenAI-style APIs accept [A-Za-z0-9_-]{1,64} as a function name
        local = re.sub(r"[^A-Za-z0-9_\-]", "_", remote_name)[: 62 - len(self.name)]
        schema = simplify_schema(remote.input_schema or {"type": "object"})
        return Tool(
            f"{self.name}{SEPARATOR}{local}",
            remote.description or remote.title or remote_name,
            handler,
            json_schema=schema,
            risk=risk,
            untrusted_output=self.untrusted_output,
        )

    async def call(self, tool_name: str, arguments: dict[str, Any]) -> ToolResult:
        """Call a tool by its name on the server; every failure comes back as a ToolResult."""
        if not self.running:
            why = await self._restart()
            if why is not None:
                return ToolResult.failure(
                    f"MCP server '{self.name}' is unavailable: {why}; its tools cannot be used until "
                    "it is mounted again."
                )
        session = self._session
        assert session is not None
        try:
            result = await session.call_tool(tool_name, arguments, read_timeout_seconds=self.call_timeout_s)
        except (MCPError, TimeoutError) as exc:
            message = str(exc).lower()
            if isinstance(exc, TimeoutError) or "timed out" in message:
                return ToolResult.failure(
                    f"MCP tool '{tool_name}' did not answer within {self.call_timeout_s:g} s; "
                    "try smaller input or another tool."
                )
            if "closed" in message:
                return self._died_during(tool_name, "the connection closed")
            return ToolResult.failure(f"MCP server '{self.name}' refused the call to '{tool_name}': {exc}")
        except (OSError, EOFError) as exc:
            return self._died_during(tool_name, f"the connection broke ({_reason(exc)})")
        return _convert(result, self.untrusted_output)

    def _died_during(self, tool_name: str, why: str) -> ToolResult:
        self._died = True
        self._stop.set()
        return ToolResult.failure(
            f"MCP server '{self.name}' exited during the call to '{tool_name}' ({why}; its log: "
            f"{self.log_path}); it is started again on the next call, so call again only if repeating "
            "the call is safe."
        )

    async def _restart(self) -> str | None:
        """Start a server that exited again; None once it runs, else why it does not."""
        async with self._restart_lock:
            if self.running:  # another call restarted it meanwhile
                return None
            if self._closed:
                return "it was closed"
            self._died = True
            if self.restarts >= self.max_restarts:
                limit = f"restart limit {self.max_restarts}; its log: {self.log_path}"
                return f"it exited {self.restarts + 1} times ({limit})"
            self.restarts += 1
            await self._stop_session()
            self._stop = asyncio.Event()
            try:
                await self._open()
            except McpStartError as exc:
                return f"restart {self.restarts} failed ({exc})"
            return None

    async def aclose(self) -> None:
        """Stop the session and the server process (idempotent)."""
        self._closed = True
        await self._stop_session()
        if self.tools and not self._died and self.log_path is not None:
            # the log of a server that started fine and never died is not worth keeping
            self.log_path.unlink(missing_ok=True)

    async def _stop_session(self) -> None:
        self._stop.set()
        task = self._task
        if task is not None:
            if self._session is None:
                task.cancel()  # still in the handshake: nothing to close politely
            # asyncio.wait never raises the task's error (nor its cancellation) into this caller
            await asyncio.wait({task}, timeout=15)
            if not task.done():  # pragma: no cover - the SDK kills the process on exit
                task.cancel()
                await asyncio.wait({task}, timeout=5)
        if self._log is not None:
            self._log.close()
            self._log = None

    async def __aenter__(self) -> McpServer:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


async def _list_all_tools(session: ClientSession) -> list[mcp_types.Tool]:
    tools: list[mcp_types.Tool] = []
    cursor: str | None = None
    while True:
        params = mcp_types.PaginatedRequestParams(cursor=cursor) if cursor else None
        page = await session.list_tools(params=params)
        tools.extend(page.tools)
        cursor = page.next_cursor
        if not cursor:
            return tools


def _convert(result: mcp_types.CallToolResult, untrusted: bool) -> ToolResult:
    text = "\n".join(_block_text(block) for block in result.content)
    if result.is_error:
        return ToolResult(ok=False, error=text or "the MCP tool reported an error", untrusted=untrusted)
    content: Any = result.structured_content if result.structured_content is not None else text
    return ToolResult(ok=True, content=content, untrusted=untrusted)


def _block_text(block: Any) -> str:
    if isinstance(block, mcp_types.TextContent):
        return block.text
    kind = getattr(block, "type", "content")
    mime = getattr(block, "mime_type", None)
    uri = getattr(getattr(block, "resource", None), "uri", None) or getattr(block, "uri", None)
    return f"[{kind}{' ' + mime if mime else ''}{' ' + str(uri) if uri else ''}]"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_reason(e) for e in exc.exceptions)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
