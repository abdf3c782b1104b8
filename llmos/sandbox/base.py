"""The sandbox device: protocol, result model, and the host side of the in-sandbox worker.

Every backend runs the same worker (worker.py) as a long-lived interpreter per session and talks
to it over length-prefixed JSON on its stdin/stdout. `WorkerSession` is that host side; a
backend only says how to start the worker (`spawn`) and how to make sure everything it started
is gone (`teardown`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import struct
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from llmos.config import SandboxLimits
from llmos.kernel.devices import ExecResult
from llmos.kernel.workspace import count_disk_use, disk_use

if TYPE_CHECKING:
    from llmos.config import Config

Limits = SandboxLimits

WORKER_PATH = Path(__file__).with_name("worker.py")
HEADER = struct.Struct(">I")
START_TIMEOUT_S = 30.0
SESSION_CPU_CALLS = 200
# How often a running call's workspace is measured: page-cache writes reach ~3 GB/s here, so
# every 10 ms while a measurement is cheap; a workspace of many files is measured less often.
QUOTA_POLL_S = 0.01
QUOTA_POLL_SHARE = 0.05  # at most this share of one core spent measuring
_MB = 1024 * 1024
_SESSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class SandboxUnavailable(Exception):
    """No sandbox backend can run here; the message says why and what to do."""


class SandboxError(Exception):
    """A caller mistake (e.g. a bad session name); the message says what to do."""


def check_session_name(session: str) -> str:
    if not _SESSION_RE.match(session):
        raise SandboxError(
            f"Bad sandbox session name {session!r}: use 1-64 letters, digits, '.', '_' or '-'."
        )
    return session


def worker_source() -> str:
    return WORKER_PATH.read_text()


def worker_args(
    workspace: str, limits: Limits, *, uid: int | None = None, nproc: int | None = None
) -> list[str]:
    """Arguments after `python3 -I -c <worker_source()>`; the session-wide hard limits."""
    args = [
        "--workspace",
        workspace,
        # Per-call CPU is the soft limit, moved each call. The hard limit is a session's whole
        # budget (SESSION_CPU_CALLS calls' worth): code that raises its own soft limit still meets
        # the wall-clock timeout, and a long-lived notebook is not killed for its history.
        "--cpu-s",
        str(int(limits.cpu_s * SESSION_CPU_CALLS) + 1),
        "--memory-mb",
        str(limits.memory_mb),
        "--file-size-mb",
        str(limits.file_size_mb),
        "--nproc",
        str(nproc if nproc is not None else limits.pids),
    ]
    if uid is not None:
        args += ["--uid", str(uid), "--gid", str(uid)]
    return args


def max_reply_bytes(limits: Limits) -> int:
    # stdout, stderr, value and error are each cut at output_bytes; JSON escaping can grow text ~6x.
    return 4 * 6 * limits.output_bytes + 65536


Spawn = Callable[[Limits], Awaitable[asyncio.subprocess.Process]]
Teardown = Callable[[], Awaitable[None]]


class WorkerSession:
    """Host side of one warm worker: requests, timeouts, restarts.

    `spawn(limits)` starts the worker with stdin/stdout (and stderr) as pipes; `teardown()` must
    kill whatever the worker left behind (a pid namespace, a cgroup, a container). The session
    restarts lazily: a timed-out or dead worker is torn down at once and the next call starts a
    fresh one.
    """

    def __init__(
        self,
        spawn: Spawn,
        teardown: Teardown | None = None,
        *,
        backend: str,
        sandboxed: bool,
        max_calls: int | None = None,
        notice: str | None = None,
        peak_memory: Callable[[], float | None] | None = None,
        reset_peak_memory: Callable[[], None] | None = None,
    ) -> None:
        self._spawn = spawn
        self._teardown = teardown
        self.backend = backend
        self.sandboxed = sandboxed
        self.max_calls = max_calls
        self.notice = notice  # a line prepended to stderr of every result (subprocess: "unsandboxed")
        self._peak_memory = peak_memory
        self._reset_peak_memory = reset_peak_memory
        self._proc: asyncio.subprocess.Process | None = None
        self._limits: Limits | None = None
        self._lock = asyncio.Lock()
        self.calls = 0
        self.starts = 0
        self.last_used = time.monotonic()
        self.cold_start_s: float | None = None
        # Set when the worker was stopped between calls (idle): the next result says `restarted`.
        self.state_lost = False

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def start(self, limits: Limits) -> None:
        """Start the worker now (a warm pool calls this ahead of the first request)."""
        async with self._lock:
            await self._ensure(limits)

    async def request(self, code: str, limits: Limits, workspace: Path | None = None) -> ExecResult:
        """Run `code`. With a `workspace`, its disk use is capped at `limits.workspace_mb`.

        No backend here has per-directory quotas, so the cap is enforced from outside: the
        workspace is measured before the call, every QUOTA_POLL_S while it runs (a call that grows
        it past the cap is stopped), and after it. Writes between two checks can overshoot the cap;
        a workspace over the cap may shrink but not grow.
        """
        async with self._lock:
            self.last_used = time.monotonic()
            restarted, self.state_lost = self.state_lost, False
            if self._proc is not None and not self._fits(limits):
                # The running worker's hard limits are looser or tighter than asked: start over
                # (state is lost only if it has run code; a warm pool worker has not).
                restarted = restarted or self.calls > 0
                await self._stop()
            if self.max_calls is not None and self.calls >= self.max_calls:
                await self._stop()
                restarted = True
            await self._ensure(limits)  # SandboxUnavailable if it cannot start: a host problem
            allowance = None
            if workspace is not None:
                allowance = max(limits.workspace_mb * _MB, await workspace_use(workspace))
            result = await self._call(code, limits, workspace, allowance)
            if workspace is not None and allowance is not None:
                size = await workspace_use(workspace, stop_above=allowance)
                if size > allowance and result.error is None:  # grew between two checks
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

    def _fits(self, limits: Limits) -> bool:
        return self._limits is not None and limits_fit(self._limits, limits)

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
            ready = await asyncio.wait_for(self._read(proc, 65536), START_TIMEOUT_S)
        except (TimeoutError, _ProtocolError) as exc:
            detail = await self._stderr_of(proc)
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

    async def _call(
        self, code: str, limits: Limits, workspace: Path | None, allowance: int | None
    ) -> ExecResult:
        proc = self._proc
        assert proc is not None and proc.stdin is not None
        self.calls += 1
        if self._reset_peak_memory is not None:
            self._reset_peak_memory()
        started = time.perf_counter()
        body = json.dumps({"code": code, "limits": limits.model_dump()}).encode()
        reply_task = asyncio.ensure_future(self._send_and_read(proc, body, max_reply_bytes(limits)))
        exit_task = asyncio.ensure_future(proc.wait())
        tasks: set[asyncio.Future[Any]] = {reply_task, exit_task}
        quota_task = None
        if workspace is not None and allowance is not None:
            quota_task = asyncio.ensure_future(wait_until_outgrown(workspace, allowance))
            tasks.add(quota_task)
        done, _ = await asyncio.wait(tasks, timeout=limits.wall_time_s, return_when=asyncio.FIRST_COMPLETED)
        wall = time.perf_counter() - started
        if quota_task is not None:
            quota_task.cancel()
        if reply_task in done and reply_task.exception() is None:
            exit_task.cancel()
            reply = reply_task.result()
            result = self._result(reply, wall)
            if self._peak_memory is not None:
                result.memory_peak_mb = self._peak_memory() or result.memory_peak_mb
            return result
        # Timed out, outgrew its workspace, died, or sent garbage: kill the session (its variables are lost).
        timed_out = not done
        outgrown = quota_task is not None and quota_task in done and quota_task.exception() is None
        garbage = reply_task.exception() if reply_task.done() else None
        peak = self._peak_memory() if self._peak_memory is not None else None
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
        elif outgrown and workspace is not None:
            size = await workspace_use(workspace)
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

    async def _send_and_read(
        self, proc: asyncio.subprocess.Process, body: bytes, limit: int
    ) -> dict[str, Any]:
        assert proc.stdin is not None
        proc.stdin.write(HEADER.pack(len(body)) + body)
        await proc.stdin.drain()
        return await self._read(proc, limit)

    @staticmethod
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

    @staticmethod
    async def _stderr_of(proc: asyncio.subprocess.Process) -> str:
        if proc.stderr is None:
            return ""
        with contextlib.suppress(TimeoutError, OSError):
            if proc.returncode is None:
                await asyncio.wait_for(proc.wait(), 2.0)
            data = await asyncio.wait_for(proc.stderr.read(4096), 1.0)
            return data.decode(errors="replace").strip()
        return ""

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
        if self._teardown is not None:
            await self._teardown()


class _ProtocolError(Exception):
    pass


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


def limits_fit(running: Limits, wanted: Limits) -> bool:
    """Whether a worker started with `running` limits may serve a call that asks for `wanted`:
    the limits fixed at start must match, and its CPU limit must not be smaller."""
    fixed = (running.memory_mb, running.pids, running.file_size_mb)
    return fixed == (wanted.memory_mb, wanted.pids, wanted.file_size_mb) and wanted.cpu_s <= running.cpu_s


def limits_for(config: Config, limits: Limits | None) -> Limits:
    return limits if limits is not None else config.sandbox.limits


def adopt_spare(spare: Path, workspace: Path) -> None:
    """Give a warm worker's spare directory the workspace's name, keeping the files already there.

    A running worker has the spare mounted, and a mount follows the directory, not its name. Every
    rename stays within $LLMOS_HOME, so on one file system.
    """
    if workspace.exists():
        for entry in workspace.iterdir():
            entry.rename(spare / entry.name)
        workspace.rmdir()
    workspace.parent.mkdir(parents=True, exist_ok=True)
    spare.rename(workspace)


async def workspace_use(path: Path, stop_above: int | None = None) -> int:
    # A few hundred entries are measured in well under a millisecond, here; more on a thread, so
    # the event loop never waits for a workspace of many files.
    size = count_disk_use(path, stop_above, max_entries=256)
    return size if size is not None else await asyncio.to_thread(disk_use, path, stop_above)


async def wait_until_outgrown(path: Path, allowance: int) -> None:
    """Return once the workspace at `path` uses more than `allowance` bytes."""
    took = 0.0
    while True:
        await asyncio.sleep(max(QUOTA_POLL_S, took / QUOTA_POLL_SHARE))
        started = time.perf_counter()
        if await workspace_use(path, stop_above=allowance) > allowance:
            return
        took = time.perf_counter() - started


def over_quota_error(size: int, limits: Limits) -> str:
    return (
        f"The workspace grew to {size / _MB:.0f} MB, past its limit of {limits.workspace_mb} MB "
        "(sandbox.limits.workspace_mb); delete files that are not needed: while it is over the "
        "limit, code may remove files but not add any."
    )


class SessionPool:
    """Sessions by name for one backend: create on first use, recycle when idle too long."""

    def __init__(self, config: Config, make: Callable[[str], WorkerSession]) -> None:
        self._config = config
        self._make = make
        self.sessions: dict[str, WorkerSession] = {}

    def get(self, session: str) -> WorkerSession:
        check_session_name(session)
        existing = self.sessions.get(session)
        if existing is None:
            existing = self.sessions[session] = self._make(session)
        return existing

    async def reap_idle(self) -> None:
        idle = self._config.sandbox.idle_timeout_s
        now = time.monotonic()
        for session in list(self.sessions.values()):
            if session.running and now - session.last_used > idle:
                # Free the worker but keep the session (and its workspace): the next call starts
                # a fresh interpreter and its result says the variables were lost.
                await session.close()
                session.state_lost = True

    async def close(self, session: str) -> None:
        existing = self.sessions.pop(session, None)
        if existing is not None:
            await existing.close()

    async def close_all(self) -> None:
        for name in list(self.sessions):
            await self.close(name)


class WorkerSandbox:
    """Shared frame of the worker backends: one warm worker per session, working in the process's
    workspace.

    A session's workspace is `$LLMOS_HOME/workspaces/<session>`, the directory the kernel gives
    the file tools for the process of that pid, so both see the same files. It belongs to the
    process, not to the sandbox: closing a session or the sandbox leaves it in place. Warm
    workers wait with a spare directory under `spares/` that becomes the workspace of the
    session that takes them.

    A backend subclass sets `name` and `sandboxed` and implements `_new_session(session)`.
    """

    name: str = "worker"
    sandboxed: bool = True

    def __init__(self, config: Config) -> None:
        self.config = config
        self.root = config.home / "sandbox" / self.name
        self.spares = self.root / "spares"
        self._pool = SessionPool(config, self._new_session)

    def _new_session(self, session: str) -> WorkerSession:
        raise NotImplementedError

    async def warm_up(self) -> None:
        """Start the workers of a warm pool now, so the first session is warm (backends with one)."""

    def workspace(self, session: str) -> Path:
        path = self.config.workspace(check_session_name(session))
        if path.is_symlink():  # preparing it would change the owner of whatever it points to
            raise SandboxError(f"The workspace {path} is a symbolic link; remove it, it must be a folder.")
        path.mkdir(parents=True, exist_ok=True)
        self._prepare_workspace(path)  # also when the kernel made it, for the file tools
        return path

    def _prepare_workspace(self, path: Path) -> None:
        """Hook: e.g. hand the directory to the sandbox uid."""

    def _new_spare(self, prefix: str) -> Path:
        """An empty directory for a warm worker, until `adopt_spare` makes it a session's workspace."""
        self.spares.mkdir(parents=True, exist_ok=True)
        spare = Path(tempfile.mkdtemp(prefix=f".warm-{prefix}-", dir=self.spares))
        self._prepare_workspace(spare)
        return spare

    async def exec(self, session: str, code: str, limits: Limits | None = None) -> ExecResult:
        worker = self._pool.get(session)
        workspace = self.workspace(session)
        await self._pool.reap_idle()
        return await worker.request(code, limits_for(self.config, limits), workspace)

    @property
    def running_sessions(self) -> list[str]:
        """The sessions whose worker is running now."""
        return [name for name, worker in self._pool.sessions.items() if worker.running]

    def session(self, session: str) -> WorkerSession:
        """The host side of a session's worker (stats: cold_start_s, starts, calls, pid)."""
        return self._pool.get(session)

    async def close_session(self, session: str) -> None:
        """Stop the session's worker and everything it started; its workspace stays."""
        await self._pool.close(check_session_name(session))

    async def aclose(self) -> None:
        for session in list(self._pool.sessions):
            await self.close_session(session)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def open_sandbox(config: Config) -> WorkerSandbox:
    """The configured backend; "auto" is docker, else namespace, else a SandboxUnavailable saying why."""
    backend = config.sandbox.backend
    if backend == "subprocess":
        from llmos.sandbox.subprocess import SubprocessSandbox

        return SubprocessSandbox(config)
    if backend == "namespace":
        from llmos.sandbox.namespace import NamespaceSandbox, namespace_available

        reason = namespace_available(config)
        if reason is not None:
            raise SandboxUnavailable(f"The namespace sandbox cannot run: {reason}.")
        return NamespaceSandbox(config)
    if backend == "docker":
        docker_reason = _docker_reason(config)
        if docker_reason is not None:
            raise SandboxUnavailable(f"The docker sandbox cannot run: {docker_reason}.")
        return _docker_sandbox(config)
    # auto
    docker_reason = _docker_reason(config)
    if docker_reason is None:
        return _docker_sandbox(config)
    from llmos.sandbox.namespace import NamespaceSandbox, namespace_available

    ns_reason = namespace_available(config)
    if ns_reason is None:
        return NamespaceSandbox(config)
    raise SandboxUnavailable(
        f"No sandbox can run here: docker: {docker_reason}; namespace: {ns_reason}. "
        'Fix one of them (see `llmos sandbox doctor`), or set sandbox.backend = "subprocess" '
        "to run code unsandboxed on purpose."
    )


def _docker_sandbox(config: Config) -> WorkerSandbox:
    # Imported lazily: the docker backend (and its client library) is optional.
    from llmos.sandbox.docker import DockerSandbox

    return DockerSandbox(config)


def _docker_reason(config: Config) -> str | None:
    try:
        from llmos.sandbox.docker import docker_available
    except ImportError as exc:
        return f"the docker backend is not installed ({exc}); `pip install llmos[docker]`"
    reason: str | None = docker_available(config)
    return reason
