"""Memory benchmark: store throughput and query latency at 10k and 100k records (embedded and
through a real Chroma server), and prompt tokens per step of a 100-step agent run with the
context manager against replaying the full history.

Run from the repo root: `.venv/bin/python bench/memory.py` (about 5-10 minutes on 2 cores).
The last line is one JSON object with the figures.

The agent run is a process on a kernel, as an agent's is: its context window counts tokens,
archives and summarises through the process's syscalls (`llm.count`, `mem.add`, `llm.chat`). The
model is the scripted fake with SmolLM2's real tokenizer: the figures are layout, not quality.

Embedding 100k texts at ~300-480 docs/s would take 4-6 minutes per backend, so: a pool of
texts is embedded once for real (that run is the "real embedding" add throughput), and the
bulk records reuse the pool's vectors with a little noise ("precomputed" add throughput:
chroma's own cost). Query latency is reported both with the query's embedding (what a user of
`search` sees) and for the vector search alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from llmos import Kernel
from llmos.config import Config, MemoryConfig, load_config
from llmos.cpu.scripted import ScriptedLLM
from llmos.kernel import State
from llmos.kernel.devices import ChatRequest, Message, ToolCall
from llmos.kernel.process import Process
from llmos.memory.context import ContextBudget, ContextWindow, message_text
from llmos.memory.embeddings import OnnxEmbeddingFunction
from llmos.memory.store import MemoryStore, NewRecord
from llmos.models import ModelManager

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' server helper
from loopback import chroma_server

# An agent searches its own namespace and the shared one: every record is in one of the two,
# so each query covers the whole store (the worst case for one agent).
NAMESPACES = ("agent:bench", "shared")
SUBJECTS = [
    "The server",
    "My manager",
    "The invoice",
    "Our cat",
    "The train",
    "The recipe",
    "The contract",
    "The garden",
    "The database",
    "The concert",
    "The vaccine",
    "The bridge",
    "The laptop",
    "The river",
]
VERBS = [
    "was moved to",
    "depends on",
    "was cancelled because of",
    "needs",
    "is stored near",
    "reminds me of",
    "was paid for with",
    "broke after",
    "is scheduled after",
    "was approved by",
]
OBJECTS = ["the new budget", "a heavy storm", "the third floor", "an old password", "the summer holidays",
           "a blue folder", "the night shift", "a software update", "the city council", "fresh tomatoes",
           "the backup drive", "a late delivery", "the quarterly review", "the spare keys"]  # fmt: skip


def texts(n: int, rng: random.Random) -> list[str]:
    return [
        f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} on day {rng.randint(1, 365)}."
        for _ in range(n)
    ]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def bench_store(
    store: MemoryStore, pool: list[str], vectors: np.ndarray, sizes: list[int], rng: np.random.Generator
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    # Real embedding: a slice of the pool through add_many, embedded by the store.
    real_n = min(1000, len(pool))
    t = time.perf_counter()
    store.add_many(
        [NewRecord(text=x, namespace="agent:bench", source="bench", trust="tool") for x in pool[:real_n]]
    )
    out["add_docs_per_s_real_embedding"] = round(real_n / (time.perf_counter() - t), 1)
    have = real_n
    queries = pool[-200:]
    query_vectors = vectors[-200:]
    for size in sizes:
        add_s = 0.0
        added = 0
        while have < size:
            n = min(5000, size - have)
            idx = rng.integers(0, len(pool), n)
            noisy = vectors[idx] + rng.normal(0, 0.02, (n, vectors.shape[1])).astype(np.float32)
            noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
            records = [
                NewRecord(
                    text=f"{pool[i]} (#{have + j})",
                    namespace=NAMESPACES[j % 10 == 0],
                    source="bench",
                    trust="tool",
                )
                for j, i in enumerate(idx)
            ]
            t = time.perf_counter()
            store.add_many(records, embeddings=noisy)
            add_s += time.perf_counter() - t
            added += n
            have += n
        namespaces = list(NAMESPACES)
        full, vector_only = [], []
        for q, qv in zip(queries[:100], query_vectors[:100], strict=True):
            t = time.perf_counter()
            store.search(q, namespaces=namespaces, k=5)
            full.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            store.search(q, namespaces=namespaces, k=5, query_embedding=qv)
            vector_only.append((time.perf_counter() - t) * 1000)
        out[str(size)] = {
            "records": store.count(),
            "add_docs_per_s_precomputed": round(added / add_s, 1) if added else None,
            "query_ms_p50": round(pct(full, 0.5), 2),
            "query_ms_p95": round(pct(full, 0.95), 2),
            "vector_search_ms_p50": round(pct(vector_only, 0.5), 2),
            "vector_search_ms_p95": round(pct(vector_only, 0.95), 2),
        }
        print(f"  {size:>7} records: {out[str(size)]}", flush=True)
    return out


class TokenizedLLM(ScriptedLLM):
    """The scripted fake model with a real tokenizer: `llm.count` answers with real token counts."""

    def __init__(self, count: Callable[[str], int], context_length: int) -> None:
        super().__init__([self.summary] * 10_000, context_length=context_length)
        self.count = count

    def count_tokens(self, text: str) -> int:
        return self.count(text)

    @staticmethod
    def summary(request: ChatRequest) -> str:
        """The recap a summary call gets: the start of the last six paged-out messages."""
        lines = request.messages[-1].content.splitlines()
        return "Progress so far: " + "; ".join(line[:40] for line in lines[-6:])


async def run_agent_steps(proc: Process, steps: int, n_ctx: int) -> dict[str, Any]:
    """A scripted agent: one task, then per step a fixed-size thought + tool call and tool result.
    Returns the prompt tokens of each step with the window, and the whole history."""

    async def summarize(messages: list[Message]) -> str:
        transcript = "\n".join(message_text(m) for m in messages)
        prompt = [{"role": "system", "content": "Summarise."}, {"role": "user", "content": transcript}]
        return str((await proc.syscall("llm.chat", messages=prompt, max_tokens=160)).unwrap().text)

    window = await ContextWindow.open(
        proc, namespace="agent:ctxbench", window_id="ctxbench", system="You are a diligent research agent.",
        budget=ContextBudget.for_context(n_ctx), summarize=summarize,
    )  # fmt: skip
    task = Message(role="user", content="Survey the logs and report every anomaly you find, with its cause.")
    window.add(task)
    managed: list[int] = []
    history = [task]
    for step in range(steps):
        await window.build()
        assert window.last_step is not None
        managed.append(window.last_step.prompt_tokens)
        thought = Message(
            role="assistant",
            content=f"Step {step}: checking the next log segment for anomalies. " * 4,
            tool_calls=[ToolCall(id=f"c{step}", name="read_log", arguments={"segment": step})],
        )
        result = Message(
            role="tool", tool_call_id=f"c{step}", content=f"segment {step}: " + "ok 200 GET /api " * 25
        )
        for m in (thought, result):
            window.add(m)
            history.append(m)
    return {"managed": managed, "paged_out": window.paged_out, "history": [message_text(m) for m in history]}


async def bench_context(
    store: MemoryStore, count: Callable[[str], int], steps: int, n_ctx: int, config: Config
) -> dict[str, Any]:
    system_tokens = count("You are a diligent research agent.") + 6
    async with Kernel(config, llm=TokenizedLLM(count, n_ctx), memory=store) as kernel:
        info = await kernel.run(run_agent_steps, args={"steps": steps, "n_ctx": n_ctx})
        assert info.state == State.DONE, info.error
        made = Counter(e.name for e in kernel.log(info.pid) if e.kind == "result")
    run = info.result
    managed: list[int] = run["managed"]
    # Full replay: every message so far, each step (counted here, outside the process).
    sizes = [count(text) + 6 for text in run["history"]]
    replay = [system_tokens + sum(sizes[: 1 + 2 * step]) + 8 for step in range(steps)]
    early = statistics.mean(managed[10:20])
    late = statistics.mean(managed[90:100]) if steps >= 100 else statistics.mean(managed[-10:])
    return {
        "steps": steps,
        "n_ctx": n_ctx,
        "managed_tokens_steps_10_20": round(early, 1),
        "managed_tokens_steps_90_100": round(late, 1),
        "managed_flatness_ratio": round(late / early, 3),
        "managed_max": max(managed),
        "replay_tokens_steps_10_20": round(statistics.mean(replay[10:20]), 1),
        "replay_tokens_steps_90_100": round(
            statistics.mean(replay[90:100] if steps >= 100 else replay[-10:]), 1
        ),
        "managed_total": sum(managed),
        "replay_total": sum(replay),
        "paged_out_messages": run["paged_out"],
        # What the window asked of the kernel over the run (each a journaled syscall).
        "window_syscalls": {name: made[name] for name in ("llm.count", "mem.add", "llm.chat", "mem.search")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="10000,100000", help="record counts to measure at")
    parser.add_argument("--pool", type=int, default=3000, help="texts embedded for real")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--skip-server", action="store_true")
    args = parser.parse_args()
    if args.steps < 20:
        parser.error("--steps must be at least 20: tokens per step are compared at steps 10-20 and the end")
    sizes = [int(s) for s in args.sizes.split(",")]

    base = load_config()
    models = ModelManager(base.models_dir)
    embedder = OnnxEmbeddingFunction(models.ensure(base.memory.embedding_model))
    rng = random.Random(1)
    pool = sorted(set(texts(args.pool * 2, rng)))[: args.pool]
    print(f"embedding a pool of {len(pool)} texts ...", flush=True)
    t = time.perf_counter()
    vectors = embedder.embed(pool)
    pool_rate = len(pool) / (time.perf_counter() - t)
    print(f"  embedder alone: {pool_rate:.0f} docs/s", flush=True)
    results: dict[str, Any] = {"embedder_docs_per_s": round(pool_rate, 1)}

    tmp = Path(tempfile.mkdtemp(prefix="llmos-bench-memory-"))
    try:
        print("embedded store (PersistentClient):", flush=True)
        config = Config(home=tmp / "embedded", models_dir=base.models_dir)
        with MemoryStore.open(config, embedder=embedder) as store:
            results["embedded"] = bench_store(store, pool, vectors, sizes, np.random.default_rng(2))
        if not args.skip_server:
            print("Chroma server (HttpClient -> chroma run on 127.0.0.1):", flush=True)
            with chroma_server(tmp / "server-db") as url:
                remote = Config(
                    home=tmp / "client", models_dir=base.models_dir, memory=MemoryConfig(chroma_url=url)
                )
                with MemoryStore.open(remote, embedder=embedder) as store:
                    results["server"] = bench_store(store, pool, vectors, sizes, np.random.default_rng(2))

        print(f"context manager vs full replay, {args.steps} steps:", flush=True)
        from llama_cpp import Llama

        vocab = Llama(str(models.ensure("smollm2-135m-instruct")), vocab_only=True, verbose=False)

        def count(text: str) -> int:
            return len(vocab.tokenize(text.encode(), add_bos=False, special=True))

        config = Config(home=tmp / "context", models_dir=base.models_dir)
        with MemoryStore.open(config, embedder=embedder) as store:
            results["context"] = asyncio.run(bench_context(store, count, args.steps, base.llm.n_ctx, config))
        print(f"  {results['context']}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    largest = str(max(sizes))
    results["targets"] = {
        "query_p50_under_10ms_at_largest": results["embedded"][largest]["query_ms_p50"] < 10,
        "tokens_per_step_flat": results["context"]["managed_flatness_ratio"] <= 1.5,
        "replay_grows": results["context"]["replay_tokens_steps_90_100"]
        > 2 * results["context"]["replay_tokens_steps_10_20"],
    }
    print(json.dumps(results))


if __name__ == "__main__":
    main()
