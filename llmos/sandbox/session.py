"""The host side of one worker: its requests, time-outs and restarts.

The worker is a long-lived interpreter (worker.py) that the host talks to over length-prefixed JSON
on its stdin/stdout: one ready message when it starts, then one reply per request. A backend
subclasses `WorkerSession` to say how to start the worker in a directory (`_spawn`) and how to make
sure everything it started is gone (`_teardown`); the rest is the same for every backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import struct
import time
from pathlib import Path
from typing import Any

from llmos.kernel.devices import ExecResult
from llmos.sandbox.base import Limits, SandboxUnavailable, limits_fit
from llmos.sandbox.quota import allowance, over_quota_error, wait_until_outgrown, workspace_use

HEADER = struct.Struct(">I")
START_TIMEOUT_S = 30.0


def max_reply_bytes(limits: Limits) -> int:
    # stdout, stderr, value and error are each cut at output_bytes; JSON escaping can grow text ~6x.
    return 4 * 6 * limits.output_bytes + 65536


class WorkerSession:
    """Host side of one worker working in `workspace`: requests, time-outs, restarts.

    A subclass implements `_spawn(limits)`, which starts the worker in `self.workspace` with
    stdin/stdout (and stderr) as pipes, and `_teardown()`, which kills whatever the worker left
    behind (a pid namespace, a cgroup, a container). The session restarts lazily: a timed-out or
    dead worker is torn down at once and the next call starts a fresh one, in the same directory.
    """

    backend: str = "worker"
    sandboxed: bool = True
    notice: str | None = None  # a line prepended to stderr of every result (subprocess: "unsandboxed")

    def __init__(self, workspace: Path, *, max_calls: int | None = None) -> None:
        # The directory the worker works in. A warm worker's spare directory is renamed to the
        # workspace of the session that takes it (pool.adopt_spare), and this follows.
        self.workspace = workspace
        self.max_calls = max_calls
        self._proc: asyncio.subprocess.Process | None = None
        self._limits: Limits | None = None
        self._lock = asyncio.Lock()
        self.calls = 0
        self.starts = 0
        self.last_used = time.monotonic()
        self.cold_start_s: float | None = None
        # Set when the worker was stopped between calls (idle): the next result says `restarted`.
        self.state_lost = False

    # -- what a backend says -------------------------------------------------------------------

    async def _spawn(self, limits: Limits) -> asyncio.subprocess.Process:
        raise NotImplementedError

    async def _teardown(self) -> None:
        """Kill what the worker left behind; also called when nothing was started."""

    def _peak_memory(self) -> float | None:
        """The worker's memory peak in MB, when the backend measures it better than the worker."""
        return None

    def _reset_peak_memory(self) -> None:
        """Start `_peak_memory` over, before each call (backends whose counter resets cheaply)."""

    # -- the session ---------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def fits(self, limits: Limits) -> bool:
        """Whether the running worker may serve a call with `limits` (see base.limits_fit)."""
        return self._limits is not None and limits_fit(self._limits, limits)

    async def start(self, limits: Limits) -> None:
        """Start the worker now (a warm pool calls this ahead of the first request)."""
        async with self._lock:
            await self._ensure(limits)

    async def request(self, code: str, limits: Limits) -> ExecResult:
        """Run `code`, with the workspace's disk use capped at `limits.workspace_mb` (see quota.py)."""
        async with self._lock:
            self.last_used = time.monotonic()
            restarted, self.state_lost = self.state_lost, False
            if self._proc is not None and not self.fits(limits):
                # The running worker's hard limits are looser or tighter than asked: start over
                # (state is lost only if it has run code; a warm pool worker has not).
                restarted = restarted or self.calls > 0
                await self._stop()
            if self.max_calls is not None and self.calls >= self.max_calls:
                await self._stop()
                restarted = True
            await self._ensure(limits)  # SandboxUnavailable if it cannot start: a host problem
            allowed = await allowance(self.workspace, limits)
            result = await self._call(code, limits, allowed)
            size = await workspace_use(self.workspace, stop_above=allowed)
            if size > allowed and result.error is None:  # grew between two checks
                result.error = over_quota_error(size, limits)
            if restarted:
                result.restarted = True
            if self.notice:
                result.stderr = f"{self.notice}\n{result.stderr}"
            self.last_used = time.monotonic()
            return result

    async def close(self) -> None:
        async with self._lock:
            await self._stop()

    async def _ensure(self, limits: Limits) -> None:
        if self._proc is not None and self._proc.returncode is None:
            return
        if self._proc is not None:
            await self._stop()
        started = time.perf_counter()
        proc = await self._spawn(limits)
        self._proc = proc
        self._limits = limits
        self.calls = 0
        try:
            ready = await asyncio.wait_for(_read(proc, 65536), START_TIMEOUT_S)
        except (TimeoutError, _ProtocolError) as exc:
            detail = await _stderr_of(proc)
            await self._stop()
            raise SandboxUnavailable(
                f"The {self.backend} sandbox worker did not start ({exc or 'timeout'}): "
                f"{detail or 'no output'}; run `llmos sandbox doctor`."
            ) from None
        if not ready.get("ready"):
            await self._stop()
            raise SandboxUnavailable(
                f"The {self.backend} sandbox worker sent {ready!r}; run `llmos sandbox doctor`."
            )
        self.starts += 1
        self.cold_start_s = time.perf_counter() - started

    async def _call(self, code: str, limits: Limits, allowed: int) -> ExecResult:
        proc = self._proc
        assert proc is not None and proc.stdin is not None
        self.calls += 1
        self._reset_peak_memory()
        started = time.perf_counter()
        body = json.dumps({"code": code, "limits": limits.model_dump()}).encode()
        reply_task = asyncio.ensure_future(_send_and_read(proc, body, max_reply_bytes(limits)))
        exit_task = asyncio.ensure_future(proc.wait())
        quota_task = asyncio.ensure_future(wait_until_outgrown(self.workspace, allowed))
        tasks: set[asyncio.Future[Any]] = {reply_task, exit_task, quota_task}
        done, _ = await asyncio.wait(tasks, timeout=limits.wall_time_s, return_when=asyncio.FIRST_COMPLETED)
        wall = time.perf_counter() - started
        quota_task.cancel()
        if reply_task in done and reply_task.exception() is None:
            exit_task.cancel()
            result = self._result(reply_task.result(), wall)
            result.memory_peak_mb = self._peak_memory() or result.memory_peak_mb
            return result
        # Timed out, outgrew its workspace, died, or sent garbage: kill the session (its variables are lost).
        timed_out = not done
        outgrown = quota_task in done and quota_task.exception() is None
        garbage = reply_task.exception() if reply_task.done() else None
        peak = self._peak_memory()
        reply_task.cancel()
        # A dead worker may have left children holding the pipes: give the exit status a moment.
        if not timed_out and not outgrown and not exit_task.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(exit_task), 1.0)
        exit_task.cancel()
        returncode = proc.returncode
        await self._stop()
        if timed_out:
            error = f"Timed out after {limits.wall_time_s:g} s of wall time; the session was restarted."
            status = -int(signal.SIGKILL)
        elif outgrown:
            size = await workspace_use(self.workspace)
            error = f"{over_quota_error(size, limits)} The session was restarted."
            status = -int(signal.SIGKILL)
        elif garbage is not None and returncode is None:
            error = f"The worker sent a malformed reply ({garbage}); the session was restarted."
            status = -1
        else:
            status = returncode if returncode is not None else -1
            error = f"The worker died ({_describe_exit(status)}); the session was restarted."
        return ExecResult(
            error=error,
            exit_status=status,
            timed_out=timed_out,
            wall_s=wall,
            cpu_s=0.0,
            memory_peak_mb=peak,
            backend=self.backend,
            sandboxed=self.sandboxed,
            restarted=True,
        )

    def _result(self, reply: dict[str, Any], wall: float) -> ExecResult:
        try:
            return ExecResult(
                stdout=str(reply.get("stdout", "")),
                stderr=str(reply.get("stderr", "")),
                value=None if reply.get("value") is None else str(reply["value"]),
                files=[str(f) for f in reply.get("files", [])],
                exit_status=int(reply.get("exit_status", 0)),
                error=None if reply.get("error") is None else str(reply["error"]),
                cpu_s=float(reply.get("cpu_s", 0.0)),
                wall_s=wall,
                memory_peak_mb=_optional_float(reply.get("memory_peak_mb")),
                truncated=bool(reply.get("truncated", False)),
                backend=self.backend,
                sandboxed=self.sandboxed,
            )
        except (TypeError, ValueError) as exc:
            return ExecResult(
                error=f"The worker sent a malformed reply ({exc}).",
                exit_status=-1,
                wall_s=wall,
                backend=self.backend,
                sandboxed=self.sandboxed,
            )

    async def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            if proc.stdin is not None:
                proc.stdin.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 5.0)
        await self._teardown()


class _ProtocolError(Exception):
    pass


async def _send_and_read(proc: asyncio.subprocess.Process, body: bytes, limit: int) -> dict[str, Any]:
    assert proc.stdin is not None
    proc.stdin.write(HEADER.pack(len(body)) + body)
    await proc.stdin.drain()
    return await _read(proc, limit)


async def _read(proc: asyncio.subprocess.Process, limit: int) -> dict[str, Any]:
    assert proc.stdout is not None
    try:
        header = await proc.stdout.readexactly(HEADER.size)
        (size,) = HEADER.unpack(header)
        if size > limit:
            raise _ProtocolError(f"reply of {size} bytes exceeds {limit}")
        body = await proc.stdout.readexactly(size)
        message = json.loads(body)
    except asyncio.IncompleteReadError:
        raise _ProtocolError("the worker closed its output") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise _ProtocolError(f"bad JSON: {exc}") from None
    if not isinstance(message, dict):
        raise _ProtocolError("reply is not an object")
    return message


async def _stderr_of(proc: asyncio.subprocess.Process) -> str:
    if proc.stderr is None:
        return ""
    with contextlib.suppress(TimeoutError, OSError):
        if proc.returncode is None:
            await asyncio.wait_for(proc.wait(), 2.0)
        data = await asyncio.wait_for(proc.stderr.read(4096), 1.0)
        return data.decode(errors="replace").strip()
    return ""


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _describe_exit(status: int) -> str:
    # bwrap and `docker exec` report a child killed by signal N as exit status 128 + N.
    signum = -status if status < 0 else status - 128 if 128 < status < 128 + 65 else 0
    if signum:
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        hints = {
            "SIGKILL": "killed: out of memory or a limit was hit",
            "SIGXCPU": "CPU time limit exceeded",
            "SIGXFSZ": "file size limit exceeded",
        }
        described = f"{name}, {hints[name]}" if name in hints else name
        return described if status < 0 else f"exit status {status}: {described}"
    return f"exit status {status}"
