"""How a model acts in the agent loop: two small strategies behind one interface.

- `ToolStyle`: every action is a JSON tool call, generated under a JSON-schema grammar so even a
  0.5B model emits valid calls; the answer is itself a call (`final_answer`).
- `CodeStyle`: the model writes a ```python block that runs in the sandbox through the `python`
  tool, REPL-style (variables live on between blocks); it answers with a line `Final answer: ...`.

A style says what the model is offered (tools, tool choice, stop strings), how its reply becomes
actions, and how what an action showed is put back to it. Each also names the guards that fit it
(llmos/agents/guards.py).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Protocol

from llmos.kernel.devices import ChatResult, Message, ToolCall, ToolSpec

FINAL_ANSWER = ToolSpec(
    name="final_answer",
    description="Give the final answer to the task. Call it once you know the answer.",
    parameters={
        "type": "object",
        "properties": {"answer": {"type": "string", "description": "the answer, complete and exact"}},
        "required": ["answer"],
        "additionalProperties": False,
    },
)

FINAL_ANSWER_WITH_SOURCES = ToolSpec(
    name="final_answer",
    description="Give the final answer and the sources (file names, URLs) it comes from.",
    parameters={
        "type": "object",
        "properties": {
            "answer": {"type": "string", "description": "the answer, complete and exact"},
            "sources": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        },
        "required": ["answer", "sources"],
        "additionalProperties": False,
    },
)

NEXT_AFTER_SUCCESS = "(If this answers the task, call final_answer with the answer now.)"
NEXT_AFTER_ERROR = "(That failed: read the error, then fix the call or try another way.)"
REPEATED = "(You made this exact call before and saw its result: do not repeat it, answer or change it.)"

# The first turn asks only for code: told about "Final answer:" up front, qwen2.5-coder-0.5b
# writes print(Final answer: {x}). Each observation then says how to answer.
CODE_RULES = (
    "\n\nReply with one ```python code block: a Python program that computes the answer and prints it "
    "with print(). It runs in a sandbox and you will see what it prints."
)
# Measured on qwen2.5-coder-0.5b: restating the task and naming the one reply wanted gets a final
# answer; offering "or write more code" makes it re-run the same block forever.
CODE_OBSERVATION = (
    "The code printed:\n{output}\n\nTask: {task}\nReply 'Final answer: <answer>' if this is the answer."
)
CODE_FAILED = "The code failed:\n{output}\n\nTask: {task}\nFix the code and reply with a new code block."
CODE_BLOCK = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)(?:```|$)", re.S)
FINAL_LINE = re.compile(r"final answer\s*:\s*(.+)", re.I)


@dataclass(frozen=True)
class Seen:
    """What one action showed the model: whether it worked, and its output as text."""

    ok: bool
    text: str


class Style(Protocol):
    name: str
    how_to_act: str  # what the model is reminded to reply with when its reply held no action

    def instructions(self, base: str) -> str: ...

    def request(self) -> dict[str, Any]:
        """The llm.chat arguments of every step in this style: tools, tool_choice, stop."""
        ...

    def actions(self, result: ChatResult) -> list[ToolCall]: ...

    def said(self, result: ChatResult, actions: list[ToolCall]) -> Message:
        """The model's reply as it goes into the conversation."""
        ...

    def observation(self, call: ToolCall, seen: Seen, *, repeated: bool) -> Message:
        """What an action showed, as the next message to the model."""
        ...


class ToolStyle:
    name = "tools"

    def __init__(self, tools: list[ToolSpec], final: ToolSpec) -> None:
        self.tools = [*tools, final]
        self.how_to_act = f"exactly one call to one of: {', '.join(t.name for t in self.tools)}"

    def instructions(self, base: str) -> str:
        return base

    def request(self) -> dict[str, Any]:
        return {"tools": self.tools, "tool_choice": "required"}

    def actions(self, result: ChatResult) -> list[ToolCall]:
        return result.tool_calls

    def said(self, result: ChatResult, actions: list[ToolCall]) -> Message:
        return Message(role="assistant", content=result.text, tool_calls=actions)

    def observation(self, call: ToolCall, seen: Seen, *, repeated: bool) -> Message:
        # Small models tend to repeat a call that already worked: say what to do next.
        hint = REPEATED if repeated else NEXT_AFTER_SUCCESS if seen.ok else NEXT_AFTER_ERROR
        return Message(role="tool", name=call.name, tool_call_id=call.id, content=f"{seen.text}\n\n{hint}")


class CodeStyle:
    name = "code"
    how_to_act = "a ```python code block, or a line 'Final answer: ...'"

    def __init__(self, task: str) -> None:
        self.task = task

    def instructions(self, base: str) -> str:
        return base + CODE_RULES

    def request(self) -> dict[str, Any]:
        return {"tools": [], "tool_choice": "none", "stop": ["\nOutput:", "\nObservation:"]}

    def actions(self, result: ChatResult) -> list[ToolCall]:
        """Its first Python block, or its final answer (also inside a block, where small models put it)."""
        if final := FINAL_LINE.search(result.text):
            answer = final.group(1).strip()
            return [ToolCall(id="final", name=FINAL_ANSWER.name, arguments={"answer": answer})]
        if block := CODE_BLOCK.search(result.text):
            return [ToolCall(id="code", name="python", arguments={"code": block.group(1).strip()})]
        return []

    def said(self, result: ChatResult, actions: list[ToolCall]) -> Message:
        return Message(role="assistant", content=result.text)

    def observation(self, call: ToolCall, seen: Seen, *, repeated: bool) -> Message:
        # Small coder models follow a restated task best.
        template = CODE_OBSERVATION if seen.ok else CODE_FAILED
        printed = seen.text.removeprefix("stdout: ") if seen.text.count(": ") == 1 else seen.text
        return Message(role="user", content=template.format(output=printed, task=self.task))


def as_text(value: Any) -> str:
    """A tool's output as plain `key: value` lines, which small models follow best."""
    if isinstance(value, dict):
        return "\n".join(f"{key}: {as_text(item)}" for key, item in value.items())
    return value if isinstance(value, str) else json.dumps(value, default=str)
