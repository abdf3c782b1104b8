"""Property tests: whatever a model sends, `invoke` answers, and it answers ok exactly when valid."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import jsonschema
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from llmos.kernel.process import detached
from llmos.tools import Tool, ToolContext, tool


class Item(BaseModel):
    sku: str
    qty: int = 1


@tool
async def order(
    customer: str,
    items: list[Item],
    express: bool = False,
    note: str | None = None,
    priority: Literal["low", "high"] = "low",
    discount: float = 0.0,
) -> dict[str, Any]:
    """Place an order."""
    return {"customer": customer, "count": len(items)}


async def _echo(arguments: dict[str, Any], ctx: ToolContext) -> Any:
    return arguments


RAW_SCHEMA = {
    "type": "object",
    "properties": {
        "query": {"type": "string", "minLength": 1},
        "limit": {"type": "integer", "minimum": 1, "maximum": 50},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["query"],
    "additionalProperties": False,
}
raw_tool = Tool("search", "Search.", _echo, json_schema=RAW_SCHEMA)

CTX = ToolContext(process=detached(1), workspace=Path("."))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=10,
)
item_like = st.fixed_dictionaries({"sku": json_values}, optional={"qty": json_values, "extra": json_values})
order_args = st.fixed_dictionaries(
    {},
    optional={
        "customer": st.text(max_size=5) | json_values,
        "items": st.lists(item_like, max_size=3) | json_values,
        "express": st.booleans() | json_values,
        "note": st.none() | st.text(max_size=5),
        "priority": st.sampled_from(["low", "high", "urgent"]) | json_values,
        "discount": st.floats(allow_nan=False, allow_infinity=False) | json_values,
        "bogus": json_values,
    },
)
search_args = st.fixed_dictionaries(
    {},
    optional={
        "query": st.text(max_size=4) | json_values,
        "limit": st.integers(-5, 60) | json_values,
        "tags": st.lists(st.text(max_size=3), max_size=3) | json_values,
        "other": json_values,
    },
)
fast = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _validates(model: type[BaseModel], value: Any) -> bool:
    try:
        model.model_validate(value)
    except ValidationError:
        return False
    return True


@fast
@given(arguments=order_args)
async def test_pydantic_tool_is_ok_iff_the_model_validates(arguments: dict[str, Any]) -> None:
    assert order.args_model is not None
    result = await order.invoke(arguments, CTX)
    assert result.ok == _validates(order.args_model, arguments)
    if not result.ok:
        assert result.error and result.error.startswith("Invalid arguments: ")


@fast
@given(arguments=order_args)
async def test_the_json_text_of_the_arguments_gives_the_same_answer(arguments: dict[str, Any]) -> None:
    assert (await order.invoke(json.dumps(arguments), CTX)).ok == (await order.invoke(arguments, CTX)).ok


@fast
@given(anything=json_values | st.text(max_size=30))
async def test_invoke_never_raises_on_any_json_or_text(anything: Any) -> None:
    for target in (order, raw_tool):
        result = await target.invoke(anything, CTX)
        assert result.ok is False or isinstance(anything, dict | str)
        assert result.ok or result.error


@fast
@given(arguments=search_args)
async def test_json_schema_tool_is_ok_iff_jsonschema_validates(arguments: dict[str, Any]) -> None:
    result = await raw_tool.invoke(arguments, CTX)
    valid = jsonschema.Draft202012Validator(RAW_SCHEMA).is_valid(arguments)
    assert result.ok == valid
    if valid:
        assert result.content == arguments
