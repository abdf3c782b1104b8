"""LangChain tools both ways: use a LangChain tool in llmos, or an llmos tool in LangChain.

`from_langchain(lc_tool)` wraps any `langchain_core.tools.BaseTool`; the model sees the same
schema LangChain would send (injected arguments left out) and arguments are checked against it
before the tool runs. A LangChain tool can do anything, so the wrapper defaults to
`Risk.EXECUTE` with untrusted output; pass `risk=` / `untrusted_output=` for a tool you know.

`to_langchain(tool)` gives a `StructuredTool`. With `process=` every call is a `tool.call`
syscall of that llmos process (checked, charged and journaled by the kernel); without it the
tool runs directly with the given `ToolContext`. Errors come back to the LangChain agent as
the tool's text (`handle_tool_error=True`), the same sentence an llmos model would get.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from llmos.kernel.devices import Risk, ToolContext, ToolResult
from llmos.kernel.process import Process, detached
from llmos.tools.registry import (
    Tool,
    ToolError,
    jsonable,
    safe_tool_name,
    simplify_schema,
)

try:
    from langchain_core.tools import BaseTool, StructuredTool, ToolException
    from langchain_core.utils.function_calling import convert_to_openai_tool
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError("LangChain support needs langchain-core: pip install 'llmos[langchain]'.") from exc


def from_langchain(
    lc_tool: BaseTool,
    *,
    name: str | None = None,
    capability: str | None = None,
    risk: Risk = Risk.EXECUTE,
    untrusted_output: bool = True,
) -> Tool:
    """An llmos tool that calls `lc_tool` (its async path; sync tools run in a thread)."""
    function = convert_to_openai_tool(lc_tool)["function"]
    schema = simplify_schema(function.get("parameters") or {"type": "object", "properties": {}})

    async def handler(arguments: dict[str, Any], ctx: ToolContext) -> Any:
        try:
            return await lc_tool.ainvoke(arguments)
        except ToolException as exc:  # LangChain's "tell the model" error
            raise ToolError(str(exc)) from exc

    return Tool(
        name or safe_tool_name(lc_tool.name, fallback="langchain_tool"),
        lc_tool.description or function.get("description", ""),
        handler,
        json_schema=schema,
        capability=capability,
        risk=risk,
        untrusted_output=untrusted_output,
    )


def to_langchain(
    tool: Tool, *, process: Process | None = None, ctx: ToolContext | None = None
) -> StructuredTool:
    """A LangChain `StructuredTool` for an llmos tool.

    process: an llmos Process; calls then go through its `tool.call` syscall.
    ctx: the context for direct calls (default: a detached handle, the current directory as workspace).
    """
    context = ctx or ToolContext(process=detached(), workspace=Path.cwd())

    async def call(**kwargs: Any) -> Any:
        if process is not None:
            reply = await process.syscall("tool.call", name=tool.name, arguments=kwargs)
            result = _result_of(reply)
        else:
            result = await tool.invoke(kwargs, context)
        if not result.ok:
            raise ToolException(result.error)
        return result.content

    def call_sync(**kwargs: Any) -> Any:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(call(**kwargs))
        raise RuntimeError(
            f"Tool '{tool.name}' was called synchronously inside an event loop; use `await t.ainvoke(...)`."
        )

    # A JSON-schema dict, not the pydantic model: LangChain then passes the arguments through
    # untouched and the llmos tool's own validation gives the model a useful sentence.
    return StructuredTool.from_function(
        func=call_sync,
        coroutine=call,
        name=tool.name,
        description=tool.description or tool.name,
        args_schema=tool.parameters,
        infer_schema=False,
        handle_tool_error=True,
        handle_validation_error=True,
    )


def _result_of(reply: Any) -> ToolResult:
    """The ToolResult inside a kernel reply, whatever shape the reply carries it in."""
    value = getattr(reply, "value", reply)
    if isinstance(value, ToolResult):
        return value
    if isinstance(value, dict) and "ok" in value:
        return ToolResult.model_validate(value)
    error = getattr(reply, "error", None)
    if error is not None:  # the kernel refused the call (denied, unknown tool, budget)
        return ToolResult.failure(str(getattr(error, "message", error)))
    return ToolResult(ok=True, content=jsonable(value))
