"""KV context switch: 4 sessions, each with its own ~1,000-token system prompt, 3 turns each,
served round robin by one local model.

- naive: requests carry no session, so the backend can only reuse a common token prefix; the
  sessions' system prompts differ, so every turn prefills its whole history again (what a backend
  without per-session snapshots does when it serves several conversations).
- llmos: the same requests with `session` set; switching sessions saves the outgoing KV state
  to a file and loads the incoming one, so a turn only evaluates its new tokens.

The two sides run on separate model instances and are interleaved turn by turn (llmos turn,
then the same naive turn), so load from other processes hits both alike. Prints total time and
mean time to first token per turn (all turns, and turns 2+, where every turn is a switch back to
a session), the ratios, and one JSON line.

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
from llmos.cpu.base import ChatRequest, Message
from llmos.cpu.llamacpp import LlamaCppBackend
from llmos.cpu.models import ModelManager

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
        return {
            "total_s": self.total_s,
            "mean_ttft_s": statistics.mean(t for _, t in self.ttfts),
            "mean_ttft_later_turns_s": statistics.mean(later) if later else 0.0,
            "reused_prompt_tokens": self.reused,
        }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--turns", type=int, default=3)
    args = parser.parse_args()

    path = ModelManager(load_config().models_dir).ensure(args.model)
    with tempfile.TemporaryDirectory() as kv:
        ours = LlamaCppBackend(path, name=args.model, n_ctx=N_CTX, kv_dir=Path(kv))
        plain = LlamaCppBackend(path, name=args.model, n_ctx=NAIVE_N_CTX, kv_dir=Path(kv))
        try:
            prompts = [system_prompt(i, ours) for i in range(args.sessions)]
            sizes = [ours.count_tokens(p) for p in prompts]
            print(
                f"model {args.model}: {args.sessions} sessions x {args.turns} turns, prompts {sizes} tokens"
            )
            sides = [
                Side(label, backend, sessions, [[Message(role="system", content=p)] for p in prompts])
                for label, backend, sessions in (("llmos", ours, True), ("naive", plain, False))
            ]
            for side in sides:  # warm-up, not counted
                await side.backend.chat(
                    ChatRequest(messages=[Message(role="user", content="hi")], max_tokens=2)
                )
            for turn in range(args.turns):
                for index in range(args.sessions):
                    for side in sides:
                        await side.turn(turn, index)
            llmos, naive = (side.figures() for side in sides)
        finally:
            await ours.aclose()
            await plain.aclose()

    for label, figures in (("naive re-prefill", naive), ("llmos snapshots", llmos)):
        print(
            f"{label:18s} total {figures['total_s']:7.2f} s   mean TTFT {figures['mean_ttft_s']:6.3f} s   "
            f"mean TTFT turns 2+ {figures['mean_ttft_later_turns_s']:6.3f} s   "
            f"reused {figures['reused_prompt_tokens']:6.0f} tokens"
        )
    ttft_ratio = naive["mean_ttft_s"] / llmos["mean_ttft_s"]
    later_ratio = naive["mean_ttft_later_turns_s"] / llmos["mean_ttft_later_turns_s"]
    total_ratio = naive["total_s"] / llmos["total_s"]
    print(
        f"mean TTFT {ttft_ratio:.1f}x lower (turns 2+: {later_ratio:.1f}x), "
        f"total time {total_ratio:.1f}x lower"
    )
    print(
        json.dumps(
            {
                "bench": "kv_switch",
                "model": args.model,
                "sessions": args.sessions,
                "turns": args.turns,
                "system_prompt_tokens": sizes,
                "naive_total_s": round(naive["total_s"], 3),
                "llmos_total_s": round(llmos["total_s"], 3),
                "naive_mean_ttft_s": round(naive["mean_ttft_s"], 4),
                "llmos_mean_ttft_s": round(llmos["mean_ttft_s"], 4),
                "naive_mean_ttft_turns2plus_s": round(naive["mean_ttft_later_turns_s"], 4),
                "llmos_mean_ttft_turns2plus_s": round(llmos["mean_ttft_later_turns_s"], 4),
                "ttft_ratio": round(ttft_ratio, 2),
                "ttft_ratio_turns2plus": round(later_ratio, 2),
                "total_ratio": round(total_ratio, 2),
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
