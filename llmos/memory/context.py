"""The context window manager: what one process shows the model on each LLM call.

The window is RAM, the memory store is disk. Every prompt is assembled from parts that each
have a token budget, and together fit `n_ctx` minus the room kept for the reply:

    [system prompt + core memory blocks] [recap of paged-out turns] [history ...]
    [memories recalled for this step] [the newest user message]

When the history outgrows its budget, the oldest turns are paged out in one chunk (down to a
low watermark, so the prompt prefix then stays stable for many steps and a KV cache keeps
hitting): each turn is archived verbatim in long-term memory (so `conversation_search` and
recall find it), then the model summarises them into the running recap. A failing summariser
only costs recap quality: the turns are archived before it is asked.

A message bigger than the per-message budget (a large tool output, a pasted file) is stored
whole and replaced in the window by its head plus a pointer (`memory_read(id)`).

Core memory (MemGPT): small named blocks (persona, human, notes), always in the prompt,
capped in tokens, edited by the model through the memory tools at the end of this module.
Each block is a memory record (`core:<namespace>:<label>`), so it outlives the process.

The window acts only through its process's syscalls: `llm.info` (the model's context size),
`llm.count` (token counts, batched: one call per build while nothing pages out, and each
message is counted once), `mem.add`, `mem.search` and `mem.get`. So all it does is checked
against the process's capabilities (`memory`, `llm`), journaled, shown by `llmos log`, and
replayed on resume: a resumed process rebuilds its window by replaying its calls. A crash in
the middle of a page-out loses no turn: the `mem.add` of the archived turns is journaled
before it runs and its records have deterministic ids, so the resumed process runs it again and
overwrites whatever part of it had landed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, Field

from llmos.kernel.devices import (
    SHARED,
    MemoryHit,
    MemoryRecord,
    Message,
    ModelInfo,
    ToolSpec,
    Trust,
    Where,
)
from llmos.kernel.process import Process
from llmos.kernel.program import ErrorCode

CountTexts = Callable[[list[str]], Awaitable[list[int]]]
Summarizer = Callable[[list[Message]], Awaitable[str]]
Keep = Literal["head", "tail"]

# Chat-template tokens around one message (ChatML: "<|im_start|>role\n" ... "<|im_end|>\n").
MESSAGE_OVERHEAD = 6
# The template's generation prompt after the last message ("<|im_start|>assistant\n").
PROMPT_OVERHEAD = 8
DEFAULT_BLOCKS = ("persona", "human", "notes")
MIN_RECALL_SCORE = 0.25
RECALL_CANDIDATES = 8
# Room kept in a cut message for each of its tool calls (their JSON is part of its text).
TOOL_CALL_ROOM = 64
MAX_RECORDS_PER_ADD = 1000  # what one mem.add takes
# More characters than any token has (whitespace runs aside): N tokens never need more than this.
MAX_CHARS_PER_TOKEN = 32
# Token counts of texts other than turns (system prompt, recap, headers) are kept; the cache is
# emptied when it grows past this, which a replay does at the same point.
COUNT_CACHE_SIZE = 256
# Truncation: prefixes counted per round, and rounds at most (a few syscalls, not log2(n)).
CANDIDATES_PER_ROUND = 8
TRUNCATION_ROUNDS = 3
NOT_TURNS: Where = {"kind": {"$nin": ["turn", "core"]}}


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


class Turn(BaseModel):
    seq: int
    message: Message
    tokens: int | None = Field(None, description="with the message overhead; None until the next build")
    cut: bool = False  # its content was stored whole and cut to a head and a pointer


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


# ---- truncation ----------------------------------------------------------------------------------


@dataclass
class _Truncation:
    """One text being cut to a token limit: the longest piece known to fit, the shortest known not to."""

    text: str
    limit: int
    keep: Keep
    total: int | None
    fits: int = 0  # characters
    fits_tokens: int = 0
    over: int = 0  # characters; 0 until known

    def piece(self, chars: int) -> str:
        return self.text[:chars] if self.keep == "head" else self.text[len(self.text) - chars :]

    @property
    def settled(self) -> bool:
        return self.over - self.fits <= max(1, self.fits // 100)

    def candidates(self, first: bool) -> list[int]:
        if first and self.total:  # around the length the text's own characters per token predict
            guess = len(self.text) * self.limit / self.total
            factors = (0.5, 0.7, 0.8, 0.9, 0.95, 1.0, 1.05, 1.15)
            guessed = sorted(p for p in {int(guess * f) for f in factors} if self.fits < p < self.over)
            if guessed:
                return guessed
        # Evenly inside the bracket still open.
        step = (self.over - self.fits) / (CANDIDATES_PER_ROUND + 1)
        points = {int(self.fits + step * i) for i in range(1, CANDIDATES_PER_ROUND + 1)}
        return sorted(p for p in points if self.fits < p < self.over)

    def learn(self, chars: int, tokens: int) -> None:
        if tokens <= self.limit and chars > self.fits:
            self.fits, self.fits_tokens = chars, tokens
        elif tokens > self.limit and chars < self.over:
            self.over = chars
        if self.over <= self.fits:  # counts are not strictly monotone in length: keep what fits
            self.over = self.fits + 1


async def truncate_many(
    items: Sequence[tuple[str, int, Keep]], count: CountTexts, totals: Sequence[int | None] | None = None
) -> list[tuple[str, int]]:
    """The longest head (or tail) of each text that is at most its limit in tokens, with its token
    count. All texts are cut together: each round counts candidate lengths of every text in one
    `count` call (a first guess from the text's characters per token, then the bracket left), so a
    cut takes a few calls however long the text. What is returned was counted and fits; it is the
    longest that fits to within 1%."""
    cuts = [
        _Truncation(text, limit, keep, total)
        for (text, limit, keep), total in zip(items, totals or [None] * len(items), strict=True)
    ]
    unknown = [c for c in cuts if c.total is None and c.limit > 0 and c.text]
    for cut, total in zip(unknown, await count([c.text for c in unknown]), strict=True):
        cut.total = total
    open_cuts: list[_Truncation] = []
    for cut in cuts:
        if cut.limit <= 0 or not cut.text:
            continue
        assert cut.total is not None
        if cut.total <= cut.limit:
            cut.fits, cut.fits_tokens = len(cut.text), cut.total
        else:
            cut.over = len(cut.text)
            open_cuts.append(cut)
    for round_ in range(TRUNCATION_ROUNDS):
        asked = [(c, chars) for c in open_cuts if not c.settled for chars in c.candidates(round_ == 0)]
        if not asked:
            break
        for (cut, chars), tokens in zip(asked, await count([c.piece(n) for c, n in asked]), strict=True):
            cut.learn(chars, tokens)
    return [(cut.piece(cut.fits), cut.fits_tokens) for cut in cuts]


async def truncate_to_tokens(text: str, limit: int, count: CountTexts, *, keep: Keep = "head") -> str:
    """The longest head (or tail) of `text` that is at most `limit` tokens (see `truncate_many`)."""
    return (await truncate_many([(text, limit, keep)], count))[0][0]


# ---- the window ----------------------------------------------------------------------------------


async def _syscall(proc: Process, name: str, **args: Any) -> Any:
    """The value of a syscall the window cannot do without, or a ContextError saying what to fix."""
    reply = await proc.syscall(name, **args)
    if reply.error is None:
        return reply.value
    if reply.error.code == ErrorCode.DENIED:
        capability = "memory" if name.startswith("mem.") else "llm"
        raise ContextError(
            f"The context window of process {proc.pid} cannot use {name} ({reply.error.message}); "
            f"give the process the '{capability}' capability, or run it without a context window "
            "(an agent's memory=False)."
        )
    raise ContextError(f"The context window of process {proc.pid} failed in {name}: {reply.error.message}.")


class ContextWindow:
    """The context of one process (`window_id`), archived in long-term memory under `namespace`.
    Open it with `await ContextWindow.open(proc, ...)`."""

    def __init__(
        self,
        proc: Process,
        *,
        model: str | None,
        namespace: str,
        window_id: str,
        budget: ContextBudget,
        system: str,
        summarize: Summarizer | None,
        blocks: Sequence[str],
        search_namespaces: Sequence[str] | None,
        auto_recall: bool,
    ) -> None:
        self.proc = proc
        self.model = model
        self.namespace = namespace
        self.window_id = window_id
        self.budget = budget
        self.system = system
        self.summarize = summarize
        self.search_namespaces = list(search_namespaces or [namespace, SHARED])
        self.auto_recall = auto_recall
        # Each block pays for its tags, and all of them for one header line.
        per_block = max(0, (budget.core - 24) // max(1, len(blocks)) - 12)
        self.core = {b: CoreBlock(label=b, limit=per_block) for b in blocks}
        self.turns: list[Turn] = []
        self.recap = ""
        self.paged_out = 0
        self.last_step: StepStats | None = None
        self.history_budget = 0  # set by open(), from the system prompt's size
        self.message_cap = 0  # a message over this many tokens is stored whole and cut
        self._next_seq = 0
        self._known: dict[str, int] = {}  # token counts of texts other than turns

    @classmethod
    async def open(
        cls,
        proc: Process,
        *,
        model: str | None = None,
        namespace: str,
        window_id: str,
        system: str = "",
        reserve_output: int | None = None,
        summarize: Summarizer | None = None,
        blocks: Sequence[str] = DEFAULT_BLOCKS,
        search_namespaces: Sequence[str] | None = None,
        auto_recall: bool = True,
        budget: ContextBudget | None = None,
    ) -> ContextWindow:
        """A window for `proc`. Without a `budget`, the budgets are cut from the context length of
        `model` (`llm.info`), keeping `reserve_output` tokens for the reply. The core memory blocks
        are read back from long-term memory. A summariser is an async function of the paged-out
        messages (an agent makes it an `llm.chat` syscall); without one the recap is mechanical."""
        if budget is None:
            info: ModelInfo = await _syscall(proc, "llm.info", model=model)
            budget = ContextBudget.for_context(info.context_length, reserve_output)
        window = cls(
            proc, model=model, namespace=namespace, window_id=window_id, budget=budget, system=system,
            summarize=summarize, blocks=blocks, search_namespaces=search_namespaces,
            auto_recall=auto_recall,
        )  # fmt: skip
        [system_tokens] = await window._count_known([system])
        window.history_budget = window._history_budget(system_tokens + MESSAGE_OVERHEAD)
        window.message_cap = min(budget.message, int(window.history_budget * budget.low_watermark) // 2)
        await window._load_core()
        return window

    # ---- layout --------------------------------------------------------------------------------

    def _history_budget(self, system: int) -> int:
        b = self.budget
        fixed = b.reserve_output + PROMPT_OVERHEAD + system + b.core + b.recap + b.recall
        history = b.n_ctx - fixed
        if history < 4 * 32:
            raise ContextError(
                f"n_ctx={b.n_ctx} leaves {history} tokens for the conversation after the system prompt "
                f"({system} tokens) and the memory budgets; raise llm.n_ctx or shorten the system prompt."
            )
        return history

    @property
    def history_tokens(self) -> int:
        return sum(t.tokens or 0 for t in self.turns)

    async def _count(self, texts: list[str]) -> list[int]:
        """Token counts of `texts`, in one llm.count syscall (none when there is nothing to count)."""
        asked = [text for text in texts if text]
        counted = iter(await _syscall(self.proc, "llm.count", texts=asked, model=self.model) if asked else [])
        return [next(counted) if text else 0 for text in texts]

    async def _count_known(self, texts: list[str]) -> list[int]:
        """Counts of `texts`: from the cache, the new ones counted in one call (and cached)."""
        new = list(dict.fromkeys(t for t in texts if t not in self._known))
        counted = dict(zip(new, await self._count(new), strict=True))
        counts = [counted[t] if t in counted else self._known[t] for t in texts]
        for text, tokens in counted.items():
            self._remember(text, tokens)
        return counts

    def _remember(self, text: str, tokens: int) -> None:
        if len(self._known) >= COUNT_CACHE_SIZE:
            self._known.clear()
        self._known[text] = tokens

    # ---- input ---------------------------------------------------------------------------------

    def add(self, message: Message) -> None:
        """Append a message. It is counted at the next build, which also cuts it (storing it whole)
        when it is over the per-message budget."""
        self.turns.append(Turn(seq=self._next_seq, message=message))
        self._next_seq += 1

    async def _count_turns(self) -> None:
        """Count the turns added since the last build, and the system message when it changed."""
        new = [t for t in self.turns if t.tokens is None]
        system = self._system_message().content
        extra = [system] if system not in self._known else []
        counts = await self._count([*(message_text(t.message) for t in new), *extra])
        for turn, tokens in zip(new, counts, strict=False):
            turn.tokens = tokens + MESSAGE_OVERHEAD
        if extra:
            self._remember(system, counts[-1])

    async def _cut_oversized(self) -> None:
        """Store each message over the per-message budget whole (one mem.add for all of them) and
        keep its head and a pointer to the whole in the window."""
        big = [
            t for t in self.turns
            if not t.cut and (t.tokens or 0) > self.message_cap and t.message.content
        ]  # fmt: skip
        if not big:
            return
        records = [
            self._record(
                t, f"full:{self.window_id}:{t.seq}", t.message.content,
                source=f"{t.message.role}:{t.message.name or ''}", kind="full",
            )
            for t in big
        ]  # fmt: skip
        await _syscall(self.proc, "mem.add", records=records)
        pointers = [
            f"\n[... cut: {len(t.message.content)} characters in all; the whole text is memory id "
            f"full:{self.window_id}:{t.seq}; read on with memory_read(id='full:{self.window_id}:{t.seq}', "
            "offset=N)]"
            for t in big
        ]
        pointer_tokens = await self._count(pointers)
        rooms = [
            max(16, self.message_cap - MESSAGE_OVERHEAD - p - len(t.message.tool_calls) * TOOL_CALL_ROOM)
            for t, p in zip(big, pointer_tokens, strict=True)
        ]
        # Without tool calls a message's text is its content: its count is known already.
        totals = [None if t.message.tool_calls else (t.tokens or 0) - MESSAGE_OVERHEAD for t in big]
        items: list[tuple[str, int, Keep]] = [
            (t.message.content, room, "head") for t, room in zip(big, rooms, strict=True)
        ]
        heads = await truncate_many(items, self._count, totals)
        for turn, (head, _), pointer in zip(big, heads, pointers, strict=True):
            turn.message = turn.message.model_copy(update={"content": head + pointer})
            turn.cut = True
        counts = await self._count([message_text(t.message) for t in big])
        for turn, tokens in zip(big, counts, strict=True):
            turn.tokens = tokens + MESSAGE_OVERHEAD

    # ---- assembly ------------------------------------------------------------------------------

    async def build(self, query: str | None = None) -> list[Message]:
        """The messages of the next LLM call, within budget; pages out history when it overflows.
        Memories relevant to `query` (default: the newest user message, when it is the last
        message) are recalled into the prompt."""
        await self._count_turns()
        await self._cut_oversized()
        if self.history_tokens > self.history_budget:
            await self.page_out()
        if query is None and self.auto_recall and self.turns and self.turns[-1].message.role == "user":
            query = self.turns[-1].message.content
        recall, recalled = await self._recall(query) if query else (None, 0)
        messages, tokens = await self._assemble(recall)
        limit = self.budget.n_ctx - self.budget.reserve_output
        # The budgets add up to the limit by construction; a tokenizer that counts a joined text
        # differently from its parts could still overshoot by a few tokens: then page out more.
        while tokens > limit and len(self.turns) > 1:
            await self.page_out(force=True)
            messages, tokens = await self._assemble(recall)
        self.last_step = StepStats(
            prompt_tokens=tokens,
            history_turns=len(self.turns),
            paged_out_turns=self.paged_out,
            recalled=recalled,
        )
        return messages

    async def _assemble(self, recall: Message | None) -> tuple[list[Message], int]:
        """The prompt's messages and their token count (history turns are counted once)."""
        history = [t.message for t in self.turns]
        head = [self._system_message()]
        if self.recap:
            head.append(Message(role="system", content=self._recap_text()))
        if recall is not None:
            # Just before the newest user message: the history before it stays a stable prefix.
            at = len(history) - 1 if history and history[-1].role == "user" else len(history)
            history = [*history[:at], recall, *history[at:]]
        extra = [*head, recall] if recall is not None else head
        counts = await self._count_known([m.content for m in extra])
        tokens = sum(counts) + MESSAGE_OVERHEAD * len(extra) + PROMPT_OVERHEAD + self.history_tokens
        return head + history, tokens

    def _system_message(self) -> Message:
        parts = [self.system] if self.system else []
        blocks = [f"<{b.label}>\n{b.value}\n</{b.label}>" for b in self.core.values() if b.value]
        if blocks:
            parts.append("Core memory (yours to edit with core_memory_append/core_memory_replace):")
            parts.extend(blocks)
        return Message(role="system", content="\n".join(parts))

    def _recap_head(self, paged_out: int) -> str:
        return (
            f"Recap of {paged_out} earlier messages (archived verbatim; find them with "
            "conversation_search):\n"
        )

    def _recap_text(self) -> str:
        return self._recap_head(self.paged_out) + self.recap

    async def _recall(self, query: str) -> tuple[Message | None, int]:
        room = self.budget.recall - MESSAGE_OVERHEAD
        if room <= 0:
            return None, 0
        hits: list[MemoryHit] = await _syscall(
            self.proc, "mem.search", query=query, namespaces=self.search_namespaces, k=RECALL_CANDIDATES
        )
        in_window = {f"full:{self.window_id}:{t.seq}" for t in self.turns}
        hits = [
            h for h in hits
            if h.score >= MIN_RECALL_SCORE and h.id not in in_window and not h.id.startswith("core:")
        ]  # fmt: skip
        if not hits:
            return None, 0
        header = "Recalled from long-term memory (may help):"
        per_line = max(16, room // 3)
        # A record may be a whole tool output: only its start can make a line, so only that is counted.
        lines = [
            "\n- " + (f"({hit.metadata['role']}) " if "role" in hit.metadata else "") + hit.text
            for hit in hits
        ]
        lines = [line[: per_line * MAX_CHARS_PER_TOKEN] for line in lines]
        [used] = await self._count_known([header])
        fitted = await truncate_many([(line, per_line, "head") for line in lines], self._count)
        chosen: list[str] = []
        for line, cost in fitted:
            if used + cost > room:
                break
            chosen.append(line)
            used += cost
        if not chosen:
            return None, 0
        return Message(role="system", content=header + "".join(chosen)), len(chosen)

    # ---- paging --------------------------------------------------------------------------------

    async def page_out(self, force: bool = False) -> int:
        """Move the oldest turns to long-term memory until history is under the low watermark
        (`force`: at least one turn); returns how many were paged out. Archive first (one mem.add
        with deterministic ids: a resumed process repeats it harmlessly), then summarise."""
        await self._count_turns()
        target = int(self.history_budget * self.budget.low_watermark)
        if force:
            target = min(target, self.history_tokens - 1)
        total = self.history_tokens
        count = 0
        while count < len(self.turns) - 1 and total > target:
            total -= self.turns[count].tokens or 0
            count += 1
        # A tool result goes with the call it answers.
        while count < len(self.turns) - 1 and self.turns[count].message.role == "tool":
            count += 1
        if count == 0:
            return 0
        victims = self.turns[:count]
        records = [
            self._record(
                t, f"turn:{self.window_id}:{t.seq}", text, source=f"conversation:{t.message.role}",
                kind="turn", role=t.message.role,
            )
            for t in victims
            if (text := message_text(t.message))
        ]  # fmt: skip
        for start in range(0, len(records), MAX_RECORDS_PER_ADD):
            await _syscall(self.proc, "mem.add", records=records[start : start + MAX_RECORDS_PER_ADD])
        self.recap = await self._summarise([t.message for t in victims], self.paged_out + count)
        self.turns = self.turns[count:]
        self.paged_out += count
        return count

    def _record(
        self, turn: Turn, id: str, text: str, *, source: str, kind: str, **meta: Any
    ) -> dict[str, Any]:
        """A mem.add record of a turn (the kernel adds who wrote it and whether it was tainted)."""
        metadata = {"kind": kind, "window": self.window_id, "seq": turn.seq, **meta}
        return {
            "id": id,
            "text": text,
            "namespace": self.namespace,
            "source": source,
            "trust": _trust_of(turn.message.role),
            "metadata": metadata,
        }

    async def _summarise(self, messages: list[Message], paged_out: int) -> str:
        """The new recap, fitted to what the recap budget leaves after its header."""
        summary = ""
        if self.summarize is not None:
            prior = [Message(role="system", content=f"Summary so far: {self.recap}")] if self.recap else []
            try:
                summary = (await self.summarize(prior + messages)).strip()
            except Exception:
                # The turns are archived already; a failed summary only makes the recap cruder.
                summary = ""
        keep: Keep = "head"
        if not summary:  # mechanical: the old recap plus the start of each message, newest kept
            gist = " | ".join(" ".join(message_text(m).split())[:80] for m in messages)
            summary, keep = (f"{self.recap} | {gist}" if self.recap else gist), "tail"
        head_tokens, summary_tokens = await self._count([self._recap_head(paged_out), summary])
        room = self.budget.recap - MESSAGE_OVERHEAD - head_tokens
        [(recap, _)] = await truncate_many([(summary, room, keep)], self._count, [summary_tokens])
        return recap

    # ---- memory tools (backing functions) -------------------------------------------------------

    def _core_id(self, label: str) -> str:
        return f"core:{self.namespace}:{label}"

    async def _load_core(self) -> None:
        for block in self.core.values():
            record: MemoryRecord | None = await _syscall(self.proc, "mem.get", id=self._core_id(block.label))
            prefix = f"{block.label}: "
            if record is not None and record.text.startswith(prefix):
                block.value = record.text.removeprefix(prefix)

    async def core_memory_append(self, label: str, content: str) -> ToolAnswer:
        block = self.core.get(label)
        if block is None:
            return self._unknown_block(label)
        value = f"{block.value}\n{content}".strip() if block.value else content.strip()
        return await self._set_block(block, value)

    async def core_memory_replace(self, label: str, old: str, new: str) -> ToolAnswer:
        block = self.core.get(label)
        if block is None:
            return self._unknown_block(label)
        if not old or old not in block.value:
            return ToolAnswer(
                ok=False, message=f"Text {old!r} is not in block '{label}'; copy it exactly from the block."
            )
        return await self._set_block(block, block.value.replace(old, new, 1).strip())

    def _unknown_block(self, label: str) -> ToolAnswer:
        return ToolAnswer(
            ok=False, message=f"No core memory block '{label}'; blocks: {', '.join(self.core)}."
        )

    async def _set_block(self, block: CoreBlock, value: str) -> ToolAnswer:
        [size] = await self._count([value])
        if size > block.limit:
            return ToolAnswer(
                ok=False,
                message=f"Block '{block.label}' would be {size} tokens, over its limit of {block.limit}; "
                "replace old text with a shorter version, or move details to archival_insert.",
            )
        # The label leads the text: a record is never empty, and a search by meaning finds it.
        record = {
            "id": self._core_id(block.label),
            "text": f"{block.label}: {value}",
            "namespace": self.namespace,
            "source": "core_memory",
            "trust": "model",
            "metadata": {"kind": "core", "label": block.label},
        }
        reply = await self.proc.syscall("mem.add", records=[record])
        if reply.error is not None:
            return ToolAnswer(ok=False, message=f"Block '{block.label}' is unchanged: {reply.error.message}.")
        block.value = value
        return ToolAnswer(ok=True, message=f"Block '{block.label}' is now {size}/{block.limit} tokens.")

    async def archival_insert(self, content: str) -> ToolAnswer:
        if not content.strip():
            return ToolAnswer(ok=False, message="Nothing to store: content is empty.")
        # The id follows from the text: storing a fact twice keeps one record.
        record_id = f"archival:{self.namespace}:{hashlib.sha256(content.encode()).hexdigest()[:24]}"
        record = {
            "id": record_id,
            "text": content,
            "namespace": self.namespace,
            "source": "archival_insert",
            "trust": "model",
            "metadata": {"kind": "archival", "window": self.window_id},
        }
        reply = await self.proc.syscall("mem.add", records=[record])
        if reply.error is not None:
            return ToolAnswer(ok=False, message=f"Nothing was stored: {reply.error.message}.")
        return ToolAnswer(ok=True, message=f"Stored as memory id {record_id}.")

    async def archival_search(self, query: str, k: int = 5) -> ToolAnswer:
        """Long-term memory other than conversation turns (facts, notes, stored tool results)."""
        return await self._search(query, k, where=NOT_TURNS)

    async def conversation_search(self, query: str, k: int = 5) -> ToolAnswer:
        """Earlier messages of this agent that are no longer in the window."""
        return await self._search(query, k, where={"kind": "turn"}, namespaces=[self.namespace])

    async def _search(
        self, query: str, k: int, where: Where, namespaces: list[str] | None = None
    ) -> ToolAnswer:
        if not query.strip():
            return ToolAnswer(ok=False, message="The query is empty; say what to look for.")
        k = max(1, min(int(k), 20))
        reply = await self.proc.syscall(
            "mem.search", query=query, namespaces=namespaces or self.search_namespaces, k=k, where=where
        )
        if reply.error is not None:
            return ToolAnswer(ok=False, message=f"The search failed: {reply.error.message}.")
        hits: list[MemoryHit] = reply.value
        return ToolAnswer(ok=True, message=f"{len(hits)} result(s), best first.", hits=hits)

    async def memory_read(self, id: str, offset: int = 0, length: int = 4000) -> ToolAnswer:
        """A slice of a stored record (e.g. the whole of a cut tool output)."""
        reply = await self.proc.syscall("mem.get", id=id)
        if reply.error is not None:
            return ToolAnswer(ok=False, message=f"Memory {id!r} cannot be read: {reply.error.message}.")
        record: MemoryRecord | None = reply.value
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
    "Turn",
    "message_text",
    "truncate_many",
    "truncate_to_tokens",
]


def _trust_of(role: str) -> Trust:
    """Who a message's words come from, for the provenance of what is archived."""
    return "user" if role == "user" else "tool" if role == "tool" else "model"
