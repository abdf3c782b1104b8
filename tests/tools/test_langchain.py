from __future__ import annotations

from typing import Any

import pytest
from langchain_core.tools import BaseTool, StructuredTool, ToolException
from langchain_core.tools import Tool as LcTool
from langchain_core.tools import tool as lc_tool
from pydantic import BaseModel

from llmos.tools import Risk, ToolContext, tool
from llmos.tools.langchain import from_langchain, to_langchain


@lc_tool
def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


@lc_tool
async def lookup(key: str) -> dict[str, Any]:
    """Look a key up."""
    if key == "missing":
        raise ToolException(f"no entry for {key}; try another key")
    return {"key": key, "value": len(key)}


class Size(BaseModel):
    w: int
    h: int = 1


@tool(risk=Risk.WRITE)
async def paint(colour: str, size: Size, ctx: ToolContext, coats: int = 1) -> dict[str, Any]:
    """Paint a wall.

    Args:
        colour: paint colour.
        size: wall size.
        coats: number of coats.
    """
    return {"colour": colour, "area": size.w * size.h * coats, "pid": ctx.pid}


async def test_a_langchain_tool_in_llmos(ctx: ToolContext) -> None:
    wrapped = from_langchain(multiply)
    spec = wrapped.spec()
    assert spec.name == "multiply" and spec.description == "Multiply two integers."
    assert spec.parameters["properties"] == {"a": {"type": "integer"}, "b": {"type": "integer"}}
    assert wrapped.risk is Risk.EXECUTE and wrapped.untrusted_output  # unknown code: cautious defaults
    result = await wrapped.invoke('{"a": 6, "b": 7}', ctx)
    assert result.ok and result.content == 42
    bad = await wrapped.invoke({"a": 6}, ctx)
    assert not bad.ok and "'b' is a required property" in (bad.error or "")


async def test_langchain_tool_errors_reach_the_model_verbatim(ctx: ToolContext) -> None:
    wrapped = from_langchain(lookup, risk=Risk.READ, untrusted_output=False)
    assert (await wrapped.invoke({"key": "abc"}, ctx)).content == {"key": "abc", "value": 3}
    missing = await wrapped.invoke({"key": "missing"}, ctx)
    assert missing.error == "no entry for missing; try another key"
    assert wrapped.risk is Risk.READ and not missing.untrusted


async def test_a_single_input_legacy_langchain_tool(ctx: ToolContext) -> None:
    legacy = LcTool(name="Upper Case!", func=lambda text: text.upper(), description="Upper-case text.")
    wrapped = from_langchain(legacy)
    assert wrapped.name == "Upper_Case"
    (argument,) = wrapped.spec().parameters["properties"]
    assert (await wrapped.invoke({argument: "hi"}, ctx)).content == "HI"


async def test_an_llmos_tool_in_langchain(ctx: ToolContext) -> None:
    lc = to_langchain(paint, ctx=ctx)
    assert isinstance(lc, BaseTool)
    assert lc.name == "paint" and lc.description.startswith("Paint a wall.")
    assert set(lc.args) == {"colour", "size", "coats"}
    out = await lc.ainvoke({"colour": "red", "size": {"w": 2, "h": 3}, "coats": 2})
    assert out == {"colour": "red", "area": 12, "pid": 7}
    # errors come back as the text the agent sees (handle_tool_error), not as exceptions
    error = await lc.ainvoke({"colour": "red"})
    assert "argument 'size' is required" in error
    extra = await lc.ainvoke({"colour": "red", "size": {"w": 1}, "brush": "big"})
    assert "argument 'brush' is not accepted" in extra


def test_an_llmos_tool_in_langchain_sync(ctx: ToolContext) -> None:
    lc = to_langchain(paint, ctx=ctx)
    assert lc.invoke({"colour": "blue", "size": {"w": 5}}) == {"colour": "blue", "area": 5, "pid": 7}


async def test_round_trip_llmos_langchain_llmos(ctx: ToolContext) -> None:
    back = from_langchain(to_langchain(paint, ctx=ctx), risk=paint.risk)
    assert back.spec().parameters == paint.spec().parameters
    assert back.spec().description == paint.spec().description
    arguments = {"colour": "green", "size": {"w": 2}, "coats": 3}
    assert (await back.invoke(arguments, ctx)).content == (await paint.invoke(arguments, ctx)).content


async def test_round_trip_langchain_llmos_langchain(ctx: ToolContext) -> None:
    back = to_langchain(from_langchain(multiply), ctx=ctx)
    assert isinstance(back, StructuredTool)
    assert back.name == multiply.name and back.description == multiply.description
    assert back.tool_call_schema["properties"] == {"a": {"type": "integer"}, "b": {"type": "integer"}}
    assert await back.ainvoke({"a": 3, "b": 5}) == await multiply.ainvoke({"a": 3, "b": 5})


async def test_to_langchain_through_a_process_uses_the_tool_call_syscall(ctx: ToolContext) -> None:
    calls: list[tuple[str, dict[str, Any]]] = []

    class FakeReply:
        def __init__(self, value: Any) -> None:
            self.value = value

    class FakeProcess:
        async def syscall(self, call: str, /, **args: Any) -> FakeReply:
            calls.append((call, args))
            return FakeReply((await paint.invoke(args["arguments"], ctx)).model_dump())

    lc = to_langchain(paint, process=FakeProcess())
    out = await lc.ainvoke({"colour": "red", "size": {"w": 1}})
    assert calls == [("tool.call", {"name": "paint", "arguments": {"colour": "red", "size": {"w": 1}}})]
    assert out == {"colour": "red", "area": 1, "pid": 7}


@pytest.mark.parametrize("bad", ['{"a": 1,', "[]", "null"])
async def test_malformed_text_through_the_wrapper(ctx: ToolContext, bad: str) -> None:
    result = await from_langchain(multiply).invoke(bad, ctx)
    assert not result.ok and result.error
