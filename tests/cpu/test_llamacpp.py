"""The embedded llama.cpp backend, run on the real SmolLM2 135M model."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from llama_cpp import Llama
from pydantic import BaseModel, Field

from llmos.cpu.llamacpp import (
    ContextOverflowError,
    LlamaCppBackend,
    ModelLoadError,
    UnsupportedSchemaError,
)
from llmos.cpu.toolcalls import ToolChoiceError
from llmos.kernel.devices import ChatRequest, ChatResult, LLMBackend, Message, ToolSpec

pytestmark = pytest.mark.slow

N_CTX = 2048


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMOS_HOME", str(tmp_path))


@pytest.fixture(scope="module")
def kv_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kv")


@pytest.fixture(scope="module")
def backend(smollm2_path: Path, kv_dir: Path) -> Iterator[LlamaCppBackend]:
    llm = LlamaCppBackend(smollm2_path, name="smollm2-135m-instruct", n_ctx=N_CTX, kv_dir=kv_dir)
    yield llm
    llm.close()


def user(text: str) -> list[Message]:
    return [Message(role="user", content=text)]


async def test_implements_the_protocol(backend: LlamaCppBackend) -> None:
    assert isinstance(backend, LLMBackend)
    assert backend.info.context_length == N_CTX
    assert backend.info.family == "llama"
    assert backend.count_tokens("Hello world") == 2


async def test_chat(backend: LlamaCppBackend) -> None:
    result = await backend.chat(ChatRequest(messages=user("What is 2 plus 2?"), max_tokens=12))
    assert result.text.strip()
    assert result.finish_reason in ("stop", "length")
    assert result.model == "smollm2-135m-instruct"
    assert result.backend == "llamacpp"
    assert 0 < result.usage.completion_tokens <= 12
    assert result.usage.prompt_tokens > 5
    assert result.time_to_first_token_s is not None


async def cold_chat(
    model: Path, kv_dir: Path, request: ChatRequest, on_text: Callable[[str], None] | None = None
) -> ChatResult:
    """One call on a model instance of its own, so its prompt is evaluated cold.

    llama.cpp's greedy output depends on how the prompt was split into batches: a prompt served
    from the KV cache may decode other text than the same prompt evaluated cold. Tests that compare
    two outputs therefore compare calls made from the same cache state. (The n_ctx differs from the
    module's backend, so closing this one unloads the model.)
    """
    llm = LlamaCppBackend(model, name="s", n_ctx=1024, kv_dir=kv_dir)
    try:
        return await llm.chat(request, on_text=on_text)
    finally:
        await llm.aclose()


async def test_streaming_delivers_the_same_text_counted_once(smollm2_path: Path, tmp_path: Path) -> None:
    request = ChatRequest(messages=user("Name three colours."), max_tokens=16)
    plain = await cold_chat(smollm2_path, tmp_path, request)
    pieces: list[str] = []
    streamed = await cold_chat(smollm2_path, tmp_path, request, on_text=pieces.append)
    assert len(pieces) > 1
    assert "".join(pieces) == streamed.text == plain.text
    assert streamed.usage.completion_tokens == plain.usage.completion_tokens
    assert streamed.usage.prompt_tokens == plain.usage.prompt_tokens


async def test_stop_strings_cut_the_text(smollm2_path: Path, tmp_path: Path) -> None:
    request = ChatRequest(messages=user("Count from 1 to 10, separated by commas."), max_tokens=30)
    full = await cold_chat(smollm2_path, tmp_path, request)
    assert "," in full.text
    pieces: list[str] = []
    stopped = await cold_chat(
        smollm2_path, tmp_path, request.model_copy(update={"stop": [","]}), on_text=pieces.append
    )
    assert stopped.text == full.text[: full.text.index(",")]
    assert "".join(pieces) == stopped.text
    assert stopped.finish_reason == "stop"


WEATHER = ToolSpec(
    name="get_weather",
    description="Get the weather forecast for a city",
    parameters={
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer"},
        },
        "required": ["city", "unit", "days"],
        "additionalProperties": False,
    },
)
CITIES = ["Paris", "Tokyo", "Lima", "Oslo", "Cairo"]
ASKS = [
    "What's the weather in {} this week?",
    "Will it rain in {} tomorrow? Use fahrenheit.",
    "Give me a 3 day forecast for {}.",
    "How cold is {} going to be?",
]


async def test_forced_tool_call_is_schema_valid_every_time(backend: LlamaCppBackend) -> None:
    prompts = [ask.format(city) for ask in ASKS for city in CITIES]
    assert len(prompts) == 20
    for prompt in prompts:
        result = await backend.chat(
            ChatRequest(messages=user(prompt), tools=[WEATHER], tool_choice="get_weather", max_tokens=64)
        )
        assert result.finish_reason == "tool_calls", (prompt, result.text)
        [call] = result.tool_calls
        assert call.name == "get_weather"
        jsonschema.validate(call.arguments, WEATHER.parameters)


async def test_tool_result_conversation_continues(backend: LlamaCppBackend) -> None:
    request = ChatRequest(
        messages=user("Weather in Oslo?"), tools=[WEATHER], tool_choice="get_weather", max_tokens=64
    )
    first = await backend.chat(request)
    [call] = first.tool_calls
    follow = [
        *request.messages,
        Message(role="assistant", tool_calls=[call]),
        Message(role="tool", name=call.name, tool_call_id=call.id, content="Sunny, 21 C"),
    ]
    second = await backend.chat(
        ChatRequest(messages=follow, tools=[WEATHER], tool_choice="auto", max_tokens=48)
    )
    # A weak model may ramble past max_tokens ("error"); either way the turn is data, not a crash.
    assert second.finish_reason in ("tool_calls", "stop", "error")
    assert second.tool_calls or second.text
    assert second.usage.reused_prompt_tokens > 0


class Person(BaseModel):
    name: str
    age: int = Field(ge=0)
    languages: list[str] = Field(max_length=3)


async def test_pydantic_typed_output_validates(backend: LlamaCppBackend) -> None:
    request = ChatRequest(
        messages=user("Describe a fictional programmer as JSON with name, age and languages."),
        response_schema=Person.model_json_schema(),
        max_tokens=80,
    )
    result = await backend.chat(request)
    assert result.finish_reason == "stop", result.text
    person = Person.model_validate_json(result.text)
    assert person.name


async def test_output_that_stays_invalid_comes_back_as_data(backend: LlamaCppBackend) -> None:
    # The grammar cannot express "not", so validation fails on every attempt: after the
    # bounded repairs the bad output is returned (finish_reason "error"), never raised.
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer", "not": {"type": "integer"}}},
        "required": ["n"],
    }
    request = ChatRequest(messages=user("Give me a number as JSON."), response_schema=schema, max_tokens=20)
    result = await backend.chat(request)
    assert result.finish_reason == "error"
    assert "invalid output" in result.text
    single = await backend.chat(ChatRequest(messages=user("Give me a number as JSON."), max_tokens=1))
    # Three attempts (the first and two repairs) are all counted.
    assert result.usage.prompt_tokens > 3 * single.usage.prompt_tokens


async def test_bad_requests_are_user_errors(
    backend: LlamaCppBackend, smollm2_path: Path, tmp_path: Path
) -> None:
    with pytest.raises(ToolChoiceError):
        await backend.chat(ChatRequest(messages=user("hi"), tools=[WEATHER], tool_choice="nope"))
    with pytest.raises(UnsupportedSchemaError, match="cannot be turned into a grammar"):
        await backend.chat(ChatRequest(messages=user("hi"), response_schema={"type": "no-such-type"}))
    with pytest.raises(ContextOverflowError, match="shorten the conversation"):
        await backend.chat(ChatRequest(messages=user("word " * 3000), max_tokens=4))
    with pytest.raises(ModelLoadError, match="does not exist"):
        LlamaCppBackend(tmp_path / "missing.gguf", name="x", kv_dir=tmp_path)
    (tmp_path / "junk.gguf").write_bytes(b"not a model")
    with pytest.raises(ModelLoadError, match="complete GGUF"):
        LlamaCppBackend(tmp_path / "junk.gguf", name="x", kv_dir=tmp_path)


async def test_multi_turn_reuses_the_history(backend: LlamaCppBackend) -> None:
    messages = [Message(role="system", content="You are terse."), *user("Name a fruit.")]
    first = await backend.chat(ChatRequest(messages=messages, max_tokens=12, session="multi"))
    messages += [Message(role="assistant", content=first.text), *user("Name another one.")]
    second = await backend.chat(ChatRequest(messages=messages, max_tokens=12, session="multi"))
    assert second.usage.reused_prompt_tokens >= first.usage.prompt_tokens
    assert second.usage.prompt_tokens > second.usage.reused_prompt_tokens


def two_turns(system: str, answer: str) -> tuple[list[Message], list[Message]]:
    first = [Message(role="system", content=system), *user("Tell me about the moon.")]
    return first, [*first, Message(role="assistant", content=answer), *user("And about the sun?")]


async def test_kv_snapshot_restores_a_session_exactly(smollm2_path: Path, tmp_path: Path) -> None:
    system = "You are an astronomy teacher who answers in one or two sentences."
    first, _ = two_turns(system, "")

    def ask(messages: list[Message], session: str) -> ChatRequest:
        return ChatRequest(messages=messages, max_tokens=24, session=session)

    # Both runs start cold, on a model instance of their own, so they compare like with like.
    straight = LlamaCppBackend(smollm2_path, name="s", n_ctx=1024, kv_dir=tmp_path / "straight")
    try:  # uninterrupted: A, A
        a1 = await straight.chat(ask(first, "a"))
        a2 = await straight.chat(ask(two_turns(system, a1.text)[1], "a"))
    finally:
        await straight.aclose()

    resumed = LlamaCppBackend(smollm2_path, name="s", n_ctx=1024, kv_dir=tmp_path / "resumed")
    try:  # interrupted: A, B (another conversation), A again
        b1 = await resumed.chat(ask(first, "a"))
        other = [Message(role="system", content="You are a chef."), *user("How do I boil an egg?")]
        await resumed.chat(ask(other, "intruder"))
        assert list((tmp_path / "resumed").rglob("*.kv")), "switching sessions saves a KV snapshot"
        b2 = await resumed.chat(ask(two_turns(system, b1.text)[1], "a"))
    finally:
        await resumed.aclose()

    assert b1.text == a1.text
    assert b2.text == a2.text, "the restored session continues exactly as the uninterrupted one"
    # The history was loaded from the snapshot, not evaluated again.
    assert b2.usage.reused_prompt_tokens >= b1.usage.prompt_tokens


async def test_snapshots_stay_within_the_budget(smollm2_path: Path, tmp_path: Path) -> None:
    budget_mb = 3
    llm = LlamaCppBackend(smollm2_path, name="s", n_ctx=N_CTX, kv_dir=tmp_path, kv_cache_mb=budget_mb)
    try:
        for i in range(4):
            prompt = f"Session {i}. " + "Remember this list of words: apple pear plum. " * 8
            await llm.chat(ChatRequest(messages=user(prompt), max_tokens=4, session=f"s{i}"))
        files = list(tmp_path.rglob("*.kv"))
        assert files
        assert sum(f.stat().st_size for f in files) <= budget_mb * 1024 * 1024
    finally:
        await llm.aclose()
    assert not list(tmp_path.rglob("*.kv")), "closing removes the backend's snapshots"


def long_system_prompt(topic: str) -> str:
    rules = " ".join(f"Rule {i}: answer questions about {topic} {i} politely." for i in range(40))
    return f"You are an expert on {topic}. {rules}"


async def fresh_run(model: Path, kv_dir: Path, messages: list[Message], **options: int) -> tuple[str, int]:
    """One call from a backend on a model instance of its own, as a new `llmos run` would make it.

    The n_ctx differs from the module's backend, so closing the backend unloads the model and
    nothing of this run survives in memory.
    """
    llm = LlamaCppBackend(model, name="s", n_ctx=1024, kv_dir=kv_dir, **options)
    try:
        result = await llm.chat(ChatRequest(messages=messages, max_tokens=16, session="1"))
    finally:
        await llm.aclose()
    return result.text, result.usage.reused_prompt_tokens


async def test_a_system_prompt_is_prefilled_once_across_runs(smollm2_path: Path, tmp_path: Path) -> None:
    messages = [Message(role="system", content=long_system_prompt("tea")), *user("What is rule 3?")]
    cold_text, cold_reused = await fresh_run(smollm2_path, tmp_path, messages)
    assert cold_reused == 0
    assert len(list(tmp_path.rglob("*.prefix"))) == 1, "the system prompt's state is kept for later runs"

    # Another run, another question, same system prompt: its state comes from the file.
    other = [messages[0], *user("What is rule 5?")]
    _, reused = await fresh_run(smollm2_path, tmp_path, other)
    assert reused >= 400
    warm_text, warm_reused = await fresh_run(smollm2_path, tmp_path, messages)
    assert warm_reused == reused
    assert warm_text == cold_text, "a loaded system prompt gives the same greedy continuation"


async def test_a_broken_prefix_file_is_evaluated_again(smollm2_path: Path, tmp_path: Path) -> None:
    messages = [Message(role="system", content=long_system_prompt("maps")), *user("What is rule 2?")]
    expected, _ = await fresh_run(smollm2_path, tmp_path, messages)
    (state,) = tmp_path.rglob("*.prefix")
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 3])  # a torn or foreign file

    text, reused = await fresh_run(smollm2_path, tmp_path, messages)
    assert (text, reused) == (expected, 0)
    _, reused = await fresh_run(smollm2_path, tmp_path, messages)
    assert reused > 0, "the broken file was replaced by a good one"


async def test_prefix_states_stay_within_their_budget(smollm2_path: Path, tmp_path: Path) -> None:
    budget_mb = 25  # a state is about 12 MB: one or two fit, three never do
    for topic in ("rivers", "birds", "clocks"):
        messages = [Message(role="system", content=long_system_prompt(topic)), *user("Hi.")]
        await fresh_run(smollm2_path, tmp_path, messages, prefix_cache_mb=budget_mb)
    files = list(tmp_path.rglob("*.prefix"))
    assert 1 <= len(files) < 3
    assert sum(f.stat().st_size for f in files) <= budget_mb * 1024 * 1024

    messages = [Message(role="system", content=long_system_prompt("clocks")), *user("Hi.")]
    _, reused = await fresh_run(smollm2_path, tmp_path, messages, prefix_cache_mb=budget_mb)
    assert reused > 0, "the newest state is the one kept"
    _, reused = await fresh_run(smollm2_path, tmp_path / "off", messages, prefix_cache_mb=0)
    assert reused == 0
    assert not list((tmp_path / "off").rglob("*.prefix")), "a budget of 0 turns the cache off"


async def test_two_backends_share_the_model_but_not_sessions(
    backend: LlamaCppBackend, smollm2_path: Path, tmp_path: Path
) -> None:
    other = LlamaCppBackend(smollm2_path, name="other", n_ctx=N_CTX, kv_dir=tmp_path)
    try:
        assert other._engine is backend._engine
        history = [Message(role="system", content="You are terse."), *user("Name a river.")]
        mine = await backend.chat(ChatRequest(messages=history, max_tokens=8, session="same-name"))
        # The same session name in the other backend is another session, with other history.
        theirs = await other.chat(
            ChatRequest(messages=user("Say hello."), max_tokens=8, session="same-name")
        )
        assert mine.text and theirs.text
        assert theirs.usage.prompt_tokens == len(other.prompt_tokens(user("Say hello.")))
        # Switching back, this backend's session still has its own history (from its snapshot).
        history += [Message(role="assistant", content=mine.text), *user("Another one.")]
        again = await backend.chat(ChatRequest(messages=history, max_tokens=8, session="same-name"))
        assert again.usage.reused_prompt_tokens >= mine.usage.prompt_tokens
    finally:
        await other.aclose()
    assert (await backend.chat(ChatRequest(messages=user("Say hi."), max_tokens=4))).text


async def test_logprobs_match_a_direct_computation(backend: LlamaCppBackend, smollm2_path: Path) -> None:
    messages = user("Write one sentence about cats.")
    result = await backend.chat(ChatRequest(messages=messages, max_tokens=12, logprobs=True))
    assert result.logprobs is not None
    assert len(result.logprobs) == result.usage.completion_tokens > 0

    # Greedy decoding by hand on a separate model that keeps every logits row.
    reference = Llama(model_path=str(smollm2_path), n_ctx=512, logits_all=True, verbose=False)
    try:
        tokens = backend.prompt_tokens(messages)
        expected: list[tuple[str, float]] = []
        reference.eval(tokens)
        for _ in result.logprobs:
            row = reference.scores[reference.n_tokens - 1].astype(np.float64)
            log_probs = row - row.max() - np.log(np.exp(row - row.max()).sum())
            token = int(np.argmax(row))
            expected.append((reference.detokenize([token], special=True).decode(), float(log_probs[token])))
            reference.eval([token])
    finally:
        reference.close()
    assert [lp.token for lp in result.logprobs] == [token for token, _ in expected]
    np.testing.assert_allclose([lp.logprob for lp in result.logprobs], [lp for _, lp in expected], atol=1e-3)
    assert all(lp.logprob <= 0 for lp in result.logprobs)


async def test_cancelling_stops_generation(backend: LlamaCppBackend) -> None:
    request = ChatRequest(messages=user("Write a very long story about a dragon."), max_tokens=400)
    started = asyncio.Event()
    task = asyncio.create_task(backend.chat(request, on_text=lambda _: started.set()))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    prompt = len(backend.prompt_tokens(request.messages))
    assert backend._engine.llm.n_tokens < prompt + 400
    after = await backend.chat(ChatRequest(messages=user("Say yes."), max_tokens=4))
    assert after.text


async def test_snapshots_of_dead_processes_are_swept(smollm2_path: Path, tmp_path: Path) -> None:
    dead = tmp_path / "model-999999999-0badc0de"
    alive = tmp_path / f"model-{os.getpid()}-0badc0de"
    for directory in (dead, alive):
        directory.mkdir()
        (directory / "x.kv").write_bytes(b"state")
    llm = LlamaCppBackend(smollm2_path, name="s", n_ctx=N_CTX, kv_dir=tmp_path)
    await llm.aclose()
    assert not dead.exists()
    assert alive.exists()
