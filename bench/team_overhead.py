"""The same AutoGen team task through the llmos adapters (a team process, member processes, every
model call a journaled syscall) and through plain AutoGen with a client that calls the same
loaded model directly. Runs alternate (llmos, plain, plain, llmos, ...) so both see the same
machine noise. Prints wall times, their ratio (target <= 1.05) and the tokens each accounted.

    .venv/bin/python bench/team_overhead.py [--model smollm2-135m-instruct] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncGenerator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autogen_agentchat.agents import AssistantAgent
from autogen_agentchat.teams import RoundRobinGroupChat
from autogen_core import CancellationToken
from autogen_core.models import ChatCompletionClient, CreateResult, LLMMessage, ModelInfo, RequestUsage
from autogen_core.tools import Tool, ToolSchema
from pydantic import BaseModel

from llmos import Kernel
from llmos.agents.autogen import MemberSpec, TeamSpec, run_team, to_create_result, to_llmos_messages
from llmos.config import load_config
from llmos.cpu.scripted import ScriptedLLM
from llmos.kernel import State
from llmos.kernel.devices import ChatRequest, LLMBackend

TASK = "Write a Python function add(a, b) that returns the sum."
MEMBERS = [
    MemberSpec(name="coder", system_message="You write short Python code.", description="writes code"),
    MemberSpec(name="reviewer", system_message="You review code in one sentence.", description="reviews"),
]


class DirectClient(ChatCompletionClient):
    """Plain AutoGen's side: a minimal client that calls the loaded backend directly, with no
    process, scheduler, budget or journal in between (the same message and result mapping)."""

    def __init__(self, backend: LLMBackend, session: str, max_tokens: int) -> None:
        self._backend = backend
        self._session = session
        self._max_tokens = max_tokens
        self._usage = RequestUsage(prompt_tokens=0, completion_tokens=0)

    async def create(
        self,
        messages: Sequence[LLMMessage],
        *,
        tools: Sequence[Tool | ToolSchema] = [],
        tool_choice: Tool | Literal["auto", "required", "none"] = "auto",
        json_output: bool | type[BaseModel] | None = None,
        extra_create_args: Mapping[str, Any] = {},
        cancellation_token: CancellationToken | None = None,
    ) -> CreateResult:
        request = ChatRequest(
            messages=to_llmos_messages(messages), max_tokens=self._max_tokens, session=self._session
        )
        result = to_create_result(await self._backend.chat(request))
        self._usage = RequestUsage(
            prompt_tokens=self._usage.prompt_tokens + result.usage.prompt_tokens,
            completion_tokens=self._usage.completion_tokens + result.usage.completion_tokens,
        )
        return result

    def create_stream(self, *args: Any, **kwargs: Any) -> AsyncGenerator[str | CreateResult, None]:
        raise NotImplementedError("the bench runs without streaming on both sides")

    async def close(self) -> None:
        pass

    def actual_usage(self) -> RequestUsage:
        return self._usage

    def total_usage(self) -> RequestUsage:
        return self._usage

    def count_tokens(self, messages: Sequence[LLMMessage], **kwargs: Any) -> int:
        return sum(self._backend.count_tokens(m.content) for m in to_llmos_messages(messages))

    def remaining_tokens(self, messages: Sequence[LLMMessage], **kwargs: Any) -> int:
        return self._backend.info.context_length - self.count_tokens(messages)

    @property
    def capabilities(self) -> Any:
        return self.model_info

    @property
    def model_info(self) -> ModelInfo:
        return ModelInfo(
            vision=False, function_calling=True, json_output=True, structured_output=True, family="unknown"
        )


async def run_llmos(kernel: Kernel, spec: TeamSpec) -> tuple[float, int]:
    start = time.perf_counter()
    info = await run_team(kernel, spec, TASK)
    elapsed = time.perf_counter() - start
    assert info.state == State.DONE, info.error
    pids = [info.pid] + [child.pid for child in kernel.journal.children(info.pid)]
    tokens = sum(usage.tokens for usage in kernel.journal.usage_by_pid(pids).values())
    return elapsed, tokens


async def run_plain(backend: LLMBackend, spec: TeamSpec, run: int) -> tuple[float, int]:
    assert spec.max_tokens is not None
    start = time.perf_counter()
    clients = [DirectClient(backend, f"plain-{run}-{m.name}", spec.max_tokens) for m in spec.members]
    agents = [
        AssistantAgent(m.name, model_client=c, system_message=m.system_message, description=m.description)
        for m, c in zip(spec.members, clients, strict=True)
    ]
    team = RoundRobinGroupChat(list(agents), max_turns=spec.max_turns)
    result = await team.run(task=TASK)
    elapsed = time.perf_counter() - start
    assert result.stop_reason and "Maximum number of turns" in result.stop_reason
    return elapsed, sum(c.total_usage().prompt_tokens + c.total_usage().completion_tokens for c in clients)


async def compare(
    kernel: Kernel, backend: LLMBackend, spec: TeamSpec, rounds: int, label: str
) -> tuple[dict[str, list[float]], dict[str, list[int]]]:
    """Alternate the two sides (llmos, plain, plain, llmos, ...) after one warm-up run each."""
    times: dict[str, list[float]] = {"llmos": [], "plain": []}
    tokens: dict[str, list[int]] = {"llmos": [], "plain": []}
    await run_llmos(kernel, spec)  # warm-up: caches, imports, first KV snapshots
    await run_plain(backend, spec, -1)
    for run in range(rounds * 2):
        for side in ("llmos", "plain") if run % 2 == 0 else ("plain", "llmos"):
            if side == "llmos":
                elapsed, used = await run_llmos(kernel, spec)
            else:
                elapsed, used = await run_plain(backend, spec, run)
            times[side].append(elapsed)
            tokens[side].append(used)
            if label:
                print(f"{label} run {run} {side:<6} {elapsed:7.3f} s  {used:5d} tokens", flush=True)
    return times, tokens


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rounds", type=int, default=2, help="pairs of runs (each side runs 2x this)")
    parser.add_argument("--max-turns", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=32)
    options = parser.parse_args()
    spec = TeamSpec(
        members=MEMBERS,
        model=options.model,
        max_turns=options.max_turns,
        max_tokens=options.max_tokens,
        stream=False,  # plain AutoGen's side does not stream either
    )
    with tempfile.TemporaryDirectory() as home:
        config = load_config(env={"LLMOS_HOME": home})
        async with Kernel(config) as kernel:
            backend = await kernel.llm(options.model)  # one loaded model for both sides
            times, tokens = await compare(kernel, backend, spec, options.rounds, options.model)
        # The adapters' own cost, without a model's noise: an instant scripted fake LLM.
        scripted = ScriptedLLM(["def add(a, b): return a + b"] * 100_000)
        fake_spec = spec.model_copy(update={"model": None})
        async with Kernel(config.model_copy(update={"home": Path(home) / "fake"}), llm=scripted) as kernel:
            fake_times, _ = await compare(kernel, scripted, fake_spec, 10, "")
    llmos_s, plain_s = statistics.median(times["llmos"]), statistics.median(times["plain"])
    ratio = llmos_s / plain_s
    fake_llmos, fake_plain = statistics.median(fake_times["llmos"]), statistics.median(fake_times["plain"])
    per_call_ms = (fake_llmos - fake_plain) * 1000 / options.max_turns
    print(f"median wall time: llmos {llmos_s:.2f} s, plain AutoGen {plain_s:.2f} s, ratio {ratio:.3f}")
    print(f"tokens accounted per run: llmos journal {tokens['llmos']}, plain client usage {tokens['plain']}")
    print(
        f"with an instant scripted LLM: llmos {fake_llmos * 1000:.1f} ms, plain {fake_plain * 1000:.1f} ms "
        f"per run, so {per_call_ms:.1f} ms per model call (spawning members, syscalls, journal)"
    )
    figures = {
        "model": options.model,
        "runs_per_side": len(times["llmos"]),
        "max_turns": options.max_turns,
        "llmos_median_s": round(llmos_s, 3),
        "plain_median_s": round(plain_s, 3),
        "ratio": round(ratio, 3),
        "target_ratio": 1.05,
        "llmos_tokens": tokens["llmos"][0],
        "plain_tokens": tokens["plain"][0],
        "tokens_equal": tokens["llmos"] == tokens["plain"],
        "scripted_llmos_ms": round(fake_llmos * 1000, 2),
        "scripted_plain_ms": round(fake_plain * 1000, 2),
        "overhead_ms_per_call": round(per_call_ms, 2),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    asyncio.run(main())
