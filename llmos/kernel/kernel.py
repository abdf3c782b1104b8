"""The kernel: boots devices, owns the process table, and dispatches every syscall.

    async with Kernel() as kernel:          with Kernel() as kernel:
        pid = await kernel.spawn(main)          pid = kernel.spawn(main)
        info = await kernel.wait(pid)           info = kernel.wait(pid)

The plain `with` form runs the same async kernel on a private event-loop thread; it is a thin
facade (`SyncKernel`), not a second implementation. Nothing is global: every kernel has its own
journal, devices and process table, so two kernels in one process never see each other.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import importlib
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Mapping
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self, TypeVar

from pydantic import BaseModel, ValidationError
from pydantic_core import to_jsonable_python

from llmos.config import Config, load_config
from llmos.kernel.devices import (
    Devices,
    LLMBackend,
    Memory,
    Sandbox,
    ToolContext,
    ToolResult,
    Tools,
    UnknownTool,
)
from llmos.kernel.journal import Journal, JournalEvent
from llmos.kernel.mailbox import Mailboxes
from llmos.kernel.policy import Approval, Approvals, decide
from llmos.kernel.process import (
    Budget,
    Charge,
    Cover,
    LiveProcess,
    Process,
    ProcessInfo,
    State,
    budget_owner,
    exhausted,
)
from llmos.kernel.program import ErrorCode, Program, Reply
from llmos.kernel.scheduler import Scheduler
from llmos.kernel.syscalls import TABLE, Action, HandlerError, Outcome, Syscall

log = logging.getLogger("llmos.kernel")
T = TypeVar("T")
UNFINISHED = [State.READY, State.RUNNING, State.WAITING, State.BLOCKED]


class KernelError(Exception):
    """Something the caller asked of the kernel cannot be done; the message says why and what to do."""


class ProcessDiverged(Exception):
    """A resumed program made different syscalls than the journal recorded for it."""


def boot_alive(run_dir: Path, boot_id: str) -> bool:
    """Whether the kernel of `boot_id` still runs: it holds an flock on its lock file until it exits."""
    path = run_dir / f"{boot_id}.lock"
    if not path.exists():
        return False
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def program_ref(program: Program) -> str | None:
    """'module:qualname' if the program can be imported again (to resume it), else None."""
    module, qualname = getattr(program, "__module__", None), getattr(program, "__qualname__", "")
    if not module or "<" in qualname:
        return None
    try:
        return f"{module}:{qualname}" if import_program(f"{module}:{qualname}") is program else None
    except KernelError:
        return None


def import_program(ref: str) -> Program:
    module_name, _, qualname = ref.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise KernelError(f"Program {ref!r} cannot be imported ({exc}); give 'module:function'.") from None
    if not callable(target):
        raise KernelError(f"Program {ref!r} is not a function.")
    return target  # type: ignore[no-any-return]


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return str(value)


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"]) or "arguments"
    return f"{where}: {error['msg']}"


class Kernel:
    """The kernel of its `devices` (llmos.boot builds them from the config: `llmos.Kernel`)."""

    def __init__(
        self,
        config: Config | None = None,
        *,
        devices: Devices,
        secrets: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config or load_config()
        self.devices = devices
        self.secrets = dict(secrets or {})  # injected into tool calls, never shown to a model
        self.scheduler = Scheduler()
        self._closing_sessions: set[asyncio.Task[None]] = set()
        self.listeners: list[Callable[[str, dict[str, Any]], None]] = []
        self._backends: dict[str | None, LLMBackend] = {}
        self._sandbox: Sandbox | None = None
        self._memory: Memory | None = None
        self._device_lock = asyncio.Lock()
        self._live: dict[int, LiveProcess] = {}
        self.mailboxes: Mailboxes
        self.approvals: Approvals
        self._journal: Journal | None = None
        self._lock_file: IO[str] | None = None
        self.boot_id = uuid.uuid4().hex[:12]
        self._portal: tuple[asyncio.AbstractEventLoop, threading.Thread] | None = None

    @property
    def tools(self) -> Tools:
        return self.devices.tools

    # --- boot and shutdown ----------------------------------------------------------------------

    @property
    def journal(self) -> Journal:
        if self._journal is None:
            raise KernelError("The kernel is not booted; use `async with Kernel() as kernel:`.")
        return self._journal

    @property
    def run_dir(self) -> Path:
        return self.config.home / "run"

    async def boot(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._lock_file = (self.run_dir / f"{self.boot_id}.lock").open("w")
        fcntl.flock(self._lock_file, fcntl.LOCK_EX)
        self._journal = Journal(self.config.journal_path, self.config.journal.synchronous)
        self.mailboxes = Mailboxes(self._journal)
        self.approvals = Approvals(self._journal.db)
        self._journal.record_boot(self.boot_id, os.getpid())
        self._find_interrupted()

    def _find_interrupted(self) -> None:
        """Processes whose kernel died while they ran become `interrupted`, ready to resume."""
        dead_boots: set[str] = set()
        for info in self.journal.processes(UNFINISHED, with_usage=False):
            boot_id, run_started_at = self.journal.boot_of(info.pid)
            if boot_id == self.boot_id or boot_alive(self.run_dir, boot_id):
                continue
            dead_boots.add(boot_id)
            last_event = self.journal.last_event_time(info.pid) or run_started_at or time.time()
            ran_for = max(0.0, last_event - (run_started_at or last_event))
            self.journal.set_state(info.pid, State.INTERRUPTED, wall_time_s=info.usage.wall_time_s + ran_for)
        for boot_id in dead_boots:
            (self.run_dir / f"{boot_id}.lock").unlink(missing_ok=True)

    async def shutdown(self) -> None:
        """Stop every live process (they become `interrupted`, resumable), then the devices."""
        for proc in list(self._live.values()):
            if proc.task is not None:
                proc.task.cancel()
        await asyncio.gather(*(p.task for p in list(self._live.values()) if p.task), return_exceptions=True)
        for backend in self._backends.values():
            await backend.aclose()
        if self._sandbox is not None:
            await asyncio.gather(*self._closing_sessions, return_exceptions=True)
            await self._sandbox.aclose()
        if self._memory is not None:
            await asyncio.to_thread(self._memory.close)
            self._memory = None
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        if self._lock_file is not None:
            self._lock_file.close()
            (self.run_dir / f"{self.boot_id}.lock").unlink(missing_ok=True)
            self._lock_file = None

    async def __aenter__(self) -> Self:
        await self.boot()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    def __enter__(self) -> SyncKernel:
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="llmos-kernel", daemon=True)
        thread.start()
        self._portal = (loop, thread)
        sync = SyncKernel(self)
        sync.call(self.boot())
        return sync

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._portal is not None
        loop, thread = self._portal
        try:
            asyncio.run_coroutine_threadsafe(self.shutdown(), loop).result()
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            loop.close()
            self._portal = None

    # --- processes --------------------------------------------------------------------------------

    async def spawn(
        self,
        program: Program | str,
        *,
        name: str | None = None,
        args: dict[str, Any] | None = None,
        capabilities: list[str] | None = None,
        budget: Budget | None = None,
        parent: int | None = None,
        priority: int = 0,
    ) -> int:
        """Start `async def program(proc, **args)` as a new process and return its pid.

        Capabilities are glob patterns ("llm", "tool:*"); None means all ("*") for a top-level
        process and the parent's for a child, which may never get more than its parent has.
        """
        fn, ref = (
            (import_program(program), program)
            if isinstance(program, str)
            else (program, program_ref(program))
        )
        parent_info = self._live[parent].info if parent is not None and parent in self._live else None
        if parent is not None and parent_info is None:
            raise KernelError(f"Parent process {parent} is not running in this kernel.")
        if capabilities is None:
            capabilities = list(parent_info.capabilities) if parent_info else ["*"]
        if parent_info is not None:
            extra = [cap for cap in capabilities if not parent_info.allows(cap)]
            if extra:
                raise HandlerError(
                    ErrorCode.DENIED, f"a child cannot get capabilities its parent lacks: {extra}"
                )
        info = ProcessInfo(
            pid=0,
            ppid=parent,
            name=name or getattr(fn, "__name__", "process"),
            program=ref,
            args=args or {},
            capabilities=capabilities,
            budget=budget or Budget.model_validate(self.config.budget.model_dump()),
            priority=priority,
            # What a tainted parent passes on (its arguments) may carry an attacker's words.
            tainted=parent_info is not None and parent_info.tainted,
        )
        info.pid = self.journal.create_process(info, self.boot_id)
        self._start(info, fn, replay={})
        return info.pid

    def _start(self, info: ProcessInfo, fn: Program, replay: dict[int, dict[str, Any]]) -> None:
        proc = LiveProcess(info, replay)
        proc.handle = Process(
            proc,
            dispatch=partial(self.dispatch, proc),
            emit=partial(self._emit, proc),
            child=partial(self._child_handle, proc),
        )
        for usage in self.journal.usage_by_pid(self._descendants(info.pid)).values():
            proc.tree_usage.add_usage(usage)  # a resumed process's children consumed this already
        self._live[info.pid] = proc
        self.journal.set_state(info.pid, State.RUNNING, boot_id=self.boot_id)
        info.state = State.RUNNING
        proc.task = asyncio.create_task(self._run(proc, fn), name=f"llmos-pid-{info.pid}")
        # A task cancelled before its first step never enters _run (killed just after its spawn).
        proc.task.add_done_callback(lambda task: self._cancelled_unstarted(proc, task))

    async def _run(self, proc: LiveProcess, fn: Program) -> None:
        state, result, error = State.DONE, None, None
        watchdog = self._arm_wall_clock(proc)
        try:
            # As JSON, the same live and from the journal (a program may return pydantic models).
            result = to_jsonable_python(await fn(proc.handle, **proc.info.args), fallback=str)
        except asyncio.CancelledError:
            state, error = proc.stop_reason or (State.INTERRUPTED, None)
        except Exception as exc:
            state, error = State.FAILED, f"{type(exc).__name__}: {exc}"
            log.debug("process %s failed", proc.pid, exc_info=True)
        finally:
            if watchdog is not None:
                watchdog.cancel()
        self._finish(proc, state, result, error)

    def _cancelled_unstarted(self, proc: LiveProcess, task: asyncio.Task[None]) -> None:
        if task.cancelled() and not proc.finished.is_set():
            state, error = proc.stop_reason or (State.INTERRUPTED, None)
            self._finish(proc, state, None, error)

    def _finish(self, proc: LiveProcess, state: State, result: Any, error: str | None) -> None:
        ended_at = time.time() if state.finished else None
        wall_time = proc.wall_time()
        if self._journal is not None:
            self.journal.set_state(
                proc.pid, state, result=result, error=error, ended_at=ended_at, wall_time_s=wall_time
            )
        proc.info.state, proc.info.result, proc.info.error = state, result, error
        proc.info.ended_at = ended_at
        proc.info.usage.wall_time_s = wall_time
        self._live.pop(proc.pid, None)
        if state.finished and self._sandbox is not None:
            # Free its sandbox worker now, not when it would idle out; its workspace stays.
            closing = asyncio.create_task(self._sandbox.close_session(str(proc.pid)))
            self._closing_sessions.add(closing)
            closing.add_done_callback(self._closing_sessions.discard)
        proc.finished.set()
        self._emit(proc, "state", {"state": state.value, "error": error})

    def _emit(self, proc: LiveProcess, kind: str, data: dict[str, Any]) -> None:
        for listener in [*proc.listeners, *self.listeners]:
            listener(kind, {"pid": proc.pid, **data})

    def _child_handle(self, parent: LiveProcess, pid: int) -> Process:
        child = self._live.get(pid)
        if child is None or not self.is_descendant(pid, of=parent.pid):
            raise LookupError(f"Process {pid} is not a running descendant of process {parent.pid}.")
        return child.handle

    def _arm_wall_clock(self, proc: LiveProcess) -> asyncio.TimerHandle | None:
        limit = proc.info.budget.wall_time_s
        if limit is None:
            return None
        reason = f"wall-time budget of {limit:g}s used up"
        return asyncio.get_running_loop().call_later(
            max(0.0, limit - proc.wall_time()), self._stop, proc, State.FAILED, reason
        )

    def _stop(self, proc: LiveProcess, state: State, reason: str, force: bool = False) -> None:
        if proc.task is not None and not proc.task.done():
            if force or proc.stop_reason is None:
                proc.stop_reason = (state, reason)
            proc.task.cancel()
            # A process stopped by its budget takes its children with it.
            for child in self.journal.children(proc.pid, with_usage=False):
                if child.pid in self._live:
                    self._stop(self._live[child.pid], State.KILLED, f"parent {proc.pid} stopped: {reason}")

    async def wait(self, pid: int, timeout_s: float | None = None) -> ProcessInfo:
        """Wait until process `pid` finishes and return its final row of the process table."""
        proc = self._live.get(pid)
        if proc is not None:
            await asyncio.wait_for(proc.finished.wait(), timeout_s)
            return proc.info
        info = self.process(pid)
        if info.state == State.INTERRUPTED:
            raise KernelError(
                f"Process {pid} was interrupted when its kernel died; resume it with resume({pid})."
            )
        if not info.state.finished:
            raise KernelError(f"Process {pid} runs in another kernel; wait for it there.")
        return info

    async def run(self, program: Program | str, **spawn_args: Any) -> ProcessInfo:
        """Spawn and wait: the simple way to run one program to its end."""
        return await self.wait(await self.spawn(program, **spawn_args))

    async def kill(self, pid: int) -> None:
        """Kill a process and all its descendants."""
        proc = self._live.get(pid)
        if proc is not None and proc.stop_reason is None:
            proc.stop_reason = (State.KILLED, "killed")  # so it sees its children die as part of its own kill
        for child in self.journal.children(pid, with_usage=False):
            if not child.state.finished:
                await self.kill(child.pid)
        if proc is not None:
            self._stop(proc, State.KILLED, "killed", force=True)
            await proc.finished.wait()
            return
        info = self.process(pid)
        if info.state == State.INTERRUPTED:
            self.journal.set_state(pid, State.KILLED, error="killed", ended_at=time.time())
        elif not info.state.finished:
            raise KernelError(f"Process {pid} runs in another kernel; kill it there.")

    async def resume(self, pid: int) -> int:
        """Continue an interrupted process: journaled syscall results are replayed, not re-executed."""
        if pid in self._live:
            return pid
        info = self.process(pid)
        if info.state != State.INTERRUPTED:
            raise KernelError(
                f"Process {pid} is {info.state.value}; only an interrupted process can be resumed."
            )
        if info.program is None:
            raise KernelError(
                f"Process {pid} cannot be resumed: its program is not importable (a lambda or nested "
                "function); define programs at module level."
            )
        fn = import_program(info.program)
        for child in self.journal.children(pid, with_usage=False):  # its replayed spawns refer to them
            if child.state == State.INTERRUPTED:
                await self.resume(child.pid)
        self.mailboxes.rebuild(pid)
        self._start(info, fn, replay=self.journal.completed_results(pid))
        return pid

    def process(self, pid: int) -> ProcessInfo:
        proc = self._live.get(pid)
        if proc is not None:
            proc.info.usage.wall_time_s = proc.wall_time()
            return proc.info
        info = self.journal.process(pid)
        if info is None:
            raise KernelError(f"No process {pid}; `llmos ps` lists the processes.")
        return info

    def ps(self) -> list[ProcessInfo]:
        return [
            self.process(info.pid) if info.pid in self._live else info for info in self.journal.processes()
        ]

    def log(self, pid: int) -> list[JournalEvent]:
        return self.journal.events(pid)

    def is_descendant(self, pid: int, of: int) -> bool:
        info = self.journal.process(pid, with_usage=False)
        while info is not None and info.ppid is not None:
            if info.ppid == of:
                return True
            info = self.journal.process(info.ppid, with_usage=False)
        return False

    # --- syscalls ---------------------------------------------------------------------------------

    async def dispatch(self, proc: LiveProcess, name: str, args: dict[str, Any]) -> Reply:
        if proc.finished.is_set():
            raise KernelError(f"Process {proc.pid} has ended ({proc.info.state.value}): no more syscalls.")
        seq = proc.next_seq()
        args_json = json.dumps(args, sort_keys=True, default=_jsonable)
        digest = hashlib.sha1(f"{name}{args_json}".encode()).hexdigest()[:16]
        journaled = proc.replayed(seq)
        if journaled is not None:
            if journaled.get("digest") != digest:
                raise ProcessDiverged(
                    f"on resume, syscall #{seq} was {name} but the journal recorded {journaled['name']} "
                    "with other arguments: the program must make the same calls when replayed"
                )
            proc.skip_to(journaled.get("last_seq", seq))  # its nested syscalls are replayed with it
            reply = _typed(name, Reply.model_validate(journaled["reply"]))
            self._note_trust(proc, seq, name, reply)
            return reply
        syscall = TABLE.get(name)
        if syscall is not None and syscall.waits:
            # Journaled before it runs: after a crash, `llmos log` shows what was in flight.
            self.journal.record_call(proc.pid, seq, name, args_json)
        if syscall is None:
            reply, charge = Reply.fail(ErrorCode.UNKNOWN_SYSCALL, f"unknown syscall {name!r}"), None
        else:
            reply, charge = await self._execute(proc, syscall, args, seq)
        result: dict[str, Any] = {"reply": reply.model_dump(mode="json"), "digest": digest}
        if proc.last_seq != seq:  # the handler made syscalls of its own (a tool that runs code)
            result["last_seq"] = proc.last_seq
        if charge is not None:
            result["charge"] = charge.model_dump(exclude_defaults=True)
            proc.info.usage.add(charge)
            for holder in (proc, *self._ancestors(proc)):
                holder.tree_usage.add(charge)
        else:
            proc.info.usage.syscalls += 1
        if syscall is not None and syscall.waits:
            self.journal.record_result(proc.pid, seq, name, result)
        else:
            self.journal.record_call_and_result(proc.pid, seq, name, args_json, result)
        self._note_trust(proc, seq, name, reply)
        return reply

    def _note_trust(self, proc: LiveProcess, seq: int, name: str, reply: Reply) -> None:
        """A process that got untrusted data is tainted from then on (an approval does not clear it)."""
        if reply.untrusted and not proc.tainted:
            proc.info.tainted = True
            self.journal.set_tainted(proc.pid, seq, name)
            self._emit(proc, "taint", {"seq": seq, "syscall": name})

    async def _execute(
        self, proc: LiveProcess, syscall: Syscall, raw_args: dict[str, Any], seq: int
    ) -> tuple[Reply, Charge | None]:
        try:
            args = syscall.args.model_validate(raw_args)
        except ValidationError as exc:
            return Reply.fail(ErrorCode.INVALID_ARGS, f"{syscall.name}: {_first_error(exc)}"), None
        try:
            capability = (
                syscall.capability(self, args) if callable(syscall.capability) else syscall.capability
            )
            action = syscall.action(self, args) if syscall.action is not None else None
        except UnknownTool as exc:
            return Reply.fail(ErrorCode.NOT_FOUND, str(exc)), None
        cover = proc.cover  # a risky call in flight that this syscall is made by
        granted = cover is not None and capability is not None and cover.allows(capability)
        if capability is not None and not proc.info.allows(capability) and not granted:
            message = f"process {proc.pid} ({proc.info.name}) lacks the capability {capability!r}"
            return Reply.fail(ErrorCode.DENIED, message), None
        reason = self._over_budget(proc, syscall)
        if reason is not None:
            return Reply.fail(ErrorCode.BUDGET, f"{syscall.name} refused: {reason}"), None
        try:
            if action is not None and cover is None:
                await self._check_policy(proc, seq, action)
                proc.cover = Cover(seq, action.grants)
            try:
                outcome: Outcome = await syscall.handler(self, proc, args)
            finally:
                if proc.cover is not None and proc.cover.seq == seq:
                    proc.cover = None
        except HandlerError as exc:
            return Reply.fail(exc.code, str(exc)), None
        except (KernelError, TimeoutError) as exc:
            return Reply.fail(ErrorCode.FAILED, str(exc) or type(exc).__name__), None
        except UnknownTool as exc:
            return Reply.fail(ErrorCode.NOT_FOUND, str(exc)), None
        except Exception as exc:  # a device failed: the process gets an error, the kernel goes on
            log.warning("syscall %s of process %s failed", syscall.name, proc.pid, exc_info=True)
            return Reply.fail(ErrorCode.FAILED, f"{type(exc).__name__}: {exc}"), None
        return Reply(ok=True, value=outcome.value, untrusted=outcome.untrusted), outcome.charge

    async def _check_policy(self, proc: LiveProcess, seq: int, action: Action) -> None:
        """Allow, ask a person (the process blocks until one answers), or deny (HandlerError)."""
        risk, what = action.risk.value, action.what
        decision, reason = decide(self.config.policy, risk, after_untrusted=proc.tainted)
        if decision == "deny":
            raise HandlerError(ErrorCode.DENIED, f"the policy denies {risk} actions like {what} ({reason})")
        if decision == "allow":
            return
        key = f"{proc.pid}:{seq}"
        self.journal.set_state(proc.pid, State.BLOCKED)
        proc.info.state = State.BLOCKED
        self._emit(
            proc, "approval", {"key": key, "tool": what, "arguments": action.arguments, "reason": reason}
        )
        approved = await self.approvals.ask(key, proc.pid, what, action.arguments, risk, reason)
        self.journal.set_state(proc.pid, State.RUNNING)
        proc.info.state = State.RUNNING
        if not approved:
            raise HandlerError(ErrorCode.DENIED, f"a person declined the call to {what}")

    def _over_budget(self, proc: LiveProcess, syscall: Syscall) -> str | None:
        """Why a budget refuses the syscall, or None. A budget covers its process and everything
        that process spawned, like a cgroup: a child cannot spend what its parent may not."""
        proc.info.usage.wall_time_s = proc.tree_usage.wall_time_s = proc.wall_time()
        for holder in (proc, *self._ancestors(proc)):
            # Each process's watchdog stops it at its own wall-time limit; an ancestor's is its own.
            fields = syscall.budgets if holder is proc else [b for b in syscall.budgets if b != "wall_time_s"]
            reason = exhausted(holder.info.budget, holder.tree_usage, fields)
            if reason is not None:
                return reason + budget_owner(proc, holder)
        return None

    def token_allowance(self, proc: LiveProcess) -> tuple[int, LiveProcess] | None:
        """The tokens `proc` may still spend and the process whose budget allows no more (itself
        or an ancestor), or None when no token budget is over it."""
        tightest: tuple[int, LiveProcess] | None = None
        for holder in (proc, *self._ancestors(proc)):
            if holder.info.budget.tokens is not None:
                left = max(0, holder.info.budget.tokens - holder.tree_usage.tokens)
                if tightest is None or left < tightest[0]:
                    tightest = (left, holder)
        return tightest

    def _ancestors(self, proc: LiveProcess) -> list[LiveProcess]:
        """The live processes above `proc`, parent first."""
        found: list[LiveProcess] = []
        ppid = proc.info.ppid
        while ppid is not None and (parent := self._live.get(ppid)) is not None and parent not in found:
            found.append(parent)
            ppid = parent.info.ppid
        return found

    def _descendants(self, pid: int) -> list[int]:
        found: list[int] = []
        pending = [pid]
        while pending:
            for child in self.journal.children(pending.pop(), with_usage=False):
                found.append(child.pid)
                pending.append(child.pid)
        return found

    # --- devices ------------------------------------------------------------------------------------

    async def llm(self, model: str | None = None) -> LLMBackend:
        """The backend for `model` (None: the configured default), opened once and kept."""
        async with self._device_lock:
            if model not in self._backends:
                self._backends[model] = await self.devices.llm(model)
            return self._backends[model]

    async def sandbox(self) -> Sandbox:
        async with self._device_lock:
            if self._sandbox is None:
                self._sandbox = await self.devices.sandbox()
            return self._sandbox

    async def memory(self) -> Memory:
        """Long-term memory: one owner per embedded store, so every process goes through this one."""
        async with self._device_lock:
            if self._memory is None:
                self._memory = await self.devices.memory()
            return self._memory

    def workspace(self, pid: int) -> Path:
        """The process's folder: its file tools' and its sandbox session's, kept after it ends."""
        path = self.config.workspace(pid)
        if not path.is_dir():
            path.mkdir(parents=True, exist_ok=True)
            # Sandboxed code runs as the sandbox uid: the folder is its. (Unsandboxed code, the
            # opt-in subprocess backend, runs as the user, whose folder it stays.)
            if os.geteuid() == 0 and self.config.sandbox.backend != "subprocess":
                os.chown(path, self.config.sandbox.uid, self.config.sandbox.uid, follow_symlinks=False)
                path.chmod(0o700)
        return path

    async def call_tool(self, proc: LiveProcess, name: str, arguments: dict[str, Any] | str) -> ToolResult:
        tool = self.tools.get(name)
        secrets = {k: v for k, v in self.secrets.items() if k in tool.secret_names}  # only its own
        context = ToolContext(
            process=proc.handle,
            workspace=self.workspace(proc.pid),
            workspace_limit_bytes=self.config.sandbox.limits.workspace_mb * 1024 * 1024,
            secrets=secrets,
            untrusted=proc.tainted,
        )
        # Whatever the tool returns, a secret it was given reaches neither the journal nor the model.
        return (await tool.invoke(arguments, context)).without_secrets(secrets.values())

    def approve(self, key: str, approve: bool = True) -> Approval:
        """Answer a pending approval (`llmos approvals` lists them); the blocked process goes on."""
        return self.approvals.answer(key, approve)


def _typed(name: str, reply: Reply) -> Reply:
    """A journaled reply with its value as the syscall's result model again."""
    syscall = TABLE.get(name)
    if syscall is not None and reply.ok:
        reply.value = syscall.results.validate_python(reply.value)
    return reply


class SyncKernel:
    """The kernel for code without an event loop: each method runs its async twin on the kernel's thread."""

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        assert self.kernel._portal is not None, "use `with Kernel() as kernel:`"
        return asyncio.run_coroutine_threadsafe(coro, self.kernel._portal[0]).result()

    @property
    def tools(self) -> Tools:
        return self.kernel.tools

    @property
    def config(self) -> Config:
        return self.kernel.config

    def spawn(self, program: Program | str, **spawn_args: Any) -> int:
        return self.call(self.kernel.spawn(program, **spawn_args))

    def wait(self, pid: int, timeout_s: float | None = None) -> ProcessInfo:
        return self.call(self.kernel.wait(pid, timeout_s))

    def run(self, program: Program | str, **spawn_args: Any) -> ProcessInfo:
        return self.call(self.kernel.run(program, **spawn_args))

    def kill(self, pid: int) -> None:
        self.call(self.kernel.kill(pid))

    def resume(self, pid: int) -> int:
        return self.call(self.kernel.resume(pid))

    def approve(self, key: str, approve: bool = True) -> Approval:
        return self.call(_now(lambda: self.kernel.approve(key, approve)))

    def pending_approvals(self) -> list[Approval]:
        return self.call(_now(self.kernel.approvals.pending))

    def ps(self) -> list[ProcessInfo]:
        return self.call(_now(self.kernel.ps))

    def log(self, pid: int) -> list[JournalEvent]:
        return self.call(_now(lambda: self.kernel.log(pid)))


async def _now(fn: Callable[[], T]) -> T:
    """Run a plain function on the kernel's thread, which owns the journal connection."""
    return fn()
