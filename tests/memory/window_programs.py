"""Helpers of the memory tests: a scripted model with a real tokenizer, and programs with a context
window, importable by one name in every kernel (a resumed process is started again from its
'module:function'): the crash tests run them in a child OS process and resume them in the test."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from llmos.cpu.scripted import ScriptedLLM, ScriptedReply
from llmos.kernel.devices import Message
from llmos.kernel.process import Process
from llmos.memory.context import ContextWindow

NAMESPACE = "agent:crash"


class TokenizedLLM(ScriptedLLM):
    """The scripted fake model, counting tokens with a real tokenizer (what `llm.count` answers)."""

    def __init__(
        self,
        count: Callable[[str], int],
        replies: list[ScriptedReply] | None = None,
        context_length: int = 2048,
    ) -> None:
        super().__init__(replies or [], context_length=context_length)
        self.count = count

    def count_tokens(self, text: str) -> int:
        return self.count(text)


def turn_text(i: int) -> str:
    return f"turn {i} " + "cargo " * 20


async def chatter(proc: Process, turns: int) -> dict[str, Any]:
    """Add `turns` messages to a 1024-token window and build it once (which pages most out);
    the summary is an llm.chat syscall, as an agent makes it."""

    async def summarize(messages: list[Message]) -> str:
        transcript = "\n".join(f"{m.role}: {m.content}" for m in messages)
        reply = await proc.syscall(
            "llm.chat",
            messages=[
                {"role": "system", "content": "Summarise this part of a conversation in one sentence."},
                {"role": "user", "content": transcript},
            ],
            max_tokens=32,
        )
        return str(reply.unwrap().text)

    window = await ContextWindow.open(
        proc, namespace=NAMESPACE, window_id=f"process-{proc.pid}", system="You keep the cargo log.",
        reserve_output=64, summarize=summarize, auto_recall=False,
    )  # fmt: skip
    for i in range(turns):
        window.add(Message(role="user" if i % 2 == 0 else "assistant", content=turn_text(i)))
    await window.build()
    return {
        "paged_out": window.paged_out,
        "kept": [t.message.content for t in window.turns],
        "recap": window.recap,
    }
