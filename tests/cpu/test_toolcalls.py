"""Constrained tool calls and structured output: schemas, parsing, repair messages (no model needed)."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmos.cpu.toolcalls import (
    OutputInvalid,
    ToolChoiceError,
    constrained_schema,
    parse_output,
    prompt_messages,
    repair_request,
    tools_system_prompt,
)
from llmos.kernel.devices import ChatRequest, Message, ToolCall, ToolSpec

WEATHER = ToolSpec(
    name="get_weather",
    description="Current weather for a city",
    parameters={
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city"],
    },
)
ADD = ToolSpec(
    name="add",
    description="Add two integers",
    parameters={
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"],
    },
)


def request(**kwargs: Any) -> ChatRequest:
    return ChatRequest(messages=[Message(role="user", content="hi")], **kwargs)


def test_no_tools_and_no_schema_means_free_text() -> None:
    assert constrained_schema(request()) is None
    assert parse_output("just text", request()) == ("just text", [])


def test_tool_choice_none_ignores_tools() -> None:
    assert constrained_schema(request(tools=[WEATHER], tool_choice="none")) is None


def test_named_tool_choice_forces_that_tool() -> None:
    schema = constrained_schema(request(tools=[WEATHER, ADD], tool_choice="add"))
    assert schema is not None
    jsonschema.validate({"name": "add", "arguments": {"a": 1, "b": 2}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "get_weather", "arguments": {"city": "Oslo"}}, schema)


def test_required_allows_any_tool_but_no_answer() -> None:
    schema = constrained_schema(request(tools=[WEATHER, ADD], tool_choice="required"))
    assert schema is not None
    jsonschema.validate({"name": "get_weather", "arguments": {"city": "Oslo"}}, schema)
    jsonschema.validate({"name": "add", "arguments": {"a": 1, "b": 2}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"answer": "no"}, schema)


def test_auto_allows_a_call_or_an_answer() -> None:
    schema = constrained_schema(request(tools=[WEATHER]))
    assert schema is not None
    jsonschema.validate({"name": "get_weather", "arguments": {"city": "Oslo"}}, schema)
    jsonschema.validate({"answer": "It is sunny."}, schema)


def test_response_schema_is_the_constraint() -> None:
    schema = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}
    assert constrained_schema(request(response_schema=schema)) == schema
    assert parse_output('{"x": 3}', request(response_schema=schema)) == ('{"x": 3}', [])
    with pytest.raises(OutputInvalid, match="'x' is a required property"):
        parse_output("{}", request(response_schema=schema))


def test_unknown_tool_choice_is_a_user_error() -> None:
    with pytest.raises(ToolChoiceError, match="does not offer"):
        constrained_schema(request(tools=[WEATHER], tool_choice="launch_rockets"))


def test_parse_tool_call() -> None:
    text, calls = parse_output(
        '{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}',
        request(tools=[WEATHER], tool_choice="required"),
    )
    assert text == ""
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", {"city": "Oslo", "days": 2})]
    assert calls[0].id.startswith("call_")


def test_parse_answer_in_auto_mode() -> None:
    assert parse_output('{"answer": "Hello"}', request(tools=[WEATHER])) == ("Hello", [])


def test_parse_accepts_a_json_code_fence() -> None:
    fenced = '```json\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n```'
    _, calls = parse_output(fenced, request(tools=[ADD], tool_choice="add"))
    assert calls[0].arguments == {"a": 1, "b": 2}


@pytest.mark.parametrize(
    ("output", "message"),
    [
        ("not json", "not valid JSON"),
        ('{"name": "add", "arguments": {"a": 1}', "not valid JSON"),
        ('{"name": "nope", "arguments": {}}', "unknown tool 'nope'"),
        ('{"name": "add", "arguments": {"a": "one", "b": 2}}', "'one' is not of type 'integer'"),
        ('{"name": "add", "arguments": {"a": 1}}', "'b' is a required property"),
        ('{"answer": "x"}', "a tool call is required"),
    ],
)
def test_invalid_output_says_what_is_wrong(output: str, message: str) -> None:
    with pytest.raises(OutputInvalid, match=message):
        parse_output(output, request(tools=[ADD, WEATHER], tool_choice="required"))


def test_wrong_tool_for_a_named_choice() -> None:
    with pytest.raises(OutputInvalid, match="must call the tool 'add'"):
        parse_output(
            '{"name": "get_weather", "arguments": {"city": "x"}}',
            request(tools=[ADD, WEATHER], tool_choice="add"),
        )


@given(a=st.integers(), b=st.integers())
def test_any_valid_call_round_trips(a: int, b: int) -> None:
    _, calls = parse_output(
        json.dumps({"name": "add", "arguments": {"a": a, "b": b}}), request(tools=[ADD], tool_choice="add")
    )
    assert calls[0].arguments == {"a": a, "b": b}


def test_tools_system_prompt_describes_every_tool() -> None:
    prompt = tools_system_prompt([WEATHER, ADD])
    for tool in (WEATHER, ADD):
        assert tool.name in prompt
        assert tool.description in prompt
        assert json.dumps(tool.parameters) in prompt
    assert '"arguments"' in prompt


def test_repair_messages_show_the_error_to_the_model() -> None:
    req = request(tools=[ADD], tool_choice="add")
    messages = repair_request(req, '{"name": "add"}', "'arguments' is a required property").messages
    assert messages[: len(req.messages)] == req.messages
    assert messages[-2] == Message(role="assistant", content='{"name": "add"}')
    assert messages[-1].role == "user"
    assert "'arguments' is a required property" in messages[-1].content


def test_prompt_messages_turn_tools_into_text() -> None:
    req = ChatRequest(
        messages=[
            Message(role="system", content="Be brief."),
            Message(role="user", content="add 1 and 2"),
            Message(role="assistant", tool_calls=[ToolCall(id="c1", name="add", arguments={"a": 1, "b": 2})]),
            Message(role="tool", name="add", tool_call_id="c1", content="3"),
        ],
        tools=[ADD],
    )
    messages = prompt_messages(req)
    assert [m.role for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[0].content.startswith("Be brief.") and "add" in messages[0].content
    assert json.loads(messages[2].content) == {"name": "add", "arguments": {"a": 1, "b": 2}}
    assert "Result of tool add" in messages[3].content and messages[3].content.endswith("3")
