"""Backend overhead: generation tokens/s through LlamaCppBackend vs llama-cpp-python called directly.

Both sides get the same prompt tokens (the backend's chat template), greedy sampling and the same
max_tokens, on the very same `Llama` object (the backend's), so weights, context and threads are
identical and only the code around the token loop differs. Generation speed is measured from the
first token to the last (prefill excluded), so the figure is the cost of our per-token work
(streaming callback, stop strings, UTF-8 decoding, cancellation check, worker thread hop).
Runs alternate between the two sides to cancel machine noise. Two figures per side: the median
over runs of the mean rate, and the steady rate 1 / (median interval between tokens over all runs),
which a burst of load from other processes on a shared machine does not move; the ratio reported
in the JSON line is the steady one.

    .venv/bin/python bench/backend_overhead.py [--model smollm2-135m-instruct] [--rounds 5] [--tokens 128]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import llama_cpp
from llama_cpp import Llama

from llmos.config import load_config
from llmos.cpu.llamacpp import LlamaCppBackend
from llmos.kernel.devices import ChatRequest, Message
from llmos.models import ModelManager

N_CTX = 2048
PROMPT = "Write a long, detailed story about a robot who learns to paint. Use many paragraphs."


Run = tuple[float, list[float], int]  # (mean tokens/s, intervals between tokens, tokens)


async def through_backend(backend: LlamaCppBackend, tokens: int) -> Run:
    # Stamped when each piece reaches the caller's event loop: the thread hop is part of the cost.
    stamps: list[float] = []
    request = ChatRequest(messages=[Message(role="user", content=PROMPT)], max_tokens=tokens)
    result = await backend.chat(request, on_text=lambda _: stamps.append(time.perf_counter()))
    generating = result.duration_s - (result.time_to_first_token_s or 0.0)
    intervals = [b - a for a, b in itertools.pairwise(stamps)]
    return (result.usage.completion_tokens - 1) / generating, intervals, result.usage.completion_tokens


def direct(llm: Llama, lock: threading.Lock, prompt: list[int], tokens: int) -> Run:
    """The bare loop a user of llama-cpp-python writes: generate, stop at end of generation, detokenize."""
    with lock:
        return _direct(llm, prompt, tokens)


def _direct(llm: Llama, prompt: list[int], tokens: int) -> Run:
    stamps: list[float] = []
    text = b""
    for token in llm.generate(prompt, temp=0.0, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
        if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
            break
        text += llm.detokenize([token])
        stamps.append(time.perf_counter())
        if len(stamps) >= tokens:
            break
    intervals = [b - a for a, b in itertools.pairwise(stamps)]
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]), intervals, len(stamps)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()

    path = ModelManager(load_config().models_dir).ensure(args.model)
    with tempfile.TemporaryDirectory() as kv:
        backend = LlamaCppBackend(path, name=args.model, n_ctx=N_CTX, kv_dir=Path(kv))
        # The backend's own model object; its lock keeps the two sides from overlapping.
        llm, lock = backend._engine.llm, backend._engine.lock
        try:
            prompt = backend.prompt_tokens([Message(role="user", content=PROMPT)])
            rates: dict[str, list[float]] = {"backend": [], "direct": []}
            intervals: dict[str, list[float]] = {"backend": [], "direct": []}
            counts: set[int] = set()
            for round_ in range(args.rounds + 1):
                # Alternate which side goes first; round 0 is a warm-up that is not counted.
                for side in ("backend", "direct") if round_ % 2 else ("direct", "backend"):
                    if side == "backend":
                        rate, gaps, count = await through_backend(backend, args.tokens)
                    else:
                        rate, gaps, count = await asyncio.to_thread(direct, llm, lock, prompt, args.tokens)
                    if round_ > 0:
                        rates[side].append(rate)
                        intervals[side].extend(gaps)
                        counts.add(count)
        finally:
            await backend.aclose()

    mean = {side: statistics.median(values) for side, values in rates.items()}
    steady = {side: 1.0 / statistics.median(values) for side, values in intervals.items()}
    mean_ratio = mean["backend"] / mean["direct"]
    steady_ratio = steady["backend"] / steady["direct"]
    print(f"model {args.model}, max {args.tokens} tokens, {args.rounds} rounds, tokens/run {sorted(counts)}")
    for side, label in (("direct", "direct llama-cpp-python"), ("backend", "LlamaCppBackend")):
        runs = [round(r, 1) for r in rates[side]]
        print(f"{label:24s} steady {steady[side]:6.1f} tok/s   mean {mean[side]:6.1f} tok/s   runs {runs}")
    print(f"ratio backend/direct: steady {steady_ratio:.3f}, mean {mean_ratio:.3f}")
    print(
        json.dumps(
            {
                "bench": "backend_overhead",
                "model": args.model,
                "max_tokens": args.tokens,
                "rounds": args.rounds,
                "direct_tok_s": round(steady["direct"], 2),
                "backend_tok_s": round(steady["backend"], 2),
                "ratio": round(steady_ratio, 4),
                "direct_mean_tok_s": round(mean["direct"], 2),
                "backend_mean_tok_s": round(mean["backend"], 2),
                "mean_ratio": round(mean_ratio, 4),
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
