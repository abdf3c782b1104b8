"""Tool calls and structured output for models without native tool calling.

The model is told about the tools in its system prompt and its output is forced (by a GBNF
grammar locally, by `response_format` on a server) to match a JSON schema:

- a tool call is `{"name": "<tool>", "arguments": {...}}`;
- with `tool_choice="auto"` the model may instead answer `{"answer": "..."}`;
- with `response_schema` the output is a JSON document following that schema.

`parse_output` validates what came back; a violation raises `OutputInvalid`, whose message is
shown to the model by `repair_request` so it can try again (a bounded loop in the backend).
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

import jsonschema  # type: ignore[import-untyped]  # no stubs installed

from llmos.kernel.devices import ChatRequest, LLMError, Message, ToolCall, ToolSpec

ANSWER_KEY = "answer"
# Retries of a constrained answer that does not parse, each shown what was wrong (both backends).
MAX_REPAIRS = 2
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


class OutputInvalid(Exception):
    """The model's output does not follow the required format; the message says how."""


class ToolChoiceError(LLMError):
    """The request names a tool it does not offer."""


def _tool_call_schema(tool: ToolSpec) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"name": {"const": tool.name}, "arguments": tool.parameters},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def _answer_schema(request: ChatRequest) -> dict[str, Any]:
    answer = request.response_schema if request.response_schema is not None else {"type": "string"}
    return {
        "type": "object",
        "properties": {ANSWER_KEY: answer},
        "required": [ANSWER_KEY],
        "additionalProperties": False,
    }


def _one_of(schemas: list[dict[str, Any]]) -> dict[str, Any]:
    return schemas[0] if len(schemas) == 1 else {"anyOf": schemas}


def uses_tools(request: ChatRequest) -> bool:
    return bool(request.tools) and request.tool_choice != "none"


def _chosen_tool(request: ChatRequest) -> ToolSpec | None:
    """The single tool the request forces, or None when the choice is auto/required."""
    if request.tool_choice in ("auto", "required"):
        return None
    for tool in request.tools:
        if tool.name == request.tool_choice:
            return tool
    offered = ", ".join(t.name for t in request.tools) or "none"
    raise ToolChoiceError(
        f"tool_choice names tool {request.tool_choice!r}, which the request does not offer "
        f"(offered: {offered}); pass that tool in `tools` or use 'auto'/'required'."
    )


def constrained_schema(request: ChatRequest) -> dict[str, Any] | None:
    """The JSON schema the model's output must follow, or None for free text."""
    if not uses_tools(request):
        return request.response_schema
    chosen = _chosen_tool(request)
    if chosen is not None:
        return _tool_call_schema(chosen)
    calls = [_tool_call_schema(t) for t in request.tools]
    if request.tool_choice == "required":
        return _one_of(calls)
    return {"anyOf": [*calls, _answer_schema(request)]}


def _error_text(error: jsonschema.ValidationError) -> str:
    where = "/".join(str(p) for p in error.absolute_path)
    return f"at '{where}': {error.message}" if where else error.message


def _validate(value: Any, schema: dict[str, Any]) -> None:
    validator = jsonschema.Draft202012Validator(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(value))
    if error is not None:
        raise OutputInvalid(_error_text(error))


def _load_json(text: str) -> Any:
    stripped = text.strip()
    fenced = _FENCE.match(stripped)
    if fenced:
        stripped = fenced.group(1)
    try:
        return json.loads(stripped)
    except json.JSONDecodeError as exc:
        raise OutputInvalid(f"the output is not valid JSON ({exc.msg} at character {exc.pos})") from None


def _parse_tool_call(value: dict[str, Any], request: ChatRequest) -> ToolCall:
    tools = {t.name: t for t in request.tools}
    name = value.get("name")
    if not isinstance(name, str) or name not in tools:
        raise OutputInvalid(f"unknown tool {name!r}; the tools are: {', '.join(tools)}")
    chosen = _chosen_tool(request)
    if chosen is not None and chosen.name != name:
        raise OutputInvalid(f"you must call the tool {chosen.name!r}, not {name!r}")
    # Validating against the one tool's schema gives a precise message (anyOf errors do not).
    _validate(value, _tool_call_schema(tools[name]))
    return ToolCall(id=f"call_{uuid.uuid4().hex[:12]}", name=name, arguments=value["arguments"])


def parse_output(text: str, request: ChatRequest) -> tuple[str, list[ToolCall]]:
    """Validate the model's output for `request`; returns (answer text, tool calls).

    Raises OutputInvalid with a message meant for the model when the output breaks the format.
    """
    schema = constrained_schema(request)
    if schema is None:
        return text, []
    value = _load_json(text)
    if not uses_tools(request):
        _validate(value, schema)
        return text.strip(), []
    if isinstance(value, dict) and "name" in value:
        return "", [_parse_tool_call(value, request)]
    if request.tool_choice != "auto":
        raise OutputInvalid('a tool call is required: reply with {"name": ..., "arguments": {...}}')
    _validate(value, _answer_schema(request))
    answer = value[ANSWER_KEY]
    return (answer if isinstance(answer, str) else json.dumps(answer)), []


def tools_system_prompt(tools: list[ToolSpec]) -> str:
    """The instruction text that describes the tools and the reply format to the model."""
    lines = ["You can call these tools:"]
    for tool in tools:
        lines.append(f"- {tool.name}: {tool.description or 'no description'}")
        lines.append(f"  arguments (JSON schema): {json.dumps(tool.parameters)}")
    lines += [
        "",
        "To call a tool, reply with only one JSON object of this form:",
        '{"name": "<tool name>", "arguments": {<arguments following the tool\'s schema>}}',
        f'To answer without calling a tool, reply with only: {{"{ANSWER_KEY}": "<your answer>"}}',
        "A tool's result comes back in the next message.",
    ]
    return "\n".join(lines)


def schema_system_prompt(schema: dict[str, Any]) -> str:
    """The instruction text for structured output: reply with JSON following `schema`."""
    return f"Reply with only a JSON document that follows this JSON schema: {json.dumps(schema)}"


def assistant_text(message: Message) -> str:
    """What the model produced for an assistant message, in the JSON form it was asked for."""
    if message.tool_calls:
        return "\n".join(json.dumps({"name": c.name, "arguments": c.arguments}) for c in message.tool_calls)
    return message.content


def prompt_messages(request: ChatRequest) -> list[Message]:
    """The request as plain system/user/assistant messages for a model without native tools:
    the tools go into the system prompt, calls and results become text."""
    messages: list[Message] = []
    for message in request.messages:
        if message.role == "tool":
            label = f"Result of tool {message.name}" if message.name else "Tool result"
            call = f" (call {message.tool_call_id})" if message.tool_call_id else ""
            messages.append(Message(role="user", content=f"{label}{call}:\n{message.content}"))
        elif message.role == "assistant" and message.tool_calls:
            messages.append(Message(role="assistant", content=assistant_text(message)))
        else:
            messages.append(Message(role=message.role, content=message.content))
    prompt = ""
    if uses_tools(request):
        prompt = tools_system_prompt(request.tools)
    elif request.response_schema is not None:
        prompt = schema_system_prompt(request.response_schema)
    if prompt:
        if messages and messages[0].role == "system":
            messages[0] = Message(role="system", content=f"{messages[0].content}\n\n{prompt}".strip())
        else:
            messages.insert(0, Message(role="system", content=prompt))
    return messages


def repair_request(request: ChatRequest, bad_output: str, error: str) -> ChatRequest:
    """The request for one repair attempt: the conversation, the bad output and what is wrong with it."""
    if uses_tools(request):
        expected = "a JSON object in the required tool-call format"
    else:
        expected = "a JSON document that follows the required schema"
    messages = [
        *request.messages,
        Message(role="assistant", content=bad_output),
        Message(
            role="user",
            content=f"Your reply was invalid: {error}. Reply again with only {expected}.",
        ),
    ]
    return request.model_copy(update={"messages": messages})


def invalid_output_text(bad_output: str, error: OutputInvalid) -> str:
    """What a reply that stayed invalid after every repair says: the output, then why it failed."""
    return f"{bad_output}\n[invalid output: {error}]"


__all__ = [
    "MAX_REPAIRS",
    "OutputInvalid",
    "ToolChoiceError",
    "assistant_text",
    "constrained_schema",
    "invalid_output_text",
    "parse_output",
    "prompt_messages",
    "repair_request",
    "schema_system_prompt",
    "tools_system_prompt",
    "uses_tools",
]
