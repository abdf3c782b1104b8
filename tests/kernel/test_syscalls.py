"""The syscall table: every row has a caller and a test; replies are the rows' result models, live
and replayed; a tool's own syscalls are covered by its call (one decision, the capabilities it
declares) and replayed with it."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from programs import fetch_page

from llmos import Kernel
from llmos.config import SandboxConfig, load_config
from llmos.cpu.scripted import ScriptedLLM
from llmos.kernel import ErrorCode, Process, State
from llmos.kernel.devices import ChatResult, ModelInfo, ToolContext, ToolResult, ToolSpec
from llmos.kernel.mailbox import Mail, MailSent
from llmos.kernel.syscalls import TABLE, ProcessExit
from llmos.tools.registry import tool

ROOT = Path(__file__).parents[2]


def quoted_in(folders: list[str], name: str, skip: Path | None = None) -> list[Path]:
    pattern = re.compile(rf"""["']{re.escape(name)}["']""")
    return [
        path
        for folder in folders
        for path in (ROOT / folder).rglob("*.py")
        if path != skip and pattern.search(path.read_text())
    ]


@pytest.mark.parametrize("name", sorted(TABLE))
def test_every_syscall_has_a_caller_and_a_test(name: str) -> None:
    table = ROOT / "llmos" / "kernel" / "syscalls.py"
    assert quoted_in(["llmos", "examples", "bench"], name, skip=table), f"nothing calls {name}"
    assert quoted_in(["tests"], name), f"no test makes {name}"


CALLS = 0


@tool(uses=["clock"])
async def stamped(ctx: ToolContext) -> int:
    """A tool that makes syscalls of its own (two clock reads) and counts how often it ran."""
    global CALLS
    CALLS += 1
    for _ in range(2):
        (await ctx.process.syscall("clock.now")).unwrap()
    return CALLS


async def one_of_each(proc: Process) -> list[str]:
    """A syscall of each kind whose value is a model, then a long sleep (a restart comes here)."""
    child = (await proc.syscall("proc.spawn", program=f"{__name__}:quiet")).unwrap()
    replies = [
        await proc.syscall("llm.chat", messages=[{"role": "user", "content": "hi"}]),
        await proc.syscall("llm.info"),
        await proc.syscall("llm.count", texts=["one two", "three"]),
        await proc.syscall("tool.list", names=["stamped"]),
        await proc.syscall("tool.call", name="stamped"),
        await proc.syscall("msg.send", to=proc.pid, body={"n": 1}),
        await proc.syscall("msg.recv"),
        await proc.syscall("proc.wait", pid=child),
        await proc.syscall("clock.now"),
    ]
    await proc.syscall("sleep", seconds=3600)
    return [type(reply.value).__name__ for reply in replies]


async def quiet(proc: Process) -> None:
    await proc.syscall("noop")


async def test_replies_are_the_rows_models_live_and_when_replayed(llmos_home: Path) -> None:
    global CALLS
    CALLS = 0
    seen: dict[str, list[object]] = {}

    async def boot_and_run(resume: int | None) -> int:
        async with Kernel(load_config(), llm=ScriptedLLM(["hello"] * 2)) as kernel:
            kernel.tools.register(stamped)
            pid = resume if resume is not None else await kernel.spawn(one_of_each)
            if resume is not None:
                await kernel.resume(pid)

            def keep(kind: str, data: dict[str, object]) -> None:
                seen.setdefault(str(resume), []).append(kind)

            kernel.listeners.append(keep)
            for _ in range(500):  # until it sleeps: its sleep is journaled as in flight
                if any(e.name == "sleep" and e.kind == "call" for e in kernel.log(pid)):
                    break
                await asyncio.sleep(0.01)
        return pid

    pid = await boot_and_run(None)
    assert CALLS == 1
    # A new kernel resumes it: every reply before the sleep comes from the journal, as its model.
    async with Kernel(load_config(), llm=ScriptedLLM([])) as kernel:
        kernel.tools.register(stamped)
        assert kernel.process(pid).state == State.INTERRUPTED
        await kernel.resume(pid)
        for _ in range(500):
            calls = [e for e in kernel.log(pid) if e.kind == "call" and e.name == "sleep"]
            if len(calls) == 2:
                break
            await asyncio.sleep(0.01)
        assert len(calls) == 2, "the resumed run reached the sleep again without diverging"
        await kernel.kill(pid)
    assert CALLS == 1, "the tool's call (and its own two syscalls) were replayed, not run again"


async def typed_replies(proc: Process) -> list[bool]:
    child = (await proc.syscall("proc.spawn", program=f"{__name__}:quiet")).unwrap()
    checks = [
        isinstance(
            (await proc.syscall("llm.chat", messages=[{"role": "user", "content": "hi"}])).value, ChatResult
        ),
        isinstance((await proc.syscall("llm.info")).value, ModelInfo),
        (await proc.syscall("llm.count", texts=["one two", "three"])).value == [2, 1],
        all(isinstance(s, ToolSpec) for s in (await proc.syscall("tool.list", names=["stamped"])).value),
        isinstance((await proc.syscall("tool.call", name="stamped")).value, ToolResult),
        isinstance((await proc.syscall("msg.send", to=proc.pid, body=1)).value, MailSent),
        isinstance((await proc.syscall("msg.recv")).value, Mail),
        isinstance((await proc.syscall("proc.wait", pid=child)).value, ProcessExit),
        isinstance((await proc.syscall("clock.now")).value, float),
    ]
    return checks


async def test_each_reply_value_is_its_rows_result_model(llmos_home: Path) -> None:
    async with Kernel(load_config(), llm=ScriptedLLM(["hello"])) as kernel:
        kernel.tools.register(stamped)
        info = await kernel.run(typed_replies)
    assert info.error is None and info.result == [True] * 9


async def python_then_direct(proc: Process) -> list[object]:
    by_tool = await proc.syscall("tool.call", name="python", arguments={"code": "print(6 * 7)"})
    direct = await proc.syscall("sandbox.exec", code="print(1)")
    return [by_tool.value.content if by_tool.ok else by_tool.error.code, direct.error and direct.error.code]  # type: ignore[union-attr]


async def test_a_tool_lends_the_capabilities_it_declares_to_its_own_syscalls(llmos_home: Path) -> None:
    config = load_config().model_copy(update={"sandbox": SandboxConfig(backend="namespace", pool_size=0)})
    async with Kernel(config) as kernel:
        info = await kernel.run(python_then_direct, capabilities=["tool:python"])
    # The python tool may run code (its sandbox.exec), the process itself may not.
    assert info.result == [{"stdout": "42\n"}, ErrorCode.DENIED]


async def browse_then_code(proc: Process) -> list[object]:
    await proc.syscall("tool.call", name="fetch_page", arguments={"url": "http://127.0.0.1/"})
    by_tool = await proc.syscall("tool.call", name="python", arguments={"code": "print(6 * 7)"})
    direct = await proc.syscall("sandbox.exec", code="print(1)")
    return [by_tool.ok, direct.ok]


async def test_a_tool_call_is_decided_once_for_the_syscalls_it_makes(llmos_home: Path) -> None:
    config = load_config().model_copy(update={"sandbox": SandboxConfig(backend="namespace", pool_size=0)})
    async with Kernel(config) as kernel:
        kernel.tools.register(fetch_page)
        pid = await kernel.spawn(browse_then_code)
        asked: list[str] = []
        while not kernel.process(pid).state.finished:
            for approval in kernel.approvals.pending(pid):
                asked.append(approval.tool)
                kernel.approve(approval.key)
            await asyncio.sleep(0.01)
        info = await kernel.wait(pid)
    # Once for the python tool (not again for the sandbox.exec it makes), once for the direct exec.
    assert asked == ["python", "sandbox.exec"]
    assert info.result == [True, True]


async def sleeper(proc: Process) -> None:
    await proc.syscall("sleep", seconds=3600)


async def kill_child_then_stranger(proc: Process, stranger: int) -> list[object]:
    child = (await proc.syscall("proc.spawn", program=f"{__name__}:sleeper")).unwrap()
    killed = await proc.syscall("proc.kill", pid=child)
    exit = (await proc.syscall("proc.wait", pid=child)).unwrap()
    refused = await proc.syscall("proc.kill", pid=stranger)
    return [killed.ok, exit.state, refused.error and refused.error.code]


async def test_a_process_may_kill_its_children_only(llmos_home: Path) -> None:
    async with Kernel(load_config()) as kernel:
        stranger = await kernel.spawn(sleeper)
        info = await kernel.run(kill_child_then_stranger, args={"stranger": stranger})
        assert info.result == [True, "killed", "denied"]
        assert kernel.process(stranger).state == State.RUNNING
