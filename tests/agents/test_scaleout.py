"""Scale-out for real: a gRPC host, two worker OS processes (each its own kernel, LLMOS_HOME and
smollm2) and a Chroma server, all on 127.0.0.1. Killing one worker mid-job is a clear error
while the other finishes."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from loopback import chroma_server, free_port

from llmos.agents.scaleout import Job, WorkerDied, connect, dispatch, start_host, start_worker
from llmos.config import load_config
from llmos.kernel.journal import Journal
from llmos.memory.store import MemoryStore

pytestmark = pytest.mark.slow


@pytest.fixture
def chroma_url(tmp_path: Path) -> Iterator[str]:
    with chroma_server(tmp_path / "chroma") as url:
        yield url


async def test_two_workers_one_killed_mid_job(tmp_path: Path, chroma_url: str, small_model: str) -> None:
    address = f"127.0.0.1:{free_port()}"
    host = start_host(address)
    workers = []
    coordinator = None
    try:
        started = await asyncio.gather(
            *(
                start_worker(name, address, home=tmp_path / name, model=small_model, chroma_url=chroma_url)
                for name in ("worker_a", "worker_b")
            ),
            return_exceptions=True,
        )
        workers = [w for w in started if not isinstance(w, BaseException)]
        for failure in started:
            if isinstance(failure, BaseException):
                raise failure
        worker_a, worker_b = workers
        coordinator = await connect(address)
        short = Job(id="a1", prompt="Name one colour.", max_tokens=8)
        long = Job(id="b1", prompt="Write a long story about a robot.", max_tokens=512)
        job_a = asyncio.ensure_future(dispatch(coordinator, worker_a, short))
        job_b = asyncio.ensure_future(dispatch(coordinator, worker_b, long))
        await worker_b.wait_for_line("started b1", 120)
        worker_b.kill()  # mid-job: its model call is in flight

        with pytest.raises(WorkerDied, match=r"Worker 'worker_b' .* before answering job 'b1'"):
            await asyncio.wait_for(job_b, 60)
        done = await asyncio.wait_for(job_a, 180)
        assert done.worker == "worker_a" and done.answer.strip()

        # Worker a's own kernel charged and journaled the call; the answer is in shared memory.
        journal = Journal(tmp_path / "worker_a" / "journal.sqlite3")
        try:
            usage = journal.usage_by_pid([done.pid])[done.pid]
            assert usage.tokens == done.tokens > 0
            assert [e.name for e in journal.events(done.pid, kinds=("result",))] == ["llm.chat"]
        finally:
            journal.close()
        reader = {"LLMOS_HOME": str(tmp_path / "reader"), "LLMOS_MEMORY__CHROMA_URL": chroma_url}
        with MemoryStore.open(load_config(env=reader)) as store:
            record = store.get(done.memory_id)
        assert record is not None and record.text == done.answer
        assert record.provenance.pid == done.pid and record.metadata["worker"] == "worker_a"
    finally:
        if coordinator is not None:
            await coordinator.stop()
        for worker in workers:
            await worker.stop()
        await host.stop(grace=1)
