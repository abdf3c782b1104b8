"""Approvals: the autonomy slider per risk class, untrusted content, and answers across a restart."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from programs import browse_then_run, delete_everything, fetch_page, risky, run_command

from llmos import Kernel
from llmos.config import load_config
from llmos.kernel import ErrorCode, State

TOOLS = (delete_everything, fetch_page, run_command)


async def wait_for_blocked(kernel: Kernel, pid: int) -> str:
    for _ in range(500):
        pending = kernel.approvals.pending(pid)
        if pending and kernel.process(pid).state == State.BLOCKED:
            return pending[0].key
        await asyncio.sleep(0.01)
    raise AssertionError("the process never asked for approval")


async def test_an_irreversible_action_waits_for_a_person() -> None:
    async with Kernel(load_config()) as kernel:
        kernel.tools.register(*TOOLS)
        pid = await kernel.spawn(risky)
        key = await wait_for_blocked(kernel, pid)
        assert kernel.approvals.get(key).tool == "delete_everything"  # type: ignore[union-attr]
        kernel.approve(key)
        info = await asyncio.wait_for(kernel.wait(pid), 10)
        assert info.result == ["deleted (yes)", "ran ls"]

        pid = await kernel.spawn(risky)
        kernel.approve(await wait_for_blocked(kernel, pid), approve=False)
        info = await asyncio.wait_for(kernel.wait(pid), 10)
        assert info.result == [ErrorCode.DENIED, "ran ls"]


async def test_policy_can_allow_or_deny_a_risk_class() -> None:
    config = load_config(env={"LLMOS_POLICY__IRREVERSIBLE": "deny"})
    async with Kernel(config) as kernel:
        kernel.tools.register(*TOOLS)
        assert (await kernel.run(risky)).result == [ErrorCode.DENIED, "ran ls"]
    config = load_config(env={"LLMOS_POLICY__IRREVERSIBLE": "allow"})
    async with Kernel(config) as kernel:
        kernel.tools.register(*TOOLS)
        assert (await kernel.run(risky)).result == ["deleted (yes)", "ran ls"]


async def test_an_action_after_untrusted_content_asks_first() -> None:
    async with Kernel(load_config()) as kernel:
        kernel.tools.register(*TOOLS)
        pid = await kernel.spawn(browse_then_run)
        key = await wait_for_blocked(kernel, pid)
        approval = kernel.approvals.get(key)
        assert approval is not None and approval.tool == "run_command" and "untrusted" in approval.reason
        kernel.approve(key)
        assert (await asyncio.wait_for(kernel.wait(pid), 10)).result[1] == "ran ls"
    async with Kernel(load_config(env={"LLMOS_POLICY__AFTER_UNTRUSTED": "allow"})) as kernel:
        kernel.tools.register(*TOOLS)
        assert (await kernel.run(browse_then_run)).result[1] == "ran ls"


async def test_a_pending_approval_survives_a_restart() -> None:
    async with Kernel(load_config()) as kernel:
        kernel.tools.register(*TOOLS)
        pid = await kernel.spawn(risky)
        key = await wait_for_blocked(kernel, pid)
    async with Kernel(load_config()) as kernel:  # the host went down while the process waited
        kernel.tools.register(*TOOLS)
        assert kernel.process(pid).state == State.INTERRUPTED
        assert [a.key for a in kernel.approvals.pending()] == [key]
        kernel.approve(key)  # answered before the process is resumed
        await kernel.resume(pid)
        info = await asyncio.wait_for(kernel.wait(pid), 10)
        assert info.result == ["deleted (yes)", "ran ls"]
        assert kernel.approvals.pending() == []


async def test_the_cli_lists_and_answers_approvals_from_another_process() -> None:
    import subprocess

    async with Kernel(load_config()) as kernel:
        kernel.tools.register(*TOOLS)
        pid = await kernel.spawn(risky)
        key = await wait_for_blocked(kernel, pid)
        llmos = [sys.executable, "-m", "llmos"]
        listing = await asyncio.to_thread(
            subprocess.run, [*llmos, "approvals"], capture_output=True, text=True
        )
        assert key in listing.stdout and "delete_everything" in listing.stdout
        answer = await asyncio.to_thread(
            subprocess.run, [*llmos, "approve", key], capture_output=True, text=True
        )
        assert answer.returncode == 0, answer.stderr
        info = await asyncio.wait_for(kernel.wait(pid), 10)  # the answer from another OS process arrives
        assert info.result == ["deleted (yes)", "ran ls"]
