"""The kernel core: capabilities, budgets, kill, concurrency, isolation, crash and resume."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # `programs` must import by one name in every kernel

from programs import (
    append_line,
    parent_of_chatters,
    parent_of_sleepers,
    three_appends,
    two_chatters_in_turn,
)

from llmos import Kernel
from llmos.config import load_config
from llmos.cpu.scripted import ScriptedLLM
from llmos.kernel import Budget, ErrorCode, KernelError, Process, State


def config(home: Path):  # type: ignore[no-untyped-def]
    return load_config(env={"LLMOS_HOME": str(home)})


async def test_a_process_runs_and_its_syscalls_are_journaled(llmos_home: Path) -> None:
    async def program(proc: Process) -> float:
        await proc.syscall("noop")
        return (await proc.syscall("clock.now")).unwrap()  # type: ignore[no-any-return]

    async with Kernel(config(llmos_home)) as kernel:
        info = await kernel.run(program)
        assert info.state == State.DONE
        assert abs(info.result - time.time()) < 60
        events = kernel.log(info.pid)
        assert [(e.kind, e.name) for e in events if e.kind != "state"] == [
            ("call", "noop"), ("result", "noop"), ("call", "clock.now"), ("result", "clock.now"),
        ]  # fmt: skip
        assert [e.data["state"] for e in events if e.kind == "state"] == ["running", "done"]


async def test_capability_denial_is_an_error_reply_not_a_crash(llmos_home: Path) -> None:
    async def program(proc: Process) -> list[str | None]:
        tool = await proc.syscall("tool.call", name="append_line", arguments={"path": "x", "text": "y"})
        chat = await proc.syscall("llm.chat", messages=[{"role": "user", "content": "hi"}])
        spawn = await proc.syscall("proc.spawn", program="programs:sleeper")
        return [r.error.code if r.error else None for r in (tool, chat, spawn)]

    async with Kernel(config(llmos_home), llm=ScriptedLLM(["hello"])) as kernel:
        kernel.tools.register(append_line)
        info = await kernel.run(program, capabilities=["llm"])
        assert info.state == State.DONE
        assert info.result == [ErrorCode.DENIED, None, ErrorCode.DENIED]
        denial = next(e for e in kernel.log(info.pid) if e.kind == "result" and e.name == "tool.call")
        assert "lacks the capability 'tool:append_line'" in denial.data["reply"]["error"]["message"]


async def test_a_child_never_gets_more_capabilities_than_its_parent(llmos_home: Path) -> None:
    async def program(proc: Process) -> str:
        reply = await proc.syscall("proc.spawn", program="programs:sleeper", capabilities=["llm", "tool:*"])
        assert reply.error is not None
        return reply.error.code

    async with Kernel(config(llmos_home)) as kernel:
        info = await kernel.run(program, capabilities=["proc.spawn", "llm"])
        assert info.result == ErrorCode.DENIED


async def test_malformed_syscalls_get_clear_errors(llmos_home: Path) -> None:
    async def program(proc: Process) -> list[str]:
        replies = [
            await proc.syscall("no.such.call"),
            await proc.syscall("sleep", seconds="soon"),
            await proc.syscall("sleep", seconds=1, extra=True),
            await proc.syscall("tool.call", name="missing_tool", arguments={}),
        ]
        return [f"{r.error.code}: {r.error.message}" for r in replies if r.error]

    async with Kernel(config(llmos_home)) as kernel:
        kernel.tools.register(append_line)
        info = await kernel.run(program)
        assert info.state == State.DONE
        unknown, bad_type, extra, missing = info.result
        assert unknown.startswith("unknown_syscall")
        assert bad_type.startswith("invalid_args: sleep: seconds")
        assert extra.startswith("invalid_args: sleep: extra")
        assert missing.startswith("not_found") and "append_line" in missing


async def test_token_budget_is_charged_and_enforced(llmos_home: Path) -> None:
    llm = ScriptedLLM(["one two three four five"] * 5)  # 5 completion tokens + 2 prompt tokens each

    async def program(proc: Process) -> list[str]:
        outcomes = []
        for _ in range(4):
            reply = await proc.syscall("llm.chat", messages=[{"role": "user", "content": "say words"}])
            outcomes.append("ok" if reply.ok else reply.error.code)  # type: ignore[union-attr]
        return outcomes

    async with Kernel(config(llmos_home), llm=llm) as kernel:
        info = await kernel.run(program, budget=Budget(tokens=14))
        assert info.result == ["ok", "ok", "budget", "budget"]
        assert info.usage.tokens == 14 and info.usage.prompt_tokens == 4
        assert kernel.journal.usage_by_backend()["scripted"].tokens == 14
        assert llm.requests[1].max_tokens == 5  # what is left (7) less the prompt (2)


async def test_a_budget_covers_the_children_a_process_spawns(llmos_home: Path) -> None:
    llm = ScriptedLLM(["one two three four five"] * 20)  # 7 tokens a call

    async with Kernel(config(llmos_home), llm=llm) as kernel:
        # The children have no budget of their own; the parent's 30 tokens hold for all of them.
        info = await kernel.run(
            parent_of_chatters, args={"children": 3, "calls": 2}, budget=Budget(tokens=30)
        )
        outcomes = [outcome for child in info.result for outcome in child]
        assert outcomes.count("ok") == 4  # 4 calls of 7 tokens; the 2 left do not hold a prompt
        refused = [o for o in outcomes if o != "ok"]
        assert refused and all(
            o.startswith("budget: llm.chat refused: token budget of 30")
            and f"; it is the budget of process {info.pid} (parent_of_chatters), which covers this one" in o
            for o in refused
        ), refused
        children = [kernel.process(child.pid) for child in kernel.journal.children(info.pid)]
        assert sum(child.usage.tokens for child in children) <= 30
        assert all(child.budget.tokens is None for child in children)


async def test_a_resumed_parent_still_counts_what_its_children_spent(llmos_home: Path) -> None:
    words = ["one two three four five"] * 10  # 7 tokens a call
    async with Kernel(config(llmos_home), llm=ScriptedLLM(words)) as kernel:
        pid = await kernel.spawn(two_chatters_in_turn, args={"calls": 2}, budget=Budget(tokens=20))
        while (
            not (children := kernel.journal.children(pid))
            or kernel.process(children[0].pid).state != State.DONE
        ):
            await asyncio.sleep(0.02)
    # The kernel stopped while the parent paused; a new one resumes it.
    async with Kernel(config(llmos_home), llm=ScriptedLLM(words)) as kernel:
        await kernel.resume(pid)
        info = await kernel.wait(pid, timeout_s=30)
        spent = sum(kernel.process(child.pid).usage.tokens for child in kernel.journal.children(pid))
    first, second = info.result
    assert first == ["ok", "ok"]  # 14 tokens before the restart
    assert second[0] == "ok" and second[1].startswith("budget:"), second  # 6 left after it, not 20
    assert spent <= 20


async def test_tool_call_budget_is_enforced(llmos_home: Path, tmp_path: Path) -> None:
    target = tmp_path / "lines.txt"

    async def program(proc: Process) -> list[bool]:
        args = {"path": str(target), "text": "x"}
        return [(await proc.syscall("tool.call", name="append_line", arguments=args)).ok for _ in range(3)]

    async with Kernel(config(llmos_home)) as kernel:
        kernel.tools.register(append_line)
        info = await kernel.run(program, budget=Budget(tool_calls=2))
        assert info.result == [True, True, False]
        assert target.read_text() == "x\nx\n"
        assert info.usage.tool_calls == 2


async def test_wall_time_budget_stops_a_process(llmos_home: Path) -> None:
    async def program(proc: Process) -> None:
        await proc.syscall("sleep", seconds=60)

    async with Kernel(config(llmos_home)) as kernel:
        info = await asyncio.wait_for(kernel.run(program, budget=Budget(wall_time_s=0.3)), 10)
        assert info.state == State.FAILED
        assert info.error is not None and "wall-time budget" in info.error


async def test_kill_stops_a_running_process_and_its_children(llmos_home: Path) -> None:
    async with Kernel(config(llmos_home)) as kernel:
        pid = await kernel.spawn(parent_of_sleepers, args={"children": 2})
        for _ in range(100):
            if len(kernel.ps()) == 3:
                break
            await asyncio.sleep(0.01)
        await kernel.kill(pid)
        states = {info.pid: info.state for info in kernel.ps()}
        assert states == {pid: State.KILLED, pid + 1: State.KILLED, pid + 2: State.KILLED}
        assert (await kernel.wait(pid)).state == State.KILLED


async def test_fifty_concurrent_processes_lose_and_duplicate_no_event(llmos_home: Path) -> None:
    calls_each = 20

    async def program(proc: Process) -> int:
        for i in range(calls_each):
            await proc.syscall("noop" if i % 2 else "sleep", **({} if i % 2 else {"seconds": 0}))
        return proc.pid

    async with Kernel(config(llmos_home)) as kernel:
        pids = [await kernel.spawn(program) for _ in range(50)]
        infos = await asyncio.gather(*(kernel.wait(pid) for pid in pids))
        assert all(info.state == State.DONE for info in infos)
        events = kernel.journal.events(kinds=("call", "result"))
        keys = Counter((e.kind, e.pid, e.seq) for e in events)
        assert len(keys) == 50 * calls_each * 2 and set(keys.values()) == {1}
        for pid in pids:
            assert sorted(seq for kind, p, seq in keys if p == pid and kind == "result") == list(
                range(1, calls_each + 1)
            )
            assert kernel.process(pid).usage.syscalls == calls_each


async def test_two_kernels_in_one_process_are_isolated(tmp_path: Path) -> None:
    async def program(proc: Process, label: str) -> str:
        await proc.syscall("noop")
        return label

    async with Kernel(config(tmp_path / "a")) as first, Kernel(config(tmp_path / "b")) as second:
        first.tools.register(append_line)
        pids = await asyncio.gather(
            first.spawn(program, args={"label": "a"}), second.spawn(program, args={"label": "b"})
        )
        assert (await first.wait(pids[0])).result == "a"
        assert (await second.wait(pids[1])).result == "b"
        assert [p.result for p in first.ps()] == ["a"] and [p.result for p in second.ps()] == ["b"]
        assert "append_line" in first.tools and "append_line" not in second.tools


def test_sync_facade_runs_the_same_kernel(llmos_home: Path) -> None:
    async def program(proc: Process) -> str:
        await proc.syscall("noop")
        return "done"

    with Kernel(config(llmos_home)) as kernel:
        info = kernel.run(program)
        assert info.state == State.DONE and info.result == "done"
        assert [p.pid for p in kernel.ps()] == [info.pid]
        assert len(kernel.log(info.pid)) == 4


def test_crash_and_resume_replays_journaled_results(llmos_home: Path, tmp_path: Path) -> None:
    """A kernel in a child OS process is SIGKILLed mid-run; a new kernel resumes its process."""
    target = tmp_path / "side-effects.txt"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "LLMOS_HOME": str(llmos_home)}
    child = subprocess.Popen(
        [sys.executable, str(Path(__file__).parent / "crash_child.py"), str(target)],
        env=env, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert child.stdout is not None
        pid = int(child.stdout.readline())
        deadline = time.monotonic() + 60
        while not (target.exists() and target.read_text() == "one\ntwo\n"):
            assert time.monotonic() < deadline, "the child never made its first two side effects"
            time.sleep(0.02)
        time.sleep(0.3)  # let it enter the sleep syscall
        child.send_signal(signal.SIGKILL)
        child.wait()
    finally:
        child.kill()

    with Kernel(config(llmos_home)) as kernel:
        kernel.tools.register(append_line)
        before = kernel.log(pid)
        assert kernel.ps()[0].state == State.INTERRUPTED
        assert kernel.ps()[0].usage.tool_calls == 2
        kernel.resume(pid)
        info = kernel.wait(pid, timeout_s=60)
        assert info.state == State.DONE, info.error
        assert info.result == [1, 2, 3]
        assert target.read_text() == "one\ntwo\nthree\n"  # the completed side effects did not run again
        after = kernel.log(pid)
        assert after[: len(before)] == before  # every journaled event is kept as it was
        assert info.usage.tool_calls == 3


async def test_resume_refuses_what_cannot_be_resumed(llmos_home: Path) -> None:
    async def nested(proc: Process) -> None:
        await proc.syscall("noop")

    async with Kernel(config(llmos_home)) as kernel:
        info = await kernel.run(nested)
        with pytest.raises(KernelError, match="only an interrupted process"):
            await kernel.resume(info.pid)
        with pytest.raises(KernelError, match="No process 99"):
            await kernel.resume(99)


async def test_a_resumed_program_that_diverges_fails_clearly(llmos_home: Path, tmp_path: Path) -> None:
    target = tmp_path / "lines.txt"
    async with Kernel(config(llmos_home)) as kernel:
        kernel.tools.register(append_line)
        pid = await kernel.spawn(three_appends, args={"path": str(target), "pause_s": 30})
        while not (target.exists() and target.read_text() == "one\ntwo\n"):
            await asyncio.sleep(0.01)
    # The kernel shut down under the process: it is interrupted. Now replay it with other arguments.
    async with Kernel(config(llmos_home)) as kernel:
        kernel.tools.register(append_line)
        assert kernel.process(pid).state == State.INTERRUPTED
        kernel.journal.db.execute(
            "UPDATE processes SET args = ? WHERE pid = ?", ('{"path": "elsewhere", "pause_s": 0}', pid)
        )
        await kernel.resume(pid)
        info = await kernel.wait(pid)
        assert info.state == State.FAILED and "journal recorded" in (info.error or "")
        assert target.read_text() == "one\ntwo\n"
