"""The context window manager: what one process shows the model on each LLM call.

The window is RAM, the memory store is disk. Every prompt is assembled from parts that each
have a token budget, and together fit `n_ctx` minus the room kept for the reply:

    [system prompt + core memory blocks] [recap of paged-out turns] [history ...]
    [memories recalled for this step] [the newest user message]

When the history outgrows its budget, the oldest turns are paged out in one chunk (down to a
low watermark, so the prompt prefix then stays stable for many steps and a KV cache keeps
hitting): each turn is archived verbatim in long-term memory (so `conversation_search` and
recall find it), then the model summarises them into the running recap. Archiving goes
through the store's journaled write (intent in SQLite first, deterministic ids, upsert), so a
crash mid-page-out loses nothing and a failing summariser only costs recap quality.

A message bigger than the per-message budget (a large tool output, a pasted file) is stored
whole and replaced in the window by its head plus a pointer (`memory_read(id)`).

Core memory (MemGPT): small named blocks (persona, human, notes), always in the prompt,
capped in tokens, edited by the model through the memory tools at the end of this module.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from pydantic import BaseModel, Field

from llmos.kernel.devices import ChatRequest, LLMBackend, Message, ToolSpec
from llmos.memory.store import SHARED, MemoryHit, MemoryStore, NewRecord, Trust

CountTokens = Callable[[str], int]
Summarizer = Callable[[list[Message]], Awaitable[str]]

# Chat-template tokens around one message (ChatML: "<|im_start|>role\n" ... "<|im_end|>\n").
MESSAGE_OVERHEAD = 6
# The template's generation prompt after the last message ("<|im_start|>assistant\n").
PROMPT_OVERHEAD = 8
DEFAULT_BLOCKS = ("persona", "human", "notes")
MIN_RECALL_SCORE = 0.25
RECALL_CANDIDATES = 8


class ContextError(Exception):
    """The context cannot be laid out as configured; the message is one sentence with the fix."""


class ContextBudget(BaseModel):
    """Token budgets of the parts of a prompt. History gets what the others leave."""

    n_ctx: int = Field(ge=256)
    reserve_output: int = Field(ge=16, description="tokens kept free for the reply")
    core: int = Field(ge=0, description="core memory blocks, all together")
    recap: int = Field(ge=0, description="running summary of paged-out turns")
    recall: int = Field(ge=0, description="memories recalled from the archive for this step")
    message: int = Field(
        ge=32, description="one message larger than this is cut, with a pointer to the whole"
    )
    low_watermark: float = Field(0.5, gt=0.0, lt=1.0, description="history is paged down to this fraction")

    @classmethod
    def for_context(cls, n_ctx: int, reserve_output: int | None = None) -> ContextBudget:
        return cls(
            n_ctx=n_ctx,
            reserve_output=reserve_output if reserve_output is not None else max(64, n_ctx // 8),
            core=n_ctx // 8,
            recap=n_ctx // 10,
            recall=n_ctx // 10,
            message=max(32, n_ctx // 5),
        )


class CoreBlock(BaseModel):
    label: str
    value: str = ""
    limit: int = Field(description="tokens")


class ToolAnswer(BaseModel):
    """What a memory tool returns to the model: errors are answers it can act on, not crashes."""

    ok: bool
    message: str
    hits: list[MemoryHit] = Field(default_factory=list)


class _Turn(BaseModel):
    seq: int
    message: Message
    tokens: int


class StepStats(BaseModel):
    prompt_tokens: int
    history_turns: int
    paged_out_turns: int
    recalled: int


def message_text(message: Message) -> str:
    """The text a message contributes to the prompt (content, then its tool calls as JSON)."""
    if not message.tool_calls:
        return message.content
    calls = json.dumps([{"name": c.name, "arguments": c.arguments} for c in message.tool_calls])
    return f"{message.content}\n{calls}" if message.content else calls


def truncate_to_tokens(text: str, limit: int, count: CountTokens, *, keep: str = "head") -> str:
    """The longest head (or tail) of `text` that is at most `limit` tokens."""
    if limit <= 0:
        return ""
    if count(text) <= limit:
        return text
    lo, hi = 0, len(text)
    while lo < hi:  # binary search on characters: tokens grow with length
        mid = (lo + hi + 1) // 2
        piece = text[:mid] if keep == "head" else text[-mid:]
        if count(piece) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo] if keep == "head" else text[len(text) - lo :]


def llm_summarizer(backend: LLMBackend, max_tokens: int = 160) -> Summarizer:
    """A summariser that asks `backend` for the recap (a hidden LLM call: charge it if you meter)."""

    async def summarize(messages: list[Message]) -> str:
        transcript = "\n".join(f"{m.role}: {message_text(m)}" for m in messages)
        request = ChatRequest(
            messages=[
                Message(
                    role="system",
                    content="Summarise the conversation below in a few short sentences. Keep names, "
                    "numbers, decisions and open tasks. Write only the summary.",
                ),
                Message(role="user", content=transcript),
            ],
            max_tokens=max_tokens,
            temperature=0.0,
        )
        return (await backend.chat(request)).text.strip()

    return summarize


class ContextWindow:
    """The context of one process (`window_id`), backed by `store` under `namespace`."""

    def __init__(
        self,
        store: MemoryStore,
        *,
        namespace: str,
        window_id: str,
        count_tokens: CountTokens,
        budget: ContextBudget,
        system: str = "",
        summarize: Summarizer | None = None,
        pid: int | None = None,
        blocks: Sequence[str] = DEFAULT_BLOCKS,
        search_namespaces: Sequence[str] | None = None,
        auto_recall: bool = True,
    ) -> None:
        self.store = store
        self.namespace = namespace
        self.window_id = window_id
        self.count_tokens = count_tokens
        self.budget = budget
        self.system = system
        self.summarize = summarize
        self.pid = pid
        self.search_namespaces = list(search_namespaces or [namespace, SHARED])
        self.auto_recall = auto_recall
        saved = store.journal.core_blocks(namespace) if store.journal is not None else {}
        # Each block pays for its tags, and all of them for one header line.
        per_block = max(0, (budget.core - 24) // max(1, len(blocks)) - 12)
        self.core = {b: CoreBlock(label=b, value=saved.get(b, ""), limit=per_block) for b in blocks}
        self.turns: list[_Turn] = []
        self.recap = ""
        self.paged_through = -1  # seq of the newest paged-out turn
        self.paged_out = 0
        self.last_step: StepStats | None = None
        self._next_seq = 0
        self._restore()
        self.history_budget = self._history_budget()
        self._message_cap = min(budget.message, int(self.history_budget * budget.low_watermark) // 2)

    # ---- layout --------------------------------------------------------------------------------

    def _history_budget(self) -> int:
        b = self.budget
        system = self.count_tokens(self.system) + MESSAGE_OVERHEAD
        fixed = b.reserve_output + PROMPT_OVERHEAD + system + b.core + b.recap + b.recall
        history = b.n_ctx - fixed
        if history < 4 * 32:
            raise ContextError(
                f"n_ctx={b.n_ctx} leaves {history} tokens for the conversation after the system prompt "
                f"({system} tokens) and the memory budgets; raise llm.n_ctx or shorten the system prompt."
            )
        return history

    def tokens_of(self, message: Message) -> int:
        return self.count_tokens(message_text(message)) + MESSAGE_OVERHEAD

    @property
    def history_tokens(self) -> int:
        return sum(t.tokens for t in self.turns)

    def _restore(self) -> None:
        """Pick up the recap and turn numbering of an earlier life of this window."""
        if self.store.journal is None:
            return
        for entry in self.store.window_log(self.window_id):
            note = entry.note
            self.paged_through = max(self.paged_through, int(note.get("last_seq", -1)))
            self.paged_out += len(entry.records)
            if "recap" in note:
                self.recap = str(note["recap"])
            else:  # crashed between archiving and summarising
                self.recap = self._fallback_recap([r.text for r in entry.records])
        self._next_seq = self.paged_through + 1

    # ---- input ---------------------------------------------------------------------------------

    def add(self, message: Message) -> Message:
        """Append a message; one over the per-message budget is stored whole and cut, and the
        cut version (with its pointer) is what the window keeps and returns."""
        seq = self._next_seq
        self._next_seq += 1
        tokens = self.tokens_of(message)
        if tokens > self._message_cap:
            message = self._cut(message, seq)
            tokens = self.tokens_of(message)
        self.turns.append(_Turn(seq=seq, message=message, tokens=tokens))
        return message

    def _cut(self, message: Message, seq: int) -> Message:
        full_id = f"full:{self.window_id}:{seq}"
        trust = _trust_of(message.role)
        text = message.content
        self.store.add(
            text, namespace=self.namespace, source=f"{message.role}:{message.name or ''}", trust=trust,
            pid=self.pid, metadata={"kind": "full", "window": self.window_id, "seq": seq}, id=full_id,
        )  # fmt: skip
        total = self.count_tokens(text)
        pointer = (
            f"\n[... cut: {total} tokens in all; the whole text is memory id {full_id}; "
            f"read on with memory_read(id='{full_id}', offset=N)]"
        )
        room = (
            self._message_cap - MESSAGE_OVERHEAD - self.count_tokens(pointer) - len(message.tool_calls) * 64
        )
        head = truncate_to_tokens(text, max(16, room), self.count_tokens)
        return message.model_copy(update={"content": head + pointer})

    def resume(self, history: Sequence[Message]) -> int:
        """Rebuild the window after a restart from the process's whole message history, in the
        order it was added (the kernel replays it from its journal): the messages that were paged
        out before are skipped, the rest are added again. Returns how many were added."""
        if self.turns:
            raise ContextError("resume() rebuilds a fresh window; call it before adding messages.")
        skip = self.paged_through + 1
        self._next_seq = min(skip, len(history))
        for message in history[skip:]:
            self.add(message)
        return max(0, len(history) - skip)

    # ---- assembly ------------------------------------------------------------------------------

    async def build(self, query: str | None = None) -> list[Message]:
        """The messages of the next LLM call, within budget; pages out history when it overflows.
        Memories relevant to `query` (default: the newest user message, when it is the last
        message) are recalled into the prompt."""
        if self.history_tokens > self.history_budget:
            await self.page_out()
        if query is None and self.auto_recall and self.turns and self.turns[-1].message.role == "user":
            query = self.turns[-1].message.content
        recall, recalled = await self._recall(query) if query else (None, 0)
        messages, tokens = self._assemble(recall)
        limit = self.budget.n_ctx - self.budget.reserve_output
        # The budgets add up to the limit by construction; a tokenizer that counts a joined text
        # differently from its parts could still overshoot by a few tokens: then page out more.
        while tokens > limit and len(self.turns) > 1:
            await self.page_out(force=True)
            messages, tokens = self._assemble(recall)
        self.last_step = StepStats(
            prompt_tokens=tokens,
            history_turns=len(self.turns),
            paged_out_turns=self.paged_out,
            recalled=recalled,
        )
        return messages

    def _assemble(self, recall: Message | None) -> tuple[list[Message], int]:
        """The prompt's messages and their token count (history turns are counted once, on add)."""
        history = [t.message for t in self.turns]
        head = [self._system_message()]
        if self.recap:
            head.append(Message(role="system", content=self._recap_text()))
        if recall is not None:
            # Just before the newest user message: the history before it stays a stable prefix.
            at = len(history) - 1 if history and history[-1].role == "user" else len(history)
            history = [*history[:at], recall, *history[at:]]
        extra = [*head, recall] if recall is not None else head
        tokens = self.prompt_tokens(extra) + self.history_tokens
        return head + history, tokens

    def prompt_tokens(self, messages: Sequence[Message]) -> int:
        return sum(self.tokens_of(m) for m in messages) + PROMPT_OVERHEAD

    def _system_message(self) -> Message:
        parts = [self.system] if self.system else []
        blocks = [f"<{b.label}>\n{b.value}\n</{b.label}>" for b in self.core.values() if b.value]
        if blocks:
            parts.append("Core memory (yours to edit with core_memory_append/core_memory_replace):")
            parts.extend(blocks)
        return Message(role="system", content="\n".join(parts))

    def _recap_text(self) -> str:
        head = (
            f"Recap of {self.paged_out} earlier messages (archived verbatim; find them with "
            "conversation_search):\n"
        )
        return head + truncate_to_tokens(
            self.recap, self.budget.recap - MESSAGE_OVERHEAD - self.count_tokens(head), self.count_tokens
        )

    async def _recall(self, query: str) -> tuple[Message | None, int]:
        room = self.budget.recall - MESSAGE_OVERHEAD
        if room <= 0:
            return None, 0
        hits = await asyncio.to_thread(
            self.store.search, query, namespaces=self.search_namespaces, k=RECALL_CANDIDATES
        )
        in_window = {f"full:{self.window_id}:{t.seq}" for t in self.turns}
        header = "Recalled from long-term memory (may help):"
        lines: list[str] = []
        used = self.count_tokens(header)
        for hit in hits:
            if hit.score < MIN_RECALL_SCORE or hit.id in in_window:
                continue
            role = f"({hit.metadata['role']}) " if "role" in hit.metadata else ""
            line = "\n- " + role + truncate_to_tokens(hit.text, max(16, room // 3), self.count_tokens)
            cost = self.count_tokens(line)
            if used + cost > room:
                break
            lines.append(line)
            used += cost
        if not lines:
            return None, 0
        return Message(role="system", content=header + "".join(lines)), len(lines)

    # ---- paging --------------------------------------------------------------------------------

    async def page_out(self, force: bool = False) -> int:
        """Move the oldest turns to long-term memory until history is under the low watermark
        (`force`: at least one turn); returns how many were paged out. Archive first
        (journaled), then summarise."""
        target = int(self.history_budget * self.budget.low_watermark)
        if force:
            target = min(target, self.history_tokens - 1)
        total = self.history_tokens
        count = 0
        while count < len(self.turns) - 1 and total > target:
            total -= self.turns[count].tokens
            count += 1
        # A tool result goes with the call it answers.
        while count < len(self.turns) - 1 and self.turns[count].message.role == "tool":
            count += 1
        if count == 0:
            return 0
        victims = self.turns[:count]
        records = [self._turn_record(t) for t in victims]
        note: dict[str, Any] = {"first_seq": victims[0].seq, "last_seq": victims[-1].seq}
        intent_id = await asyncio.to_thread(self.store.write_journaled, self.window_id, records, note)
        recap = await self._summarise([t.message for t in victims])
        note["recap"] = recap
        await asyncio.to_thread(self.store.set_note, intent_id, note)
        self.recap = recap
        self.turns = self.turns[count:]
        self.paged_through = victims[-1].seq
        self.paged_out += count
        return count

    def _turn_record(self, turn: _Turn) -> NewRecord:
        m = turn.message
        trust = _trust_of(m.role)
        return NewRecord(
            id=f"turn:{self.window_id}:{turn.seq}",
            text=message_text(m),
            namespace=self.namespace,
            source=f"conversation:{m.role}",
            trust=trust,
            pid=self.pid,
            metadata={"kind": "turn", "window": self.window_id, "seq": turn.seq, "role": m.role},
        )

    async def _summarise(self, messages: list[Message]) -> str:
        if self.summarize is not None:
            prior = [Message(role="system", content=f"Summary so far: {self.recap}")] if self.recap else []
            try:
                summary = (await self.summarize(prior + messages)).strip()
            except Exception:
                # The turns are archived already; a failed summary only makes the recap cruder.
                summary = ""
            if summary:
                return truncate_to_tokens(summary, self.budget.recap, self.count_tokens)
        return self._fallback_recap([message_text(m) for m in messages])

    def _fallback_recap(self, texts: list[str]) -> str:
        """A mechanical recap: the old one plus the start of each paged-out message, newest kept."""
        gist = " | ".join(" ".join(t.split())[:80] for t in texts)
        combined = f"{self.recap} | {gist}" if self.recap else gist
        return truncate_to_tokens(combined, self.budget.recap, self.count_tokens, keep="tail")

    # ---- memory tools (backing functions) -------------------------------------------------------

    def core_memory_append(self, label: str, content: str) -> ToolAnswer:
        block = self.core.get(label)
        if block is None:
            return self._unknown_block(label)
        value = f"{block.value}\n{content}".strip() if block.value else content.strip()
        return self._set_block(block, value)

    def core_memory_replace(self, label: str, old: str, new: str) -> ToolAnswer:
        block = self.core.get(label)
        if block is None:
            return self._unknown_block(label)
        if not old or old not in block.value:
            return ToolAnswer(
                ok=False, message=f"Text {old!r} is not in block '{label}'; copy it exactly from the block."
            )
        return self._set_block(block, block.value.replace(old, new, 1).strip())

    def _unknown_block(self, label: str) -> ToolAnswer:
        return ToolAnswer(
            ok=False, message=f"No core memory block '{label}'; blocks: {', '.join(self.core)}."
        )

    def _set_block(self, block: CoreBlock, value: str) -> ToolAnswer:
        size = self.count_tokens(value)
        if size > block.limit:
            return ToolAnswer(
                ok=False,
                message=f"Block '{block.label}' would be {size} tokens, over its limit of {block.limit}; "
                "replace old text with a shorter version, or move details to archival_insert.",
            )
        block.value = value
        if self.store.journal is not None:
            self.store.journal.save_core_block(self.namespace, block.label, value)
        return ToolAnswer(ok=True, message=f"Block '{block.label}' is now {size}/{block.limit} tokens.")

    def archival_insert(self, content: str) -> ToolAnswer:
        if not content.strip():
            return ToolAnswer(ok=False, message="Nothing to store: content is empty.")
        record_id = self.store.add(
            content, namespace=self.namespace, source="archival_insert", trust="model", pid=self.pid,
            metadata={"kind": "archival", "window": self.window_id},
        )  # fmt: skip
        return ToolAnswer(ok=True, message=f"Stored as memory id {record_id}.")

    def archival_search(self, query: str, k: int = 5) -> ToolAnswer:
        """Long-term memory other than conversation turns (facts, notes, stored tool results)."""
        return self._search(query, k, where={"kind": {"$ne": "turn"}})

    def conversation_search(self, query: str, k: int = 5) -> ToolAnswer:
        """Earlier messages of this agent that are no longer in the window."""
        return self._search(query, k, where={"kind": "turn"}, namespaces=[self.namespace])

    def _search(
        self, query: str, k: int, where: dict[str, Any], namespaces: list[str] | None = None
    ) -> ToolAnswer:
        if not query.strip():
            return ToolAnswer(ok=False, message="The query is empty; say what to look for.")
        k = max(1, min(int(k), 20))
        hits = self.store.search(query, namespaces=namespaces or self.search_namespaces, k=k, where=where)
        return ToolAnswer(ok=True, message=f"{len(hits)} result(s), best first.", hits=hits)

    def memory_read(self, id: str, offset: int = 0, length: int = 4000) -> ToolAnswer:
        """A slice of a stored record (e.g. the whole of a cut tool output)."""
        record = self.store.get(id)
        if record is None or record.namespace not in self.search_namespaces:
            return ToolAnswer(ok=False, message=f"No memory with id {id!r} that this process may read.")
        offset = max(0, int(offset))
        piece = record.text[offset : offset + max(1, min(int(length), 16000))]
        end = offset + len(piece)
        more = ""
        if end < len(record.text):
            more = f" {len(record.text) - end} characters follow; read on with offset={end}."
        return ToolAnswer(ok=True, message=f"Characters {offset}-{end} of {len(record.text)}.{more}\n{piece}")


def _spec(name: str, description: str, properties: dict[str, Any], required: list[str]) -> ToolSpec:
    return ToolSpec(
        name=name,
        description=description,
        parameters={"type": "object", "properties": properties, "required": required},
    )


_STR = {"type": "string"}
_INT = {"type": "integer", "minimum": 1, "maximum": 20}
MEMORY_TOOL_SPECS: list[ToolSpec] = [
    _spec(
        "core_memory_append", "Add a line to a core memory block (always in your context).",
        {"label": _STR, "content": _STR}, ["label", "content"],
    ),
    _spec(
        "core_memory_replace", "Replace text in a core memory block (empty new text deletes it).",
        {"label": _STR, "old": _STR, "new": _STR}, ["label", "old", "new"],
    ),
    _spec(
        "archival_insert", "Store a fact in long-term memory for later search.",
        {"content": _STR}, ["content"],
    ),
    _spec(
        "archival_search", "Search long-term memory by meaning.", {"query": _STR, "k": _INT}, ["query"],
    ),
    _spec(
        "conversation_search", "Search earlier messages of this conversation that left the context.",
        {"query": _STR, "k": _INT}, ["query"],
    ),
    _spec(
        "memory_read", "Read a stored memory by id, e.g. the whole of a cut tool output.",
        {"id": _STR, "offset": {"type": "integer", "minimum": 0}}, ["id"],
    ),
]  # fmt: skip


__all__ = [
    "MEMORY_TOOL_SPECS",
    "ContextBudget",
    "ContextError",
    "ContextWindow",
    "CoreBlock",
    "StepStats",
    "Summarizer",
    "ToolAnswer",
    "llm_summarizer",
    "message_text",
    "truncate_to_tokens",
]


def _trust_of(role: str) -> Trust:
    """Who a message's words come from, for the provenance of what is archived."""
    return "user" if role == "user" else "tool" if role == "tool" else "model"
