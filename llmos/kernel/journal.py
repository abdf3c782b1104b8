"""The journal: an append-only SQLite (WAL) log of every syscall and process state change.

It is the kernel's source of truth for audit (`llmos log`), accounting (usage is summed from
the charges on result events) and resume (journaled results are replayed, not re-executed).
A syscall's idempotency key is (pid, seq): its number within its process. A partial unique
index allows at most one result per key, so a side effect can never be recorded twice.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from llmos.kernel.process import Budget, ProcessInfo, State, Usage

SCHEMA = """
CREATE TABLE IF NOT EXISTS boots (
    boot_id TEXT PRIMARY KEY, host_pid INTEGER NOT NULL, started_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS processes (
    pid INTEGER PRIMARY KEY AUTOINCREMENT,
    ppid INTEGER, name TEXT NOT NULL, program TEXT, args TEXT NOT NULL,
    state TEXT NOT NULL, capabilities TEXT NOT NULL, budget TEXT NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0, boot_id TEXT NOT NULL,
    created_at REAL NOT NULL, run_started_at REAL, ended_at REAL,
    wall_time_s REAL NOT NULL DEFAULT 0, result TEXT, error TEXT,
    tainted INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL, pid INTEGER NOT NULL, kind TEXT NOT NULL,
    seq INTEGER, name TEXT, data TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS one_result_per_syscall ON events(pid, seq) WHERE kind = 'result';
CREATE INDEX IF NOT EXISTS events_by_pid ON events(pid, id);
"""

EventKind = Literal["call", "result", "state", "taint"]


class JournalEvent(BaseModel):
    id: int
    ts: float
    pid: int
    kind: EventKind
    seq: int | None
    name: str | None
    data: dict[str, Any]

    @property
    def key(self) -> str:
        """The syscall's idempotency key."""
        return f"{self.pid}:{self.seq}"


class Journal:
    def __init__(self, path: Path, synchronous: str = "normal", *, read_only: bool = False) -> None:
        self.path = path
        if read_only:  # for commands that only look (`llmos ps`): no folder, file or table is made
            uri = f"{path.resolve().as_uri()}?mode=ro"
            self.db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA busy_timeout=10000")
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        # check_same_thread=False: the sync facade's loop thread owns it after boot.
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(f"PRAGMA synchronous={synchronous.upper()}")
        self.db.execute("PRAGMA busy_timeout=10000")
        self.db.executescript(SCHEMA)
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(processes)")}
        if "tainted" not in columns:  # a journal from before taint was journaled
            self.db.execute("ALTER TABLE processes ADD COLUMN tainted INTEGER NOT NULL DEFAULT 0")

    @classmethod
    def open_read_only(cls, path: Path) -> Journal | None:
        """The journal at `path` for commands that only look, or None if no process ever ran there."""
        if not path.is_file():
            return None
        journal = cls(path, read_only=True)
        if not journal.has_table("processes"):  # another part (memory) made the file before any process ran
            journal.close()
            return None
        return journal

    def has_table(self, name: str) -> bool:
        found = self.db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,))
        return found.fetchone() is not None

    def close(self) -> None:
        self.db.close()

    # --- writes -------------------------------------------------------------------------------

    def record_boot(self, boot_id: str, host_pid: int) -> None:
        self.db.execute("INSERT INTO boots VALUES (?, ?, ?)", (boot_id, host_pid, time.time()))

    def create_process(self, info: ProcessInfo, boot_id: str) -> int:
        cursor = self.db.execute(
            "INSERT INTO processes (ppid, name, program, args, state, capabilities, budget, priority,"
            " boot_id, created_at, tainted) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                info.ppid,
                info.name,
                info.program,
                json.dumps(info.args),
                info.state.value,
                json.dumps(info.capabilities),
                info.budget.model_dump_json(),
                info.priority,
                boot_id,
                info.created_at,
                info.tainted,
            ),
        )
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    def set_state(self, pid: int, state: State, *, boot_id: str | None = None, **fields: Any) -> None:
        """Move a process to a new state; fields may set result, error, ended_at, wall_time_s."""
        columns = {"state": state.value, **fields}
        if boot_id is not None:
            columns["boot_id"] = boot_id
            columns["run_started_at"] = time.time()
        if "result" in columns:
            columns["result"] = json.dumps(columns["result"], default=str)
        assignments = ", ".join(f"{column} = ?" for column in columns)
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute(f"UPDATE processes SET {assignments} WHERE pid = ?", (*columns.values(), pid))
            self._append(
                pid, "state", None, None, json.dumps({"state": state.value, "error": fields.get("error")})
            )

    def set_tainted(self, pid: int, seq: int, name: str) -> None:
        """Process `pid` read untrusted data in syscall #seq: from now on it is tainted."""
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute("UPDATE processes SET tainted = 1 WHERE pid = ?", (pid,))
            self._append(pid, "taint", seq, name, "{}")

    def record_call(self, pid: int, seq: int, name: str, args_json: str) -> None:
        self._append(pid, "call", seq, name, f'{{"args": {args_json}}}')

    def record_result(self, pid: int, seq: int, name: str, data: dict[str, Any]) -> None:
        self._append(pid, "result", seq, name, json.dumps(data, default=str))

    def record_call_and_result(
        self, pid: int, seq: int, name: str, args_json: str, data: dict[str, Any]
    ) -> None:
        """Both events of a syscall that finished at once, in one transaction (one commit, not two)."""
        with self.db:
            self.db.execute("BEGIN")
            self.record_call(pid, seq, name, args_json)
            self.record_result(pid, seq, name, data)

    def _append(self, pid: int, kind: EventKind, seq: int | None, name: str | None, data_json: str) -> None:
        self.db.execute(
            "INSERT INTO events (ts, pid, kind, seq, name, data) VALUES (?, ?, ?, ?, ?, ?)",
            (time.time(), pid, kind, seq, name, data_json),
        )

    # --- reads --------------------------------------------------------------------------------

    def process(self, pid: int, *, with_usage: bool = True) -> ProcessInfo | None:
        rows = self._process_rows("WHERE pid = ?", (pid,), with_usage=with_usage)
        return rows[0] if rows else None

    def processes(self, states: list[State] | None = None, *, with_usage: bool = True) -> list[ProcessInfo]:
        if not states:
            return self._process_rows("", (), with_usage=with_usage)
        marks = ", ".join("?" for _ in states)
        return self._process_rows(
            f"WHERE state IN ({marks})", tuple(s.value for s in states), with_usage=with_usage
        )

    def _process_rows(self, where: str, params: tuple[Any, ...], *, with_usage: bool) -> list[ProcessInfo]:
        """Rows of the process table. Summing usage reads every result event of each process, so
        callers that only need state, parent or wall time pass `with_usage=False`."""
        query = (
            "SELECT pid, ppid, name, program, args, state, capabilities, budget, priority, created_at,"
            f" ended_at, wall_time_s, result, error, tainted FROM processes {where} ORDER BY pid"
        )
        rows = self.db.execute(query, params).fetchall()
        usage = self.usage_by_pid([row[0] for row in rows]) if with_usage else {}
        infos = []
        for row in rows:
            pid = row[0]
            process_usage = usage.get(pid, Usage())
            process_usage.wall_time_s = row[11]
            infos.append(
                ProcessInfo(
                    pid=pid,
                    ppid=row[1],
                    name=row[2],
                    program=row[3],
                    args=json.loads(row[4]),
                    state=State(row[5]),
                    capabilities=json.loads(row[6]),
                    budget=Budget.model_validate_json(row[7]),
                    priority=row[8],
                    created_at=row[9],
                    ended_at=row[10],
                    usage=process_usage,
                    result=json.loads(row[12]) if row[12] is not None else None,
                    error=row[13],
                    tainted=bool(row[14]),
                )
            )
        return infos

    def children(self, pid: int, *, with_usage: bool = True) -> list[ProcessInfo]:
        return self._process_rows("WHERE ppid = ?", (pid,), with_usage=with_usage)

    def boot_of(self, pid: int) -> tuple[str, float | None]:
        boot_id, run_started_at = self.db.execute(
            "SELECT boot_id, run_started_at FROM processes WHERE pid = ?", (pid,)
        ).fetchone()
        return boot_id, run_started_at

    def last_event_time(self, pid: int) -> float | None:
        row = self.db.execute("SELECT MAX(ts) FROM events WHERE pid = ?", (pid,)).fetchone()
        return row[0] if row else None

    def events(self, pid: int | None = None, kinds: tuple[EventKind, ...] = ()) -> list[JournalEvent]:
        clauses: list[str] = []
        params: list[Any] = []
        if pid is not None:
            clauses.append("pid = ?")
            params.append(pid)
        if kinds:
            clauses.append(f"kind IN ({', '.join('?' for _ in kinds)})")
            params.extend(kinds)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = self.db.execute(
            f"SELECT id, ts, pid, kind, seq, name, data FROM events {where} ORDER BY id", params
        ).fetchall()
        return [
            JournalEvent(id=r[0], ts=r[1], pid=r[2], kind=r[3], seq=r[4], name=r[5], data=json.loads(r[6]))
            for r in rows
        ]

    def in_flight(self, pids: list[int]) -> dict[int, tuple[str, float]]:
        """pid -> (syscall, when it was called) of the syscall each process is in now, if any."""
        if not pids:
            return {}
        marks = ", ".join("?" for _ in pids)
        rows = self.db.execute(
            f"""SELECT c.pid, c.name, c.ts FROM events c
                WHERE c.kind = 'call' AND c.pid IN ({marks}) AND NOT EXISTS (
                    SELECT 1 FROM events r WHERE r.kind = 'result' AND r.pid = c.pid AND r.seq = c.seq)
                ORDER BY c.id""",
            pids,
        ).fetchall()
        return {pid: (name, ts) for pid, name, ts in rows}  # the latest call of each pid wins

    def completed_results(self, pid: int) -> dict[int, dict[str, Any]]:
        """seq -> result data of every syscall of `pid` that finished, for replay on resume."""
        rows = self.db.execute(
            "SELECT seq, name, data FROM events WHERE pid = ? AND kind = 'result' ORDER BY seq", (pid,)
        ).fetchall()
        return {seq: {"name": name, **json.loads(data)} for seq, name, data in rows}

    def undelivered_messages(self, pid: int) -> list[dict[str, Any]]:
        """Messages sent to `pid` (journaled sends) that its journaled receives have not taken."""
        sent = self.db.execute(
            """SELECT json_extract(r.data, '$.reply.value.id'), json_extract(r.data, '$.reply.value.tainted'),
                      c.pid, c.data, c.ts
               FROM events c JOIN events r ON r.pid = c.pid AND r.seq = c.seq AND r.kind = 'result'
               WHERE c.kind = 'call' AND c.name = 'msg.send' AND json_extract(c.data, '$.args.to') = ?
                 AND json_extract(r.data, '$.reply.ok') ORDER BY c.id""",
            (pid,),
        ).fetchall()
        taken = {
            row[0]
            for row in self.db.execute(
                """SELECT json_extract(data, '$.reply.value.id') FROM events
                   WHERE pid = ? AND kind = 'result' AND name IN ('msg.recv', 'msg.wait')""",
                (pid,),
            )
        }
        return [
            {
                "id": id_,
                "sender": sender,
                "body": json.loads(call)["args"]["body"],
                "sent_at": ts,
                "tainted": bool(tainted),
            }
            for id_, tainted, sender, call, ts in sent
            if id_ not in taken
        ]

    def usage_by_pid(self, pids: list[int]) -> dict[int, Usage]:
        if not pids:
            return {}
        marks = ", ".join("?" for _ in pids)
        rows = self.db.execute(
            f"""SELECT pid,
                   TOTAL(json_extract(data, '$.charge.prompt_tokens')),
                   TOTAL(json_extract(data, '$.charge.completion_tokens')),
                   TOTAL(json_extract(data, '$.charge.reused_prompt_tokens')),
                   TOTAL(json_extract(data, '$.charge.tool_calls')),
                   TOTAL(json_extract(data, '$.charge.sandbox_cpu_s')),
                   COUNT(*)
                FROM events WHERE kind = 'result' AND pid IN ({marks}) GROUP BY pid""",
            pids,
        ).fetchall()
        return {
            pid: Usage(
                tokens=int(prompt + completion),
                prompt_tokens=int(prompt),
                completion_tokens=int(completion),
                reused_prompt_tokens=int(reused),
                tool_calls=int(tools),
                sandbox_cpu_s=cpu,
                syscalls=count,
            )
            for pid, prompt, completion, reused, tools, cpu, count in rows
        }

    def usage_by_backend(self) -> dict[str, Usage]:
        rows = self.db.execute(
            """SELECT json_extract(data, '$.charge.backend') AS backend,
                   TOTAL(json_extract(data, '$.charge.prompt_tokens')),
                   TOTAL(json_extract(data, '$.charge.completion_tokens')),
                   TOTAL(json_extract(data, '$.charge.reused_prompt_tokens')),
                   COUNT(*)
                FROM events WHERE kind = 'result' AND backend IS NOT NULL GROUP BY backend"""
        ).fetchall()
        return {
            backend: Usage(
                tokens=int(prompt + completion),
                prompt_tokens=int(prompt),
                completion_tokens=int(completion),
                reused_prompt_tokens=int(reused),
                syscalls=count,
            )
            for backend, prompt, completion, reused, count in rows
        }
