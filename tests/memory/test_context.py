"""The context window manager with the real tokenizer of SmolLM2 and the real embedding model."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest

from llmos.config import Config
from llmos.kernel.devices import ChatRequest, ChatResult, Message, ModelInfo, TextCallback, ToolCall
from llmos.memory.context import MEMORY_TOOL_SPECS, ContextBudget, ContextError, ContextWindow, llm_summarizer
from llmos.memory.embeddings import OnnxEmbeddingFunction
from llmos.memory.store import MemoryStore

CountTokens = Callable[[str], int]
N_CTX = 2048
TOPICS = [
    "sourdough baking", "tide pools", "medieval castles", "jazz chords", "bicycle gears", "volcanoes",
    "chess openings", "honeybees", "origami", "solar panels", "knitting", "glaciers", "typography",
    "submarines", "orchids", "board games", "rainforests", "telescopes", "pottery", "sailing knots",
]  # fmt: skip


async def scripted_fake_summarizer(messages: list[Message]) -> str:
    """A stand-in for the model: a recap made of the first words of each paged-out message."""
    return "Earlier: " + "; ".join(" ".join(m.content.split()[:6]) for m in messages if m.role != "system")


async def failing_summarizer(messages: list[Message]) -> str:
    raise RuntimeError("model crashed")


def chatml_tokens(messages: list[Message], count: CountTokens) -> int:
    """Tokens of the prompt as the model really sees it: SmolLM2's ChatML template."""
    text = (
        "".join(f"<|im_start|>{m.role}\n{m.content}<|im_end|>\n" for m in messages)
        + "<|im_start|>assistant\n"
    )
    return count(text)


def window(store: MemoryStore, count: CountTokens, **kw: object) -> ContextWindow:
    args: dict[str, object] = dict(
        namespace="agent:test", window_id="proc-1", count_tokens=count,
        budget=ContextBudget.for_context(N_CTX), system="You are a careful assistant.",
        summarize=scripted_fake_summarizer, pid=1,
    )  # fmt: skip
    args.update(kw)
    return ContextWindow(store, **args)  # type: ignore[arg-type]


async def test_200_turns_stay_inside_2048_tokens_and_planted_facts_come_back(
    store: MemoryStore, count_tokens: CountTokens
) -> None:
    w = window(store, count_tokens)
    rng = random.Random(7)
    w.add(Message(role="user", content="Remember this: my locker combination is 31-07-12."))
    w.add(Message(role="assistant", content="Got it, your locker combination is 31-07-12."))
    w.add(Message(role="user", content="Also, my cat is called Pumpernickel."))
    w.add(Message(role="assistant", content="Noted, your cat's name is Pumpernickel."))
    limit = N_CTX - w.budget.reserve_output
    worst = 0
    for turn in range(200):
        topic = rng.choice(TOPICS)
        w.add(
            Message(
                role="user", content=f"Turn {turn}: tell me one thing about {topic}. " * rng.randint(1, 4)
            )
        )
        messages = await w.build()
        real = chatml_tokens(messages, count_tokens)
        worst = max(worst, real)
        assert real <= limit, (turn, real)
        assert w.last_step is not None and w.last_step.prompt_tokens <= limit
        if turn % 25 == 0:  # now and then a tool call with a big result
            call = ToolCall(id=f"c{turn}", name="fetch", arguments={"topic": topic})
            w.add(Message(role="assistant", tool_calls=[call]))
            w.add(Message(role="tool", tool_call_id=f"c{turn}", content=f"{topic} facts. " * 400))
        w.add(Message(role="assistant", content=f"About {topic}: it is interesting. " * rng.randint(2, 8)))
    assert w.paged_out > 300  # most of the conversation left the window ...
    assert worst > limit * 0.6  # ... and the window was really used, not left empty
    # The planted facts are long paged out, yet the next prompt recalls them.
    assert all("31-07-12" not in t.message.content for t in w.turns)
    w.add(Message(role="user", content="What was my locker combination again?"))
    messages = await w.build()
    assert chatml_tokens(messages, count_tokens) <= limit
    recalled = [m.content for m in messages if m.content.startswith("Recalled from long-term memory")]
    assert recalled and "31-07-12" in recalled[0]
    found = w.conversation_search("what is the name of my pet cat", k=3)
    assert found.ok and "Pumpernickel" in found.hits[0].text
    assert found.hits[0].provenance.trust == "user" and found.hits[0].metadata["kind"] == "turn"
    assert messages[1].content.startswith("Recap of") and "Earlier:" in messages[1].content


async def test_prompt_stops_growing_while_full_replay_grows(
    store: MemoryStore, count_tokens: CountTokens
) -> None:
    w = window(store, count_tokens, auto_recall=False)
    sizes = []
    for step in range(60):
        w.add(Message(role="user", content=f"step {step} " + "observation " * 30))
        await w.build()
        assert w.last_step is not None
        sizes.append(w.last_step.prompt_tokens)
        w.add(Message(role="assistant", content="thinking " * 40))
    assert w.paged_out > 40
    assert max(sizes[40:]) <= N_CTX - w.budget.reserve_output
    assert max(sizes[40:]) < 2 * sum(sizes[10:20]) / 10


async def test_a_large_tool_output_is_cut_with_a_pointer_to_the_whole(
    store: MemoryStore, count_tokens: CountTokens
) -> None:
    w = window(store, count_tokens)
    big = "\n".join(f"line {i}: value={i * i}" for i in range(3000))
    kept = w.add(Message(role="tool", tool_call_id="t1", name="dump", content=big))
    assert w.tokens_of(kept) <= w.budget.message
    assert kept.content.startswith("line 0: value=0") and "memory id full:proc-1:0" in kept.content
    whole, offset = "", 0
    while True:  # page through the stored original with the offsets the answers give
        page = w.memory_read("full:proc-1:0", offset=offset)
        assert page.ok
        header, _, piece = page.message.partition("\n")
        whole += piece
        if "read on with offset=" not in header:
            break
        offset = int(header.rsplit("offset=", 1)[1].rstrip("."))
    assert whole == big
    tail = w.memory_read("full:proc-1:0", offset=len(big) - 10)
    assert tail.ok and tail.message.endswith(big[-10:])
    assert not w.memory_read("nope").ok


async def test_a_failing_summariser_loses_no_turn(store: MemoryStore, count_tokens: CountTokens) -> None:
    w = window(store, count_tokens, summarize=failing_summarizer)
    texts = [f"message {i} about the harbour crane schedule " * 6 for i in range(60)]
    for i, text in enumerate(texts):
        w.add(Message(role="user" if i % 2 == 0 else "assistant", content=text))
    await w.build()
    assert w.paged_out > 0 and w.recap  # a truncation recap instead of a summary
    archived = store.get_many([f"turn:proc-1:{i}" for i in range(w.paged_out)])
    assert [r.text for r in archived] == texts[: w.paged_out]
    assert [t.message.content for t in w.turns] == texts[w.paged_out :]


async def test_core_memory_tools_edit_capped_blocks_that_persist(
    config: Config, store: MemoryStore, count_tokens: CountTokens, embedder: OnnxEmbeddingFunction
) -> None:
    w = window(store, count_tokens)
    assert w.core_memory_append("human", "Name: Ada. Likes tea.").ok
    assert w.core_memory_replace("human", "tea", "green tea").ok
    assert "Likes green tea" in (await w.build())[0].content
    assert not w.core_memory_replace("human", "coffee", "x").ok
    unknown = w.core_memory_append("diary", "x")
    assert not unknown.ok and "persona, human, notes" in unknown.message
    too_big = w.core_memory_append("notes", "word " * 500)
    assert not too_big.ok and "over its limit" in too_big.message
    store.close()
    with MemoryStore.open(config, embedder=embedder) as again:
        other = window(again, count_tokens, window_id="proc-2")
        assert other.core["human"].value == "Name: Ada. Likes green tea."


async def test_archival_tools_and_namespace_isolation(store: MemoryStore, count_tokens: CountTokens) -> None:
    w = window(store, count_tokens)
    stored = w.archival_insert("The staging cluster lives in region eu-west-3.")
    assert stored.ok
    store.add(
        "Other agent's private note about eu-west-3.",
        namespace="agent:other",
        source="t",
        trust="model",
        pid=2,
    )
    found = w.archival_search("which region hosts staging")
    assert found.ok and [h.namespace for h in found.hits] == ["agent:test"]
    other_id = store.search("private note", namespaces=["agent:other"], k=1)[0].id
    assert not w.memory_read(other_id).ok
    assert not w.archival_search("   ").ok and not w.archival_insert("").ok
    assert w.archival_search("staging", k=10_000).ok  # k is clamped, not an error
    assert {s.name for s in MEMORY_TOOL_SPECS} == {
        "core_memory_append", "core_memory_replace", "archival_insert", "archival_search",
        "conversation_search", "memory_read",
    }  # fmt: skip


async def test_a_reopened_window_keeps_its_recap_and_numbering(
    config: Config, store: MemoryStore, count_tokens: CountTokens, embedder: OnnxEmbeddingFunction
) -> None:
    w = window(store, count_tokens, auto_recall=False)
    history = [
        Message(role="user", content=f"fact {i}: the lighthouse keeper logs the weather " * 5)
        for i in range(40)
    ]
    for m in history:
        w.add(m)
    before = await w.build()
    recap, paged_through = w.recap, w.paged_through
    assert paged_through >= 0
    store.close()
    with MemoryStore.open(config, embedder=embedder) as again:
        reopened = window(again, count_tokens)
        assert reopened.recap == recap and reopened.paged_through == paged_through
        reopened.add(Message(role="user", content="next"))
        assert reopened.turns[0].seq == paged_through + 1
        # After a restart the kernel replays the whole history: paged-out messages are skipped.
        resumed = window(again, count_tokens, auto_recall=False)
        assert resumed.resume([*history, Message(role="user", content="new")]) == 40 - paged_through
        kept = [m.content for m in history[paged_through + 1 :]]
        assert [t.message.content for t in resumed.turns] == [*kept, "new"]
        assert [m.content for m in await resumed.build()] == [m.content for m in before] + ["new"]
        with pytest.raises(ContextError, match="fresh window"):
            resumed.resume(history)


def test_a_system_prompt_too_big_for_the_window_is_a_user_error(
    store: MemoryStore, count_tokens: CountTokens
) -> None:
    with pytest.raises(ContextError, match=r"raise llm\.n_ctx"):
        window(store, count_tokens, budget=ContextBudget.for_context(512), system="rules " * 400)


class _SmolBackend:
    """Just enough of an LLMBackend over llama_cpp to run the real summariser."""

    name = "smol"

    def __init__(self, path: Path) -> None:
        from llama_cpp import Llama

        self.llm = Llama(str(path), n_ctx=1024, verbose=False)

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(name="smollm2", context_length=1024)

    async def chat(self, request: ChatRequest, on_text: TextCallback | None = None) -> ChatResult:
        out = self.llm.create_chat_completion(
            messages=[{"role": m.role, "content": m.content} for m in request.messages],  # type: ignore[misc]
            max_tokens=request.max_tokens,
            temperature=0.0,
        )
        return ChatResult(text=out["choices"][0]["message"]["content"] or "")  # type: ignore[index]

    def count_tokens(self, text: str) -> int:
        return len(self.llm.tokenize(text.encode(), add_bos=False))

    async def aclose(self) -> None:
        self.llm.close()


@pytest.mark.slow
async def test_the_llm_summariser_writes_the_recap(store: MemoryStore, smollm_path: Path) -> None:
    backend = _SmolBackend(smollm_path)
    try:
        summarize = llm_summarizer(backend, max_tokens=32)
        w = window(store, backend.count_tokens, summarize=summarize, budget=ContextBudget.for_context(1024))
        for i in range(12):
            w.add(
                Message(role="user", content=f"We planned the garden: row {i} gets carrots and beans. " * 4)
            )
        await w.build()
        assert w.paged_out > 0 and w.recap and not w.recap.startswith("We planned the garden: row 0")
    finally:
        await backend.aclose()
