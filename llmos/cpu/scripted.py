"""A scripted fake LLM: it replies from a list, for tests of control flow (never for quality).

Each reply is a string (the answer text), a `ChatResult` (for tool calls), or a function of the
request. Usage is counted as whitespace-separated words, so budgets can be tested exactly.
With `by_turn=True` the reply is chosen by the number of assistant turns already in the
request, not by call order: each conversation follows the script from its start, and a resumed
process (whose earlier calls are replayed from the journal) gets the reply for its turn.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable
from pathlib import Path

from llmos.kernel.devices import ChatRequest, ChatResult, ModelInfo, TextCallback, TokenUsage, ToolCall

ScriptedReply = str | ChatResult | Callable[[ChatRequest], str | ChatResult]


class ScriptedLLM:
    name = "scripted"

    def __init__(
        self,
        replies: Iterable[ScriptedReply],
        *,
        by_turn: bool = False,
        delay_s: float = 0.0,
        context_length: int = 4096,
    ) -> None:
        self.replies = list(replies)
        self.by_turn = by_turn
        self.delay_s = delay_s  # seconds "generating" before each reply
        self.requests: list[ChatRequest] = []
        self._info = ModelInfo(name="scripted", context_length=context_length, family="scripted")

    @classmethod
    def from_file(cls, path: Path) -> ScriptedLLM:
        """Replies by turn from a JSON file: {"delay_s": 0.0, "replies": [...]} or just the list.

        A string reply is an answer; {"tool": NAME, "arguments": {...}} is a tool call.
        """
        data = json.loads(path.read_text())
        data = data if isinstance(data, dict) else {"replies": data}
        replies: list[ScriptedReply] = []
        for index, item in enumerate(data["replies"]):
            if isinstance(item, str):
                replies.append(item)
                continue
            call = ToolCall(id=f"scripted-{index}", name=item["tool"], arguments=item.get("arguments", {}))
            replies.append(ChatResult(text=json.dumps(item), tool_calls=[call], finish_reason="tool_calls"))
        return cls(replies, by_turn=True, delay_s=float(data.get("delay_s", 0.0)))

    @property
    def info(self) -> ModelInfo:
        return self._info

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    async def chat(self, request: ChatRequest, on_text: TextCallback | None = None) -> ChatResult:
        self.requests.append(request)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.by_turn:
            turn = sum(1 for message in request.messages if message.role == "assistant")
            if turn >= len(self.replies):
                raise RuntimeError(f"the scripted LLM has no reply for turn {turn}")
            reply = self.replies[turn]
        elif self.replies:
            reply = self.replies.pop(0)
        else:
            raise RuntimeError("the scripted LLM has no replies left")
        if callable(reply):
            reply = reply(request)
        result = reply if isinstance(reply, ChatResult) else ChatResult(text=reply)
        if request.max_tokens is not None and self.count_tokens(result.text) > request.max_tokens:
            # A token is a word here: cut like a real backend does at max_tokens.
            cut = " ".join(result.text.split()[: request.max_tokens])
            result = result.model_copy(update={"text": cut, "finish_reason": "length"})
        if on_text is not None and result.text:  # streamed word by word, like a real backend
            for piece in result.text.split(" "):
                on_text(piece + " ")
        prompt = sum(self.count_tokens(message.content) for message in request.messages)
        result = result.model_copy(
            update={
                "usage": TokenUsage(prompt_tokens=prompt, completion_tokens=self.count_tokens(result.text)),
                "backend": self.name,
                "model": self.name,
            }
        )
        return result

    async def aclose(self) -> None:
        pass
