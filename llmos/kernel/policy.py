"""Policy: may this process run this tool now? Allow, ask a person, or deny.

Capabilities say what a process may ever do; the policy says how much autonomy it has while
doing it. Each tool has a risk class; the config maps each class to allow, ask or deny. An
`ask` blocks the process (state blocked-on-approval) until a person answers in the shell, the
CLI (`llmos approve`) or the API. Approvals live in the journal database under the syscall's
idempotency key, so a pending one survives a restart: the resumed process asks again under
the same key and gets the answer given meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from typing import Any, Literal

from pydantic import BaseModel

from llmos.config import Decision, PolicyConfig

SCHEMA = """
CREATE TABLE IF NOT EXISTS approvals (
    key TEXT PRIMARY KEY, pid INTEGER NOT NULL, tool TEXT NOT NULL, arguments TEXT NOT NULL,
    risk TEXT NOT NULL, reason TEXT NOT NULL, state TEXT NOT NULL,
    created_at REAL NOT NULL, answered_at REAL
);
"""
POLL_S = 0.25  # an answer may come from another OS process (`llmos approve`)

ApprovalState = Literal["pending", "approved", "denied"]


# What an injected instruction could do harm with: every risk class but reading. (A network call
# with side effects, an HTTP POST or DELETE, is a WRITE; a GET is NETWORK.)
AFTER_UNTRUSTED = frozenset({"write", "execute", "irreversible"})


def decide(policy: PolicyConfig, risk: str, after_untrusted: bool) -> tuple[Decision, str]:
    """The decision for an action of this risk class, and the reason a person would be shown."""
    decision: Decision = getattr(policy, risk)
    reason = f"policy.{risk} = {decision}"
    if after_untrusted and risk in AFTER_UNTRUSTED and decision == "allow":
        decision = policy.after_untrusted
        reason = "the process has read untrusted data (a web page, an API, a tainted process's output)"
    return decision, reason


class Approval(BaseModel):
    key: str
    pid: int
    tool: str
    arguments: dict[str, Any]
    risk: str
    reason: str
    state: ApprovalState
    created_at: float
    answered_at: float | None = None


class Approvals:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.db.executescript(SCHEMA)
        self._answered: dict[str, asyncio.Event] = {}

    def get(self, key: str) -> Approval | None:
        rows = self._rows("WHERE key = ?", (key,))
        return rows[0] if rows else None

    def pending(self, pid: int | None = None) -> list[Approval]:
        if pid is None:
            return self._rows("WHERE state = 'pending'", ())
        return self._rows("WHERE state = 'pending' AND pid = ?", (pid,))

    async def ask(
        self, key: str, pid: int, tool: str, arguments: dict[str, Any], risk: str, reason: str
    ) -> bool:
        """Record the question (once per key) and wait for a person's answer."""
        self.db.execute(
            "INSERT OR IGNORE INTO approvals VALUES (?, ?, ?, ?, ?, ?, 'pending', ?, NULL)",
            (key, pid, tool, json.dumps(arguments, default=str), risk, reason, time.time()),
        )
        event = self._answered.setdefault(key, asyncio.Event())
        while (approval := self.get(key)) is not None and approval.state == "pending":
            try:
                await asyncio.wait_for(event.wait(), POLL_S)
            except TimeoutError:
                continue
        self._answered.pop(key, None)
        return approval is not None and approval.state == "approved"

    def answer(self, key: str, approve: bool) -> Approval:
        approval = self.get(key)
        if approval is None or approval.state != "pending":
            raise LookupError(f"No pending approval {key!r}; `llmos approvals` lists the pending ones.")
        state = "approved" if approve else "denied"
        self.db.execute(
            "UPDATE approvals SET state = ?, answered_at = ? WHERE key = ?", (state, time.time(), key)
        )
        if key in self._answered:
            self._answered[key].set()
        return approval.model_copy(update={"state": state})

    def _rows(self, where: str, params: tuple[Any, ...]) -> list[Approval]:
        rows = self.db.execute(
            "SELECT key, pid, tool, arguments, risk, reason, state, created_at, answered_at "
            f"FROM approvals {where} ORDER BY created_at",
            params,
        ).fetchall()
        return [
            Approval(
                key=r[0], pid=r[1], tool=r[2], arguments=json.loads(r[3]), risk=r[4], reason=r[5],
                state=r[6], created_at=r[7], answered_at=r[8],
            )
            for r in rows
        ]  # fmt: skip
