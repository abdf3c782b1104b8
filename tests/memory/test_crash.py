"""Crash safety of paging: a real process is SIGKILLed in the middle of a page-out."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap

from llmos.config import Config
from llmos.memory.context import ContextBudget, ContextWindow
from llmos.memory.embeddings import OnnxEmbeddingFunction
from llmos.memory.store import CRASH_HOOK_ENV, MemoryStore, NewRecord, collection_name

CHILD = textwrap.dedent(
    """
    import asyncio, json, sys
    from llmos.config import load_config
    from llmos.kernel.devices import Message
    from llmos.memory.context import ContextBudget, ContextWindow
    from llmos.memory.store import MemoryStore

    async def summarize(messages):
        return "never reached"

    async def main():
        store = MemoryStore.open(load_config())
        w = ContextWindow(
            store, namespace="agent:crash", window_id="w1", count_tokens=lambda s: len(s.split()),
            budget=ContextBudget.for_context(1024), summarize=summarize,
        )
        for i in range(80):
            w.add(Message(role="user" if i % 2 == 0 else "assistant", content=f"turn {i} " + "cargo " * 20))
        print(json.dumps([t.message.content for t in w.turns]), flush=True)
        await w.build()  # pages out; the hook kills us after two upsert batches
        print("SURVIVED", flush=True)

    asyncio.run(main())
    """
)


def _pageouts(config: Config) -> list[tuple[str, str]]:
    with sqlite3.connect(config.journal_path) as db:
        return db.execute("SELECT state, record_ids FROM pageouts ORDER BY id").fetchall()


def test_sigkill_in_the_middle_of_a_page_out_loses_no_turn(
    config: Config, embedder: OnnxEmbeddingFunction
) -> None:
    env = {**os.environ, "LLMOS_HOME": str(config.home), CRASH_HOOK_ENV: "2"}
    cmd = [sys.executable, "-c", CHILD]
    child = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert "SURVIVED" not in child.stdout
    turns = json.loads(child.stdout.splitlines()[0])

    # The intent was committed before chroma was touched, and chroma holds only part of it.
    [(state, ids_json)] = _pageouts(config)
    ids = json.loads(ids_json)
    assert state == "pending" and len(ids) > 16
    import chromadb

    client = chromadb.PersistentClient(path=str(config.home / "memory"))
    partial = client.get_collection(collection_name("agent:crash")).get(ids=ids)["ids"]
    client.close()
    assert 0 < len(partial) < len(ids)

    # A new process (this one) opens the store: the page-out is completed, every turn is there.
    with MemoryStore.open(config, embedder=embedder) as store:
        assert [s for s, _ in _pageouts(config)] == ["done"]
        records = store.get_many(ids)
        assert [r.text for r in records] == turns[: len(ids)]
        assert all(r.namespace == "agent:crash" and r.metadata["kind"] == "turn" for r in records)
        # The window picks up where it was: numbering continues, a recap stands in for the
        # summary the crash prevented, and the turns can be found again.
        w = ContextWindow(
            store, namespace="agent:crash", window_id="w1", count_tokens=lambda s: len(s.split()),
            budget=ContextBudget.for_context(1024),
        )  # fmt: skip
        assert w.paged_through == len(ids) - 1 and f"turn {len(ids) - 1} cargo" in w.recap
        assert w.conversation_search("turn 3 cargo", k=1).hits[0].id == "turn:w1:3"
        assert store.stats().pending_intents == 0


def test_an_unreadable_intent_is_rolled_back(config: Config, embedder: OnnxEmbeddingFunction) -> None:
    with MemoryStore.open(config, embedder=embedder) as store:
        store.add_many([NewRecord(text="half written", namespace="n", source="t", trust="tool", id="x1")])
        assert store.journal is not None
        store.journal.db.execute(
            "INSERT INTO pageouts (window, state, record_ids, records, note, created_at) "
            "VALUES ('w', 'pending', ?, 'not json', '{}', 0)",
            (json.dumps(["x1"]),),
        )
    with MemoryStore.open(config, embedder=embedder) as store:
        assert store.get("x1") is None
        assert [s for s, _ in _pageouts(config)] == ["rolled_back"]
