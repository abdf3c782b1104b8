"""Small-model guards: named checks the agent loop runs on each action, in order.

A small model answers before it has computed anything, answers with something its code never
printed, repeats an action that failed, or re-runs the same code forever. Each guard looks at one
action (before it runs, or after) and what the run has seen so far, and either lets it pass
(None), takes an answer from it (`Answer`), or sends the model a message instead of running it
(`SendBack`). A style lists the guards that fit it; `GUARDS` lists them all.

    compute_first      code: an answer before any code ran is sent back to be computed
    check_answer       code: once, an answer no code printed is shown the last output
    final_answer       both: a final_answer call is the answer (with its sources if asked)
    rerun_is_answer    code: re-running code that printed one short line answers with that line
    unstick            both: repeating an action that failed asks for another way, and resamples
    printed_answer     code, after: code that printed "Final answer: X" answers X
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

from llmos.agents.styles import FINAL_ANSWER, FINAL_LINE, Seen
from llmos.kernel.devices import ToolCall

COMPUTE_FIRST = "Task: {task}\nDo not guess: compute the answer with a ```python code block first."
CHECK_ANSWER = (
    "Your answer {answer!r} is not what the code printed. The code printed:\n{last}\n"
    "Reply 'Final answer: <answer>' with the printed result."
)
REPEATED_FAILURE = (
    "You sent the same code again, and it fails the same way:\n{error}\n"
    "Write a different, simpler program that avoids this error. Task: {task}"
)


@dataclass(frozen=True)
class Answer:
    text: str
    note: str | None = None


@dataclass(frozen=True)
class SendBack:
    """Instead of running the action: tell the model this (and, with `resample`, sample its next
    reply rather than decode it greedily, to get it out of a loop)."""

    message: str
    why: str
    resample: bool = False


Verdict = Answer | SendBack | None


def call_key(call: ToolCall) -> str:
    return json.dumps([call.name, call.arguments], sort_keys=True)


@dataclass
class Record:
    """What a run has seen so far, for the guards to judge the next action by."""

    task: str
    cite_sources: bool = False
    results: dict[str, Seen] = field(default_factory=dict)  # each action made (call_key): what it showed
    fired: set[str] = field(default_factory=set)  # guards that have sent something back

    def printed(self) -> list[str]:
        return [seen.text for seen in self.results.values() if seen.ok]


Guard = Callable[[Record, ToolCall], Verdict]
After = Callable[[Record, ToolCall, Seen], Verdict]


def compute_first(record: Record, call: ToolCall) -> Verdict:
    if call.name == FINAL_ANSWER.name and not record.printed():
        return SendBack(COMPUTE_FIRST.format(task=record.task), "an answer before any code ran")
    return None


def check_answer(record: Record, call: ToolCall) -> Verdict:
    printed = record.printed()
    if call.name != FINAL_ANSWER.name or not printed or "check_answer" in record.fired:
        return None
    answer = str(call.arguments.get("answer", "")).strip()
    if answer in "\n".join(printed):
        return None
    last = printed[-1].removeprefix("stdout: ").strip()
    return SendBack(CHECK_ANSWER.format(answer=answer, last=last), "the answer is not what the code printed")


def final_answer(record: Record, call: ToolCall) -> Verdict:
    answer = call.arguments.get("answer")
    if call.name != FINAL_ANSWER.name or not isinstance(answer, str | int | float):
        return None  # a malformed final_answer runs as a call, and its error goes back to the model
    text = str(answer)
    if record.cite_sources:
        text += f" [sources: {', '.join(map(str, call.arguments.get('sources', [])))}]"
    return Answer(text)


def rerun_is_answer(record: Record, call: ToolCall) -> Verdict:
    # Re-running code that already printed one short line is how a small model that is stuck
    # says "this is it": take that line as its answer instead of looping.
    earlier = record.results.get(call_key(call))
    if earlier is None or not earlier.ok or not earlier.text.startswith("stdout: "):
        return None
    printed = earlier.text.removeprefix("stdout: ").strip()
    if printed and "\n" not in printed and len(printed) <= 200:
        return Answer(printed, note="the model re-ran the same code")
    return None


def unstick(record: Record, call: ToolCall) -> Verdict:
    earlier = record.results.get(call_key(call))
    if earlier is None or earlier.ok:
        return None
    message = REPEATED_FAILURE.format(error=earlier.text[-300:], task=record.task)
    return SendBack(message, "the model repeated an action that failed", resample=True)


def printed_answer(record: Record, call: ToolCall, seen: Seen) -> Verdict:
    if seen.ok and (final := FINAL_LINE.search(seen.text)):
        return Answer(final.group(1).strip())
    return None


GUARDS: dict[str, Guard | After] = {
    guard.__name__: guard
    for guard in (compute_first, check_answer, final_answer, rerun_is_answer, unstick, printed_answer)
}
BEFORE: dict[str, list[Guard]] = {
    "tools": [final_answer, unstick],
    "code": [compute_first, check_answer, final_answer, rerun_is_answer, unstick],
}
AFTER: dict[str, list[After]] = {"tools": [], "code": [printed_answer]}
