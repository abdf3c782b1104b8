"""The context window manager inside a real kernel process: it acts only through syscalls (token
counts from the real tokenizer of SmolLM2 through `llm.count`, the real embedded store through
`mem.*`), and the layout rules hold."""

from __future__ import annotations

import random
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from llmos import Kernel
from llmos.config import load_config
from llmos.kernel import State
from llmos.kernel.devices import LLMBackend, Message, ToolCall
from llmos.kernel.journal import JournalEvent
from llmos.kernel.process import Process
from llmos.memory.context import MEMORY_TOOL_SPECS, ContextBudget, ContextError, ContextWindow, Turn

sys.path.insert(0, str(Path(__file__).parent))
from window_programs import TokenizedLLM

T = TypeVar("T")
KernelFactory = Callable[[LLMBackend], Kernel]
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


async def in_window(
    kernel: Kernel,
    body: Callable[[ContextWindow], Awaitable[T]],
    capabilities: list[str] | None = None,
    **window_args: Any,
) -> tuple[T, int]:
    """Run `body` on a window opened in a new process of the booted `kernel`; returns what it
    returned and the pid. An exception inside the process is raised here, traceback and all."""
    box: dict[str, Any] = {}

    async def program(proc: Process) -> None:
        args: dict[str, Any] = dict(
            namespace="agent:test", window_id="proc-1", system="You are a careful assistant.",
            summarize=scripted_fake_summarizer,
        )  # fmt: skip
        args.update(window_args)
        try:
            box["value"] = await body(await ContextWindow.open(proc, **args))
        except BaseException as exc:
            box["error"] = exc
            raise

    info = await kernel.run(program, capabilities=capabilities)
    if "error" in box:
        raise box["error"]
    assert info.state == State.DONE, info.error
    return box["value"], info.pid


def syscalls(kernel: Kernel, pid: int, name: str) -> list[JournalEvent]:
    return [e for e in kernel.log(pid) if e.name == name and e.kind == "result"]


async def test_200_turns_stay_inside_2048_tokens_and_planted_facts_come_back(
    kernel_with: KernelFactory, count_tokens: CountTokens
) -> None:
    async def chat(w: ContextWindow) -> None:
        rng = random.Random(7)
        w.add(Message(role="user", content="Remember this: my locker combination is 31-07-12."))
        w.add(Message(role="assistant", content="Got it, your locker combination is 31-07-12."))
        w.add(Message(role="user", content="Also, my cat is called Pumpernickel."))
        w.add(Message(role="assistant", content="Noted, your cat's name is Pumpernickel."))
        limit = N_CTX - w.budget.reserve_output
        worst = 0
        for turn in range(200):
            topic = rng.choice(TOPICS)
            content = f"Turn {turn}: tell me one thing about {topic}. " * rng.randint(1, 4)
            w.add(Message(role="user", content=content))
            messages = await w.build()
            real = chatml_tokens(messages, count_tokens)
            worst = max(worst, real)
            assert real <= limit, (turn, real)
            assert w.last_step is not None and w.last_step.prompt_tokens <= limit
            if turn % 25 == 0:  # now and then a tool call with a big result
                call = ToolCall(id=f"c{turn}", name="fetch", arguments={"topic": topic})
                w.add(Message(role="assistant", tool_calls=[call]))
                w.add(Message(role="tool", tool_call_id=f"c{turn}", content=f"{topic} facts. " * 400))
            reply = f"About {topic}: it is interesting. " * rng.randint(2, 8)
            w.add(Message(role="assistant", content=reply))
        assert w.paged_out > 300  # most of the conversation left the window ...
        assert worst > limit * 0.6  # ... and the window was really used, not left empty
        # The planted facts are long paged out, yet the next prompt recalls them.
        assert all("31-07-12" not in t.message.content for t in w.turns)
        w.add(Message(role="user", content="What was my locker combination again?"))
        messages = await w.build()
        assert chatml_tokens(messages, count_tokens) <= limit
        recalled = [m.content for m in messages if m.content.startswith("Recalled from long-term memory")]
        assert recalled and "31-07-12" in recalled[0]
        found = await w.conversation_search("what is the name of my pet cat", k=3)
        assert found.ok and "Pumpernickel" in found.hits[0].text
        assert found.hits[0].provenance.trust == "user" and found.hits[0].metadata["kind"] == "turn"
        assert messages[1].content.startswith("Recap of") and "Earlier:" in messages[1].content

    async with kernel_with(TokenizedLLM(count_tokens)) as kernel:
        _, pid = await in_window(kernel, chat)
        # All of it went through the process's syscalls: journaled, and shown by `llmos log`.
        made = {e.name for e in kernel.log(pid)}
        assert {"llm.info", "llm.count", "mem.get", "mem.add", "mem.search"} <= made


async def test_each_message_is_counted_once_and_a_build_that_pages_nothing_out_is_one_llm_count(
    kernel_with: KernelFactory, count_tokens: CountTokens
) -> None:
    texts = [f"message {i}: the ferry leaves at {i} o'clock" for i in range(12)]

    async def chat(w: ContextWindow) -> list[int]:
        counts_before_each_build = []
        for i, text in enumerate(texts):
            w.add(Message(role="user" if i % 2 == 0 else "assistant", content=text))
            if i % 3 == 2:
                counts_before_each_build.append(len(syscalls(kernel, w.proc.pid, "llm.count")))
                await w.build()
        assert w.paged_out == 0
        return counts_before_each_build

    async with kernel_with(TokenizedLLM(count_tokens)) as kernel:
        before, pid = await in_window(kernel, chat, auto_recall=False)
        counted = syscalls(kernel, pid, "llm.count")
        calls = {e.seq: e for e in kernel.log(pid) if e.kind == "call"}
        asked = [text for e in counted for text in calls[e.seq].data["args"]["texts"]]
    per_build = [after - first for first, after in zip(before, [*before[1:], len(counted)], strict=True)]
    assert per_build == [1, 1, 1, 1]
    assert sorted(t for t in asked if t in texts) == sorted(texts)  # each message once


async def test_prompt_stops_growing_while_full_replay_grows(
    kernel_with: KernelFactory, count_tokens: CountTokens
) -> None:
    async def chat(w: ContextWindow) -> list[int]:
        sizes = []
        for step in range(60):
            w.add(Message(role="user", content=f"step {step} " + "observation " * 30))
            await w.build()
            assert w.last_step is not None
            sizes.append(w.last_step.prompt_tokens)
            w.add(Message(role="assistant", content="thinking " * 40))
        assert w.paged_out > 40
        return sizes

    async with kernel_with(TokenizedLLM(count_tokens)) as kernel:
        sizes, _ = await in_window(kernel, chat, auto_recall=False)
    assert max(sizes[40:]) <= N_CTX - ContextBudget.for_context(N_CTX).reserve_output
    assert max(sizes[40:]) < 2 * sum(sizes[10:20]) / 10


async def test_a_large_tool_output_is_cut_with_a_pointer_to_the_whole_in_a_few_syscalls(
    kernel_with: KernelFactory, count_tokens: CountTokens
) -> None:
    big = "\n".join(f"line {i}: value={i * i}" for i in range(3000))

    async def chat(w: ContextWindow) -> tuple[Turn, int, int]:
        w.add(Message(role="tool", tool_call_id="t1", name="dump", content=big))
        counts_before = len(syscalls(kernel, w.proc.pid, "llm.count"))
        await w.build()
        counts = len(syscalls(kernel, w.proc.pid, "llm.count")) - counts_before
        kept = w.turns[0]
        assert kept.tokens is not None and kept.tokens <= w.budget.message
        whole, offset = "", 0
        while True:  # page through the stored original with the offsets the answers give
            page = await w.memory_read("full:proc-1:0", offset=offset)
            assert page.ok
            header, _, piece = page.message.partition("\n")
            whole += piece
            if "read on with offset=" not in header:
                break
            offset = int(header.rsplit("offset=", 1)[1].rstrip("."))
        assert whole == big
        tail = await w.memory_read("full:proc-1:0", offset=len(big) - 10)
        assert tail.ok and tail.message.endswith(big[-10:])
        assert not (await w.memory_read("nope")).ok
        return kept, counts, w.message_cap

    async with kernel_with(TokenizedLLM(count_tokens)) as kernel:
        (kept, counts, cap), _ = await in_window(kernel, chat)
    content = kept.message.content
    assert content.startswith("line 0: value=0") and "memory id full:proc-1:0" in content
    head = content[: content.index("\n[... cut:")]
    assert big.startswith(head) and kept.tokens is not None and kept.tokens > 0.9 * cap  # as much as fits
    # Counting the message, its pointer, the candidate heads (a binary search over 60k characters
    # would take 16 calls) and the cut message.
    assert counts <= 6, counts


async def test_a_failing_summariser_loses_no_turn(
    kernel_with: KernelFactory, count_tokens: CountTokens
) -> None:
    texts = [f"message {i} about the harbour crane schedule " * 6 for i in range(60)]

    async def chat(w: ContextWindow) -> tuple[int, list[str], str]:
        for i, text in enumerate(texts):
            w.add(Message(role="user" if i % 2 == 0 else "assistant", content=text))
        await w.build()
        return w.paged_out, [t.message.content for t in w.turns], w.recap

    async with kernel_with(TokenizedLLM(count_tokens)) as kernel:
        (paged_out, kept, recap), _ = await in_window(kernel, chat, summarize=failing_summarizer)
        store = await kernel.memory()
        archived = [store.get(f"turn:proc-1:{i}") for i in range(paged_out)]
    assert paged_out > 0 and recap  # a mechanical recap instead of a summary
    assert [r.text for r in archived if r is not None] == texts[:paged_out]
    assert kept == texts[paged_out:]


async def test_core_memory_tools_edit_capped_blocks_that_persist(
    kernel_with: KernelFactory, count_tokens: CountTokens
) -> None:
    async def edit(w: ContextWindow) -> None:
        assert (await w.core_memory_append("human", "Name: Ada. Likes tea.")).ok
        assert (await w.core_memory_replace("human", "tea", "green tea")).ok
        assert "Likes green tea" in (await w.build())[0].content
        assert not (await w.core_memory_replace("human", "coffee", "x")).ok
        unknown = await w.core_memory_append("diary", "x")
        assert not unknown.ok and "persona, human, notes" in unknown.message
        too_big = await w.core_memory_append("notes", "word " * 500)
        assert not too_big.ok and "over its limit" in too_big.message

    async def read(w: ContextWindow) -> str:
        return w.core["human"].value

    async with kernel_with(TokenizedLLM(count_tokens)) as kernel:
        _, pid = await in_window(kernel, edit)
        saved = [e for e in kernel.log(pid) if e.name == "mem.add" and e.kind == "call"][-1]
        assert saved.data["args"]["records"][0]["id"] == "core:agent:test:human"
    # A later process of the same agent, in a new kernel, starts with the edited block.
    async with kernel_with(TokenizedLLM(count_tokens)) as kernel:
        value, _ = await in_window(kernel, read, window_id="proc-2")
    assert value == "Name: Ada. Likes green tea."


async def test_archival_tools_and_namespace_isolation(
    kernel_with: KernelFactory, count_tokens: CountTokens
) -> None:
    async def other_agent(proc: Process) -> str:
        note = {"text": "Other agent's private note about eu-west-3.", "namespace": "agent:other"}
        shared = {"text": "The staging cluster was moved in March.", "namespace": "shared"}
        await proc.syscall("mem.add", records=[shared])  # as the remember tool writes: no kind
        return str((await proc.syscall("mem.add", records=[note])).unwrap()[0])

    async def use(w: ContextWindow) -> None:
        stored = await w.archival_insert("The staging cluster lives in region eu-west-3.")
        assert stored.ok
        again = await w.archival_insert("The staging cluster lives in region eu-west-3.")
        assert again.message == stored.message  # the same fact is stored once
        assert (await w.core_memory_append("notes", "Staging questions go to Bo.")).ok
        found = await w.archival_search("which region hosts the staging cluster")
        assert found.ok and {h.namespace for h in found.hits} == {"agent:test", "shared"}
        assert not any(h.id.startswith("core:") for h in found.hits)  # core blocks are in the prompt
        assert not (await w.memory_read(other_id)).ok
        assert not (await w.archival_search("   ")).ok and not (await w.archival_insert("")).ok
        assert (await w.archival_search("staging", k=10_000)).ok  # k is clamped, not an error

    async with kernel_with(TokenizedLLM(count_tokens)) as kernel:
        other_id = (await kernel.run(other_agent)).result
        await in_window(kernel, use)
    assert {s.name for s in MEMORY_TOOL_SPECS} == {
        "core_memory_append", "core_memory_replace", "archival_insert", "archival_search",
        "conversation_search", "memory_read",
    }  # fmt: skip


async def test_a_system_prompt_too_big_for_the_window_is_a_user_error(
    kernel_with: KernelFactory, count_tokens: CountTokens
) -> None:
    async def nothing(w: ContextWindow) -> None:
        pass

    async with kernel_with(TokenizedLLM(count_tokens)) as kernel:
        with pytest.raises(ContextError, match=r"raise llm\.n_ctx"):
            await in_window(kernel, nothing, budget=ContextBudget.for_context(512), system="rules " * 400)


async def test_a_window_without_the_memory_capability_is_refused_in_one_sentence(
    kernel_with: KernelFactory, count_tokens: CountTokens
) -> None:
    async def nothing(w: ContextWindow) -> None:
        pass

    async with kernel_with(TokenizedLLM(count_tokens)) as kernel:
        with pytest.raises(ContextError) as refused:
            await in_window(kernel, nothing, capabilities=["llm"])
    message = str(refused.value)
    assert "lacks the capability 'memory'" in message
    assert "give the process the 'memory' capability" in message
    assert message.count(". ") == 0 and message.endswith(".")


@pytest.mark.slow
async def test_the_llm_summariser_writes_the_recap(kernel_with: KernelFactory) -> None:
    """The recap is written by a real model (SmolLM2) through an llm.chat syscall of the process."""
    smol = load_config(env={"LLMOS_LLM__MODEL": "smollm2-135m-instruct", "LLMOS_LLM__N_CTX": "1024"})
    from llmos.cpu import open_backend

    backend = open_backend(smol)

    async def chat(w: ContextWindow) -> str:
        async def summarize(messages: list[Message]) -> str:
            transcript = "\n".join(f"{m.role}: {m.content}" for m in messages)
            prompt = [
                {"role": "system", "content": "Summarise the conversation below in one sentence."},
                {"role": "user", "content": transcript},
            ]
            reply = await w.proc.syscall("llm.chat", messages=prompt, max_tokens=32)
            return str(reply.unwrap().text)

        w.summarize = summarize
        for i in range(12):
            plan = f"We planned the garden: row {i} gets carrots and beans. " * 4
            w.add(Message(role="user", content=plan))
        await w.build()
        assert w.paged_out > 0
        return w.recap

    async with kernel_with(backend) as kernel:
        recap, pid = await in_window(kernel, chat, summarize=None)
        assert syscalls(kernel, pid, "llm.chat")  # the summary is the process's own LLM call
    assert recap and not recap.startswith("We planned the garden: row 0")
