"""Scale-out: agents in several OS processes, each with its own llmos kernel, over AutoGen's gRPC runtime.

A host (`GrpcWorkerAgentRuntimeHost`) routes messages between worker runtimes on 127.0.0.1.
Each worker is an OS process (`python -m llmos.agents.scaleout worker ...`) that boots its own
kernel (its own LLMOS_HOME and journal) and serves one AutoGen agent type: a `Job` becomes an
llmos process whose model call is a journaled syscall, and the answer is written to shared
memory on a Chroma server, with the worker's pid as provenance. A coordinator sends jobs with
`dispatch`, which fails with `WorkerDied` at once if the worker's OS process exits first
(the gRPC host drops requests to a worker that disconnects; it never answers them).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import autogen_ext.runtimes.grpc  # noqa: F401  # only to fail with the fix in the message
except ImportError as exc:
    raise ImportError("AutoGen is not installed; install it with: pip install 'llmos[autogen]'") from exc
from autogen_core import (
    AgentId,
    MessageContext,
    RoutedAgent,
    message_handler,
    try_get_known_serializers_for_type,
)
from autogen_ext.runtimes.grpc import GrpcWorkerAgentRuntime, GrpcWorkerAgentRuntimeHost
from pydantic import BaseModel, Field

from llmos.kernel.process import Process

# Loopback only: a proxy from the environment must never see these connections.
GRPC_OPTIONS: list[tuple[str, Any]] = [("grpc.enable_http_proxy", 0)]
READY = "ready"
ANSWER_PROGRAM = "llmos.agents.scaleout:answer"
WORKER_START_TIMEOUT_S = 180.0


class Job(BaseModel):
    id: str
    prompt: str
    max_tokens: int = Field(64, ge=1)


class JobDone(BaseModel):
    id: str
    worker: str
    answer: str
    pid: int = Field(description="the llmos process that answered, in the worker's kernel")
    tokens: int = Field(description="tokens the worker's journal charged to that process")
    memory_id: str = Field(description="the record id of the answer in shared memory")


MESSAGE_TYPES: tuple[type[BaseModel], ...] = (Job, JobDone)


class ScaleOutError(Exception):
    """A scale-out setup problem a user has to fix; one sentence with the fix."""


class WorkerDied(ScaleOutError):
    """A worker's OS process exited before it answered a job."""


def add_serializers(runtime: GrpcWorkerAgentRuntime) -> None:
    for message_type in MESSAGE_TYPES:
        runtime.add_message_serializer(try_get_known_serializers_for_type(message_type))


async def answer(proc: Process, prompt: str, max_tokens: int) -> str:
    """The llmos program a worker runs per job: one model call, as a syscall of this process."""
    reply = await proc.syscall(
        "llm.chat", messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens
    )
    return str(reply.unwrap().text)


# --- the worker side ----------------------------------------------------------------------------


class JobAgent(RoutedAgent):
    """Answers a `Job` with an llmos process in this worker's kernel, and remembers the answer."""

    def __init__(self, worker: str, kernel: Any, store: Any) -> None:
        super().__init__(f"llmos worker {worker}")
        self._worker = worker
        self._kernel = kernel
        self._store = store

    @message_handler
    async def on_job(self, message: Job, ctx: MessageContext) -> JobDone:
        print(f"started {message.id}", flush=True)  # the coordinator's log, and a test's cue
        info = await self._kernel.run(
            ANSWER_PROGRAM,
            name=f"job-{message.id}",
            args={"prompt": message.prompt, "max_tokens": message.max_tokens},
        )
        if info.error is not None:
            raise RuntimeError(f"job {message.id} failed in worker {self._worker}: {info.error}")
        memory_id = await asyncio.to_thread(
            self._store.add,
            info.result,
            namespace="shared",
            source=f"scaleout:{self._worker}",
            trust="model",
            pid=info.pid,
            metadata={"job": message.id, "worker": self._worker},
        )
        print(f"done {message.id}", flush=True)
        return JobDone(
            id=message.id,
            worker=self._worker,
            answer=info.result,
            pid=info.pid,
            tokens=info.usage.tokens,
            memory_id=memory_id,
        )


async def serve_worker(name: str, host_address: str) -> None:
    """Run one worker until SIGTERM/SIGINT: its kernel and memory come from the config
    (LLMOS_HOME, LLMOS_LLM__MODEL, LLMOS_MEMORY__CHROMA_URL)."""
    from llmos.boot import Kernel
    from llmos.config import load_config
    from llmos.memory.store import MemoryStore

    config = load_config()
    if not config.memory.chroma_url:
        raise ScaleOutError("A worker shares memory through a Chroma server: set LLMOS_MEMORY__CHROMA_URL.")
    store = await asyncio.to_thread(MemoryStore.open, config)
    try:
        async with Kernel(config) as kernel:
            await kernel.llm(None)  # load the model before saying ready
            runtime = GrpcWorkerAgentRuntime(host_address, extra_grpc_config=GRPC_OPTIONS)
            add_serializers(runtime)
            await runtime.start()
            await JobAgent.register(runtime, name, lambda: JobAgent(name, kernel, store))
            print(READY, flush=True)
            await runtime.stop_when_signal()
    finally:
        store.close()


# --- the coordinator side ---------------------------------------------------------------------------


@dataclass
class WorkerHandle:
    """A worker OS process started by `start_worker`; `log` collects its stdout lines."""

    name: str
    process: asyncio.subprocess.Process
    log: list[str] = field(default_factory=list)
    _reader: asyncio.Task[None] | None = None
    _line: asyncio.Event = field(default_factory=asyncio.Event)

    async def wait_for_line(self, text: str, timeout_s: float) -> None:
        async def seen() -> None:
            while text not in self.log:
                if self.process.returncode is not None:
                    raise WorkerDied(
                        f"Worker {self.name!r} exited ({self.process.returncode}) before {text!r}."
                    )
                self._line.clear()
                await self._line.wait()

        await asyncio.wait_for(seen(), timeout_s)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not go within 10 s."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), 10)
            except TimeoutError:
                self.kill()
                await self.process.wait()
        if self._reader is not None:
            await self._reader


async def start_worker(
    name: str, host_address: str, *, home: Path, model: str, chroma_url: str, python: str = sys.executable
) -> WorkerHandle:
    """Start a worker OS process serving agent type `name` and wait until it is ready."""
    env = {
        **os.environ,
        "LLMOS_HOME": str(home),
        "LLMOS_LLM__MODEL": model,
        "LLMOS_MEMORY__CHROMA_URL": chroma_url,
    }
    process = await asyncio.create_subprocess_exec(
        python, "-m", __name__, "worker", "--name", name, "--host-address", host_address,
        env=env, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    handle = WorkerHandle(name, process)

    async def read() -> None:
        assert process.stdout is not None
        async for line in process.stdout:
            handle.log.append(line.decode().strip())
            handle._line.set()
        await process.wait()
        handle._line.set()

    handle._reader = asyncio.create_task(read())
    try:
        await handle.wait_for_line(READY, WORKER_START_TIMEOUT_S)
    except BaseException:
        await handle.stop()
        raise
    return handle


def start_host(address: str) -> GrpcWorkerAgentRuntimeHost:
    host = GrpcWorkerAgentRuntimeHost(address, extra_grpc_config=GRPC_OPTIONS)
    host.start()
    return host


async def connect(host_address: str) -> GrpcWorkerAgentRuntime:
    """A coordinator runtime: it sends jobs to workers through the host."""
    runtime = GrpcWorkerAgentRuntime(host_address, extra_grpc_config=GRPC_OPTIONS)
    add_serializers(runtime)
    await runtime.start()
    return runtime


async def dispatch(runtime: GrpcWorkerAgentRuntime, worker: WorkerHandle, job: Job) -> JobDone:
    """Send `job` to `worker` and return its answer; `WorkerDied` if its OS process exits first."""
    reply = asyncio.ensure_future(runtime.send_message(job, AgentId(worker.name, "default")))
    exited = asyncio.ensure_future(worker.process.wait())
    try:
        await asyncio.wait({reply, exited}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        exited.cancel()
        if not reply.done():
            reply.cancel()
    if not reply.done() or reply.cancelled():
        raise WorkerDied(
            f"Worker {worker.name!r} (OS pid {worker.process.pid}) exited with code "
            f"{worker.process.returncode} before answering job {job.id!r}; send the job to another worker."
        )
    result = reply.result()
    if not isinstance(result, JobDone):
        raise ScaleOutError(f"Worker {worker.name!r} answered job {job.id!r} with {type(result).__name__}.")
    return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llmos.agents.scaleout")
    commands = parser.add_subparsers(dest="command", required=True)
    worker = commands.add_parser("worker", help="serve one agent type with this machine's kernel")
    worker.add_argument("--name", required=True, help="the AutoGen agent type it serves")
    worker.add_argument("--host-address", required=True, help="127.0.0.1:PORT of the gRPC host")
    options = parser.parse_args(argv)
    asyncio.run(serve_worker(options.name, options.host_address))


if __name__ == "__main__":
    # Through the package's own module, not __main__: message type names and the program
    # reference ("llmos.agents.scaleout:answer") must be the same in every process.
    from llmos.agents.scaleout import main as package_main

    package_main()
