from __future__ import annotations

import asyncio
import threading
from typing import Annotated, Any, Literal

import pytest
from pydantic import BaseModel, Field

from llmos.kernel.devices import ToolSpec
from llmos.kernel.process import detached
from llmos.tools import Risk, Tool, ToolContext, ToolError, ToolRegistry, ToolResult, UnknownTool, tool
from llmos.tools.registry import parse_docstring, simplify_schema


class Address(BaseModel):
    street: str
    zip_code: str = Field(pattern=r"^\d{5}$")


class Person(BaseModel):
    name: str
    title: str | None = None  # a field named "title" must survive schema cleaning
    addresses: list[Address] = []


@tool
def greet(name: str, times: int = 1, loud: bool = False) -> str:
    """Greet someone.

    Args:
        name: who to greet.
        times (int): how many times,
            at least once.
        loud: shout it.

    Returns:
        The greeting.
    """
    text = " ".join([f"hello {name}"] * times)
    return text.upper() if loud else text


@tool(name="register_person", risk=Risk.WRITE, capability="db:people", untrusted_output=True)
async def add_person(person: Person, ctx: ToolContext, tags: list[str] | None = None) -> Person:
    """Store a person.

    Parameters
    ----------
    person : Person
        The person to store.
    tags : list of str, optional
        Labels for the person.

    Returns
    -------
    Person
    """
    await asyncio.sleep(0)
    return person.model_copy(update={"name": f"{person.name}#{ctx.pid}"})


@tool
def kinds(
    mode: Literal["fast", "slow"],
    ratio: Annotated[float, Field(ge=0, le=1, description="between 0 and 1")] = 0.5,
    note: str | None = None,
) -> dict[str, Any]:
    return {"mode": mode, "ratio": ratio, "note": note}


@tool
def crash(x: int) -> int:
    """Always fails."""
    raise RuntimeError(f"disk on fire at {x}")


@tool
def polite_failure(x: int) -> int:
    """Fails with a message meant for the model."""
    raise ToolError("x is too large; try a value below 10.")


async def test_schema_from_a_sync_function_with_google_docstring() -> None:
    spec = greet.spec()
    assert isinstance(spec, ToolSpec)
    assert spec.name == "greet"
    assert spec.description == "Greet someone."
    params = spec.parameters
    assert params["type"] == "object"
    assert params["required"] == ["name"]
    assert params["additionalProperties"] is False
    assert params["properties"]["name"] == {"type": "string", "description": "who to greet."}
    assert params["properties"]["times"] == {
        "type": "integer",
        "default": 1,
        "description": "how many times, at least once.",
    }
    assert params["properties"]["loud"]["type"] == "boolean"
    assert greet.risk is Risk.READ and greet.capability == "tool:greet" and not greet.untrusted_output
    assert greet.secret_names == frozenset()


async def test_a_tool_names_the_secrets_it_reads(ctx: ToolContext) -> None:
    @tool(secrets=["WEATHER_KEY"], risk=Risk.NETWORK)
    def weather(city: str, ctx: ToolContext) -> str:
        return f"{city}: key of length {len(ctx.secrets['WEATHER_KEY'])}"

    assert weather.secret_names == {"WEATHER_KEY"}
    assert "WEATHER_KEY" not in str(weather.spec())
    with_key = ToolContext(process=detached(1), workspace=ctx.workspace, secrets={"WEATHER_KEY": "abcd"})
    assert (await weather.invoke({"city": "Oslo"}, with_key)).content == "Oslo: key of length 4"


async def test_schema_from_an_async_function_with_nested_models_and_numpy_docstring() -> None:
    params = add_person.spec().parameters
    assert add_person.name == "register_person"
    assert add_person.capability == "db:people"
    assert add_person.risk is Risk.WRITE
    assert set(params["properties"]) == {"person", "tags"}  # ctx is injected, not shown
    assert params["required"] == ["person"]
    person = params["properties"]["person"]
    assert person["description"] == "The person to store."
    assert "$ref" not in str(params) and "$defs" not in params  # refs inlined for small models
    assert set(person["properties"]) == {"name", "title", "addresses"}
    address = person["properties"]["addresses"]["items"]
    assert address["properties"]["zip_code"]["pattern"] == r"^\d{5}$"
    assert params["properties"]["tags"]["description"] == "Labels for the person."


async def test_literal_annotated_and_optional_parameters() -> None:
    params = kinds.spec().parameters
    assert params["properties"]["mode"]["enum"] == ["fast", "slow"]
    assert params["properties"]["ratio"]["maximum"] == 1
    assert params["properties"]["ratio"]["description"] == "between 0 and 1"
    assert params["required"] == ["mode"]
    assert kinds.description == ""


async def test_invoke_sync_tool_runs_off_the_event_loop(ctx: ToolContext) -> None:
    seen: list[str] = []

    @tool
    def where() -> str:
        seen.append(threading.current_thread().name)
        return "ok"

    result = await where.invoke({}, ctx)
    assert result == ToolResult(ok=True, content="ok")
    assert seen and seen[0] != threading.main_thread().name


async def test_invoke_async_tool_gets_context_and_returns_dumped_models(ctx: ToolContext) -> None:
    result = await add_person.invoke(
        '{"person": {"name": "Ada", "addresses": [{"street": "Main", "zip_code": "12345"}]}}', ctx
    )
    assert result.ok, result.error
    assert result.untrusted is True
    assert result.content == {
        "name": "Ada#7",
        "title": None,
        "addresses": [{"street": "Main", "zip_code": "12345"}],
    }


async def test_the_function_stays_callable() -> None:
    assert greet("bob", times=2) == "hello bob hello bob"


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ('{"name": "bob", ', ["not valid JSON", '"name": <string>']),
        ("[1, 2]", ["must be a JSON object, not an array"]),
        ('"bob"', ["must be a JSON object, not a string"]),
        ({}, ["argument 'name' is required (expected string)"]),
        ({"name": "bob", "colour": "red"}, ["argument 'colour' is not accepted", "name, times, loud"]),
        ({"name": "bob", "times": "many"}, ["argument 'times'", "valid integer", '"many"']),
        ({"name": ["bob"]}, ["argument 'name'", "valid string"]),
    ],
)
async def test_malformed_calls_come_back_as_errors_the_model_can_act_on(
    ctx: ToolContext, arguments: Any, expected: list[str]
) -> None:
    result = await greet.invoke(arguments, ctx)
    assert not result.ok and result.content is None
    assert result.error is not None
    for part in expected:
        assert part in result.error
    assert result.render().startswith("error: ")


async def test_nested_argument_errors_name_the_path(ctx: ToolContext) -> None:
    result = await add_person.invoke(
        {"person": {"name": "Ada", "addresses": [{"street": "Main", "zip_code": "abc"}]}}, ctx
    )
    assert not result.ok
    assert "argument 'person.addresses[0].zip_code'" in (result.error or "")


async def test_empty_argument_text_means_no_arguments(ctx: ToolContext) -> None:
    @tool
    def ping() -> str:
        return "pong"

    assert (await ping.invoke("", ctx)).content == "pong"


async def test_exceptions_inside_a_tool_become_results(ctx: ToolContext) -> None:
    crashed = await crash.invoke({"x": 3}, ctx)
    assert not crashed.ok
    assert crashed.error == "tool 'crash' failed: RuntimeError: disk on fire at 3"
    polite = await polite_failure.invoke({"x": 30}, ctx)
    assert polite.error == "x is too large; try a value below 10."


async def test_a_non_json_return_value_is_an_error_not_a_crash(ctx: ToolContext) -> None:
    @tool
    def weird() -> object:
        return object()

    result = await weird.invoke({}, ctx)
    assert not result.ok and "not JSON-able" in (result.error or "")


async def test_raw_json_schema_tools_validate_with_jsonschema(ctx: ToolContext) -> None:
    async def handler(arguments: dict[str, Any], ctx: ToolContext) -> Any:
        return {"echo": arguments}

    raw = Tool(
        "echo",
        "Echo.",
        handler,
        json_schema={
            "type": "object",
            "properties": {"n": {"type": "integer", "minimum": 0}},
            "required": ["n"],
            "additionalProperties": False,
        },
    )
    assert (await raw.invoke({"n": 2}, ctx)).content == {"echo": {"n": 2}}
    negative = await raw.invoke({"n": -1}, ctx)
    assert "argument 'n'" in (negative.error or "") and "minimum" in (negative.error or "")
    missing = await raw.invoke({}, ctx)
    assert "'n' is a required property" in (missing.error or "")
    extra = await raw.invoke({"n": 1, "m": 2}, ctx)
    assert "'m' was unexpected" in (extra.error or "")


def test_bad_tool_definitions_are_refused_at_once() -> None:
    async def handler(arguments: dict[str, Any], ctx: ToolContext) -> Any:
        return None

    with pytest.raises(TypeError, match="exactly one"):
        Tool("x", "", handler)
    with pytest.raises(ValueError, match="not allowed"):
        Tool("bad name!", "", handler, json_schema={"type": "object"})
    with pytest.raises(TypeError, match=r"\*args"):

        @tool
        def varargs(*args: int) -> None:
            return None


def test_registry() -> None:
    registry = ToolRegistry([greet])
    registry.register(add_person, kinds)
    assert registry.names() == ["greet", "register_person", "kinds"]
    assert len(registry) == 3 and "greet" in registry and "nope" not in registry
    assert [t.name for t in registry] == registry.names()
    assert [s.name for s in registry.specs(["kinds"])] == ["kinds"]
    assert len(registry.specs()) == 3
    registry.register(greet)  # the same tool again: nothing changes
    assert registry.names() == ["greet", "register_person", "kinds"]
    with pytest.raises(ValueError, match="already registered"):
        registry.register(tool(name="greet")(lambda: "another greet"))
    with pytest.raises(UnknownTool) as info:
        registry.get("greeet")
    message = str(info.value)
    assert "'greeet'" in message and "Did you mean 'greet'?" in message
    assert "greet, kinds, register_person" in message
    with pytest.raises(UnknownTool):
        registry.specs(["missing"])
    registry.unregister("greet")
    assert "greet" not in registry
    with pytest.raises(UnknownTool):
        registry.unregister("greet")


def test_two_registries_are_independent() -> None:
    first, second = ToolRegistry(), ToolRegistry()
    first.register(greet)
    assert "greet" not in second


def test_docstring_parser_handles_both_styles_and_plain_text() -> None:
    assert parse_docstring("Just text.") == ("Just text.", {})
    summary, args = parse_docstring("Do it.\n\nArgs:\n    a: first\n    b (str): second\n        more\n")
    assert summary == "Do it." and args == {"a": "first", "b": "second more"}
    summary, args = parse_docstring("Do it.\n\nParameters\n----------\na : int\n    first\nb\n    second\n")
    assert summary == "Do it." and args == {"a": "first", "b": "second"}


def test_simplify_schema_keeps_recursive_refs() -> None:
    class Node(BaseModel):
        value: int
        children: list[Node] = []

    schema = simplify_schema(Node.model_json_schema())
    assert "$defs" in schema  # a recursive ref cannot be inlined
    assert "title" not in schema


async def test_union_errors_are_merged_under_the_argument_name(ctx: ToolContext) -> None:
    @tool
    def pick(choice: int | str, person: Person | None = None) -> None:
        return None

    result = await pick.invoke({"choice": [1], "person": {"addresses": []}}, ctx)
    assert result.error == (
        "Invalid arguments: argument 'choice': expected a valid integer or a valid string, got [1]; "
        "argument 'person.name' is required (expected string)."
    )


async def test_a_crashing_validator_or_a_broken_schema_is_still_a_result(ctx: ToolContext) -> None:
    class Strict(BaseModel):
        n: int

        def model_post_init(self, context: Any) -> None:
            raise KeyError("validator bug")

    async def handler(arguments: dict[str, Any], ctx: ToolContext) -> Any:
        return arguments

    crashing = Tool("crashing", "", handler, args_model=Strict)
    broken = Tool(
        "broken", "", handler, json_schema={"type": "object", "properties": {"n": {"$ref": "#/nope"}}}
    )
    for target in (crashing, broken):
        result = await target.invoke({"n": 1}, ctx)
        assert not result.ok and "could not be checked" in (result.error or "")
