"""Messaging between processes: send, receive, wait; nothing lost or doubled across a restart."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from programs import inbox_reader, ping_pong

from llmos import Kernel
from llmos.config import load_config
from llmos.kernel import ErrorCode, Process, State


async def test_two_processes_talk_through_mailboxes(llmos_home: Path) -> None:
    async with Kernel(load_config()) as kernel:
        info = await asyncio.wait_for(kernel.run(ping_pong, args={"rounds": 5}), 30)
        assert info.state == State.DONE and info.result == [1, 2, 3, 4, 5]
        assert [p.state for p in kernel.ps()] == [State.DONE, State.DONE]


async def test_recv_polls_and_bad_targets_are_errors(llmos_home: Path) -> None:
    async def program(proc: Process) -> list[object]:
        empty = await proc.syscall("msg.recv")
        timed_out = await proc.syscall("msg.wait", timeout_s=0.05)
        nobody = await proc.syscall("msg.send", to=999, body="hi")
        to_self = await proc.syscall("msg.send", to=proc.pid, body="note to self")
        mine = await proc.syscall("msg.recv")
        return [
            empty.value,
            timed_out.value,
            nobody.error and nobody.error.code,
            to_self.ok,
            mine.value.body,
        ]

    async with Kernel(load_config()) as kernel:
        info = await kernel.run(program)
        assert info.result == [None, None, ErrorCode.NOT_FOUND, True, "note to self"]

        async def unprivileged(proc: Process) -> object:
            reply = await proc.syscall("msg.send", to=proc.pid, body="hi")
            return reply.error and reply.error.code

        assert (await kernel.run(unprivileged, capabilities=["llm"])).result == ErrorCode.DENIED


async def test_undelivered_messages_survive_a_restart(llmos_home: Path) -> None:
    async def sender(proc: Process, to: int) -> None:
        for body in ("first", "second", "third"):
            (await proc.syscall("msg.send", to=to, body=body)).unwrap()

    async with Kernel(load_config()) as kernel:
        reader = await kernel.spawn(inbox_reader, args={"expected": 4})
        await kernel.run(sender, args={"to": reader})
        for _ in range(100):  # the reader takes the messages as they come
            if kernel.process(reader).usage.syscalls >= 3:
                break
            await asyncio.sleep(0.01)
    # The kernel stopped under the reader: it took some messages; the rest wait in the journal.
    async with Kernel(load_config()) as kernel:
        assert kernel.process(reader).state == State.INTERRUPTED
        await kernel.resume(reader)
        await kernel.run(sender, args={"to": reader})
        info = await asyncio.wait_for(kernel.wait(reader), 10)
        assert info.result == ["first", "second", "third", "first"]
