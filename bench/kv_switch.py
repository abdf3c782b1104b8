"""KV context switch: 4 sessions, each with its own ~1,000-token system prompt, 3 turns each,
served round robin by one local model.

- naive: requests carry no session, so the backend can only reuse a common token prefix; the
  sessions' system prompts differ, so every turn prefills its whole history again (what a backend
  without per-session snapshots does when it serves several conversations).
- llmos: the same requests with `session` set; switching sessions saves the outgoing KV state
  to a file and loads the incoming one, so a turn only evaluates its new tokens. A system
  prompt's state also goes to the prefix cache, which outlives the backend.

Two runs: the first with nothing cached, where each session's first turn prefills its system
prompt on both sides (so the all-turn ratio cannot exceed about turns x); then the same four
sessions again from a new llmos backend (the model reloaded, the session snapshots gone), as when
the same agents run again, where the system prompts come from the prefix cache.

The two sides run on separate model instances and are interleaved turn by turn (llmos turn,
then the same naive turn), so load from other processes hits both alike. Prints total time and
mean time to first token (over all turns, for each turn number, and over turns 2+, where every
turn is a switch back to a session) for each run, the ratios, and one JSON line.

    .venv/bin/python bench/kv_switch.py [--model qwen2.5-coder-0.5b-instruct] [--sessions 4] [--turns 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from llmos.config import load_config
from llmos.cpu.llamacpp import LlamaCppBackend
from llmos.kernel.devices import ChatRequest, Message
from llmos.models import ModelManager

WEATHER = ["dry", "wet", "windy"]
TOPICS = ["a lighthouse keeper", "a bakery", "a mountain railway", "a river delta", "a chess club", "a comet"]
N_CTX = 2048
# A different context size gives the naive side a model instance of its own (backends share a
# `Llama` per model file and n_ctx), so neither side can reuse the other's KV cache.
NAIVE_N_CTX = 2304


def system_prompt(index: int, backend: LlamaCppBackend, target_tokens: int = 1000) -> str:
    """A distinct system prompt of about `target_tokens` tokens for session `index`."""
    topic = TOPICS[index % len(TOPICS)]
    lines = [f"You are the archivist of {topic}. Session {index}. Answer briefly using these notes."]
    fact = 0
    while backend.count_tokens("\n".join(lines)) < target_tokens:
        fact += 1
        lines.append(
            f"Note {fact} about {topic}: entry {index * 1000 + fact} records that on day {fact * 7 % 31 + 1} "
            f"the count was {(fact * 37 + index * 11) % 997} and the weather was {WEATHER[fact % 3]}."
        )
    return "\n".join(lines)


@dataclass
class Side:
    label: str
    backend: LlamaCppBackend
    sessions: bool
    histories: list[list[Message]]
    ttfts: list[tuple[int, float]] = field(default_factory=list)
    total_s: float = 0.0
    reused: int = 0

    async def turn(self, turn: int, index: int) -> None:
        history = self.histories[index]
        history.append(Message(role="user", content=f"Question {turn + 1}: what does note {turn + 3} say?"))
        session = f"s{index}" if self.sessions else None
        result = await self.backend.chat(ChatRequest(messages=history, max_tokens=16, session=session))
        history.append(Message(role="assistant", content=result.text))
        ttft = result.time_to_first_token_s or 0.0
        self.ttfts.append((turn, ttft))
        self.total_s += result.duration_s
        self.reused += result.usage.reused_prompt_tokens
        print(f"  {self.label:5s} turn {turn + 1} session {index}: TTFT {ttft:7.3f} s", flush=True)

    def figures(self) -> dict[str, float]:
        later = [t for turn, t in self.ttfts if turn > 0]
        turns = sorted({turn for turn, _ in self.ttfts})
        return {
            "total_s": self.total_s,
            "mean_ttft_s": statistics.mean(t for _, t in self.ttfts),
            "mean_ttft_later_turns_s": statistics.mean(later) if later else 0.0,
            "reused_prompt_tokens": self.reused,
            **{
                f"mean_ttft_turn{turn + 1}_s": statistics.mean(t for n, t in self.ttfts if n == turn)
                for turn in turns
            },
        }


def new_sides(ours: LlamaCppBackend, plain: LlamaCppBackend, prompts: list[str]) -> list[Side]:
    return [
        Side(label, backend, sessions, [[Message(role="system", content=p)] for p in prompts])
        for label, backend, sessions in (("llmos", ours, True), ("naive", plain, False))
    ]


async def run_pass(sides: list[Side], sessions: int, turns: int) -> tuple[dict[str, float], dict[str, float]]:
    """Every session's turns round robin; each llmos turn is followed by the same naive turn."""
    for side in sides:  # warm-up, not counted
        await side.backend.chat(ChatRequest(messages=[Message(role="user", content="hi")], max_tokens=2))
    for turn in range(turns):
        for index in range(sessions):
            for side in sides:
                await side.turn(turn, index)
    llmos, naive = (side.figures() for side in sides)
    return llmos, naive


def report(title: str, llmos: dict[str, float], naive: dict[str, float]) -> dict[str, float]:
    print(title)
    for label, figures in (("naive re-prefill", naive), ("llmos", llmos)):
        print(
            f"  {label:16s} total {figures['total_s']:7.2f} s   mean TTFT {figures['mean_ttft_s']:6.3f} s   "
            f"mean TTFT turns 2+ {figures['mean_ttft_later_turns_s']:6.3f} s   "
            f"reused {figures['reused_prompt_tokens']:6.0f} tokens"
        )
    by_turn = sorted(key for key in llmos if key.startswith("mean_ttft_turn"))
    for key in by_turn:
        print(
            f"  turn {key.removeprefix('mean_ttft_turn').removesuffix('_s')}: mean TTFT naive "
            f"{naive[key]:6.3f} s, llmos {llmos[key]:6.3f} s, {naive[key] / llmos[key]:5.1f}x lower"
        )
    ratios = {
        **{
            f"ttft_ratio_{key.removeprefix('mean_ttft_').removesuffix('_s')}": naive[key] / llmos[key]
            for key in by_turn
        },
        "ttft_ratio": naive["mean_ttft_s"] / llmos["mean_ttft_s"],
        "ttft_ratio_turns2plus": naive["mean_ttft_later_turns_s"] / llmos["mean_ttft_later_turns_s"],
        "total_ratio": naive["total_s"] / llmos["total_s"],
    }
    print(
        f"  mean TTFT {ratios['ttft_ratio']:.1f}x lower (turns 2+: {ratios['ttft_ratio_turns2plus']:.1f}x), "
        f"total time {ratios['total_ratio']:.1f}x lower"
    )
    return {
        "naive_total_s": naive["total_s"],
        "llmos_total_s": llmos["total_s"],
        "naive_mean_ttft_s": naive["mean_ttft_s"],
        "llmos_mean_ttft_s": llmos["mean_ttft_s"],
        "naive_mean_ttft_turns2plus_s": naive["mean_ttft_later_turns_s"],
        "llmos_mean_ttft_turns2plus_s": llmos["mean_ttft_later_turns_s"],
        **ratios,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--turns", type=int, default=3)
    args = parser.parse_args()

    path = ModelManager(load_config().models_dir).ensure(args.model)
    with tempfile.TemporaryDirectory() as kv:
        # The naive side keeps no state at all: no session snapshots, no prefix cache.
        plain = LlamaCppBackend(path, name=args.model, n_ctx=NAIVE_N_CTX, kv_dir=Path(kv), prefix_cache_mb=0)
        ours = LlamaCppBackend(path, name=args.model, n_ctx=N_CTX, kv_dir=Path(kv))
        try:
            prompts = [system_prompt(i, ours) for i in range(args.sessions)]
            sizes = [ours.count_tokens(p) for p in prompts]
            print(
                f"model {args.model}: {args.sessions} sessions x {args.turns} turns, prompts {sizes} tokens"
            )
            print("first run (nothing cached):")
            cold = await run_pass(new_sides(ours, plain, prompts), args.sessions, args.turns)
            # A new llmos instance (the model is loaded again; the sessions' snapshots are gone),
            # as when the same four agents run again: only the prefix cache carries over.
            await ours.aclose()
            ours = LlamaCppBackend(path, name=args.model, n_ctx=N_CTX, kv_dir=Path(kv))
            print("second run of the same agents (system prompts in the prefix cache):")
            warm = await run_pass(new_sides(ours, plain, prompts), args.sessions, args.turns)
        finally:
            await ours.aclose()
            await plain.aclose()

    figures = {
        "cold": report("first run (nothing cached):", *cold),
        "warm": report("second run (system prompts cached):", *warm),
    }
    print(
        json.dumps(
            {
                "bench": "kv_switch",
                "model": args.model,
                "sessions": args.sessions,
                "turns": args.turns,
                "system_prompt_tokens": sizes,
                **{
                    f"{run}_{key}": round(value, 4)
                    for run, values in figures.items()
                    for key, value in values.items()
                },
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
