"""Per-process mailboxes: how llmos processes talk to each other without AutoGen.

A message is identified by its send syscall's idempotency key ("pid:seq"). Mailboxes live in
memory; after a crash the undelivered messages of a resumed process are rebuilt from the
journal (sent to it, minus those its journaled receives already took), so none is lost or
delivered twice.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import defaultdict
from typing import Any

from pydantic import BaseModel, Field

from llmos.kernel.journal import Journal


class Mail(BaseModel):
    id: str
    sender: int
    body: Any
    sent_at: float = Field(default_factory=time.time)
    # The sender had read untrusted data: the body may carry an attacker's words (the receiver
    # is tainted when it takes it).
    tainted: bool = False


class MailSent(BaseModel):
    id: str
    tainted: bool = False


class Mailboxes:
    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self._boxes: dict[int, list[Mail]] = defaultdict(list)
        self._arrived: dict[int, asyncio.Event] = defaultdict(asyncio.Event)

    def send(self, sender: int, to: int, body: Any, *, tainted: bool) -> MailSent:
        mail = Mail(id=uuid.uuid4().hex[:16], sender=sender, body=body, tainted=tainted)
        self._boxes[to].append(mail)
        self._arrived[to].set()
        return MailSent(id=mail.id, tainted=tainted)

    def take(self, pid: int, sender: int | None = None) -> Mail | None:
        box = self._boxes[pid]
        for index, message in enumerate(box):
            if sender is None or message.sender == sender:
                return box.pop(index)
        return None

    async def wait(self, pid: int, sender: int | None, timeout_s: float | None) -> Mail | None:
        try:
            async with asyncio.timeout(timeout_s):
                while (message := self.take(pid, sender)) is None:
                    self._arrived[pid].clear()
                    await self._arrived[pid].wait()
                return message
        except TimeoutError:
            return None

    def rebuild(self, pid: int) -> None:
        """Refill a resumed process's mailbox with what was sent to it and not yet taken."""
        self._boxes[pid] = [Mail.model_validate(m) for m in self.journal.undelivered_messages(pid)]
