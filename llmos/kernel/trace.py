"""A process's syscalls as text, like strace prints them (`llmos log`, the shell's /log)."""

from __future__ import annotations

import json
import time
from typing import Any

from llmos.kernel.journal import Journal, JournalEvent


def short(value: Any, limit: int = 120) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def doing_now(journal: Journal, pids: list[int]) -> dict[int, str]:
    """pid -> the syscall it is in and for how long ("llm.chat 3s"), as `ps` and `/top` show it."""
    now = time.time()
    return {pid: f"{name} {now - ts:.0f}s" for pid, (name, ts) in journal.in_flight(pids).items()}


def trace_lines(events: list[JournalEvent]) -> list[str]:
    """A process's syscalls as strace prints them: call, result, and how long it took."""
    if not events:
        return []
    start = events[0].ts
    calls = {event.seq: event for event in events if event.kind == "call"}
    lines = []
    for event in events:
        offset = f"+{event.ts - start:8.3f}s"
        if event.kind == "state":
            error = f" ({event.data['error']})" if event.data.get("error") else ""
            lines.append(f"{offset}  --- {event.data['state']}{error} ---")
        elif event.kind == "taint":
            lines.append(f"{offset}  --- tainted: #{event.seq} {event.name} returned untrusted data ---")
        elif event.kind == "result":
            call = calls.get(event.seq)
            args = ", ".join(f"{k}={short(v, 60)}" for k, v in (call.data["args"] if call else {}).items())
            reply = event.data["reply"]
            outcome = (
                f"ok {short(reply['value'])}"
                if reply["ok"]
                else f"error[{reply['error']['code']}] {reply['error']['message']}"
            )
            took = f"<{(event.ts - call.ts) * 1000:.1f}ms>" if call else ""
            lines.append(f"{offset}  #{event.seq} {event.name}({args}) = {outcome} {took}")
    unfinished = {seq for seq in calls if seq is not None} - {e.seq for e in events if e.kind == "result"}
    for seq in sorted(unfinished):
        call = calls[seq]
        lines.append(
            f"+{call.ts - start:8.3f}s  #{seq} {call.name}({short(call.data['args'])}) = ? <no result>"
        )
    return lines
