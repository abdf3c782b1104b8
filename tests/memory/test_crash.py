"""Crash safety of paging: the kernel's OS process is SIGKILLed in the middle of a page-out, and a
new kernel resumes the process. The guarantee comes from the kernel: the page-out's `mem.add` is
journaled before it runs and its records have deterministic ids, so running it again on resume
overwrites what had landed; a `mem.add` whose result was journaled is replayed, not run again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from llmos.config import Config
from llmos.cpu.scripted import ScriptedLLM
from llmos.kernel import State
from llmos.memory.embeddings import OnnxEmbeddingFunction
from llmos.memory.store import MemoryStore

sys.path.insert(0, str(Path(__file__).parent))  # `window_programs` must import by one name in every kernel
from window_programs import NAMESPACE, turn_text

TURNS = 80

# The kernel of the child OS process dies at one of two points of the page-out:
# "in-add": inside the mem.add of the archived turns (journaled as called, half of its records
#           written, no result journaled);
# "after-add": in the summary that follows it (the mem.add's result is journaled).
CHILD = textwrap.dedent(
    """
    import asyncio, os, signal, sys
    from llmos import Kernel
    from llmos.config import load_config
    from llmos.cpu.scripted import ScriptedLLM
    from llmos.memory.store import MemoryStore
    from window_programs import chatter

    MODE, TURNS = sys.argv[1], int(sys.argv[2])

    def die(*args):
        os.kill(os.getpid(), signal.SIGKILL)

    class DiesInTheMiddleOfAPageOut:
        '''The memory device: writes half of the archived turns, then the OS process is killed.'''

        def __init__(self, store):
            self.store = store

        def add_many(self, records):
            if any(r.metadata.get("kind") == "turn" for r in records):
                self.store.add_many(records[: len(records) // 2])
                die()
            return self.store.add_many(records)

        def search(self, query, **kw):
            return self.store.search(query, **kw)

        def get(self, id):
            return self.store.get(id)

        def close(self):
            self.store.close()

    async def main():
        config = load_config()
        memory = MemoryStore.open(config)
        if MODE == "in-add":
            memory = DiesInTheMiddleOfAPageOut(memory)
        llm = ScriptedLLM([die], context_length=1024)  # the summary, after the mem.add
        async with Kernel(config, llm=llm, memory=memory) as kernel:
            pid = await kernel.spawn(chatter, args={"turns": TURNS})
            print(pid, flush=True)
            await kernel.wait(pid)
        print("SURVIVED", flush=True)

    asyncio.run(main())
    """
)


@pytest.mark.parametrize("mode", ["in-add", "after-add"])
def test_sigkill_in_a_page_out_then_resume_loses_no_turn_and_archives_none_twice(
    config: Config, embedder: OnnxEmbeddingFunction, mode: str
) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    child = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(TURNS)], capture_output=True, text=True, env=env, timeout=300
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert "SURVIVED" not in child.stdout
    pid = int(child.stdout.split()[0])
    turns = [turn_text(i) for i in range(TURNS)]

    from llmos import Kernel

    llm = ScriptedLLM(["The cargo log covers the early turns."], context_length=1024)
    store = MemoryStore.open(config, embedder=embedder)
    with Kernel(config, llm=llm, memory=store) as kernel:
        # The page-out's mem.add is in the journal; whether it finished decides what happens next.
        before = kernel.log(pid)
        [add_seq] = {e.seq for e in before if e.name == "mem.add"}
        added = [e for e in before if e.name == "mem.add"]
        archived_ids = [r["id"] for r in added[0].data["args"]["records"]]
        assert len(archived_ids) > 40
        landed = store.get_many(archived_ids)
        if mode == "in-add":
            assert [e.kind for e in added] == ["call"]  # called, no result
            assert 0 < len(landed) < len(archived_ids)
        else:
            assert [e.kind for e in added] == ["call", "result"]
            assert len(landed) == len(archived_ids)
            assert [e.name for e in before if e.kind == "call"][-1] == "llm.chat"  # died in the summary
        assert kernel.ps()[0].state == State.INTERRUPTED

        resumed_at = time.time()
        kernel.resume(pid)
        info = kernel.wait(pid, timeout_s=120)
        assert info.state == State.DONE, info.error
        result = info.result
        after = kernel.log(pid)
    store.close()  # the resumed process may not have needed it (a replayed mem.add): then it is still open

    paged_out = result["paged_out"]
    assert paged_out == len(archived_ids)
    assert result["kept"] == turns[paged_out:]  # the window goes on with the rest ...
    assert result["recap"] == "The cargo log covers the early turns."  # ... and the summary it missed
    with MemoryStore.open(config, embedder=embedder) as again:
        records = again.get_many(archived_ids)
        assert [r.text for r in records] == turns[:paged_out]  # every paged-out turn is archived
        assert again.count(NAMESPACE) == paged_out  # once each
        assert all(r.metadata["kind"] == "turn" and r.provenance.pid == pid for r in records)
    results = [e for e in after if e.name == "mem.add" and e.kind == "result"]
    assert [e.seq for e in results] == [add_seq]  # one mem.add result: it did not run a second time
    if mode == "after-add":
        # Replayed from the journal, not run again: the records are those written before the crash.
        assert all(r.provenance.time < resumed_at for r in records)
        assert len([e for e in after if e.name == "mem.add" and e.kind == "call"]) == 1
    else:
        # Run again on resume, over the half that had landed (same ids: upserted, not duplicated).
        assert len([e for e in after if e.name == "mem.add" and e.kind == "call"]) == 2
        assert all(r.provenance.time >= resumed_at for r in records)
