"""Programs the kernel tests run. Module-level, so a resumed kernel can import them again."""

from __future__ import annotations

from pathlib import Path

from llmos.kernel.process import Process
from llmos.tools.registry import Risk, tool


@tool(risk=Risk.WRITE)
def append_line(path: str, text: str) -> int:
    """Append a line to a file (a side effect that must never run twice).

    Args:
        path: the file to append to.
        text: the line.
    """
    with Path(path).open("a") as handle:
        handle.write(text + "\n")
    return len(Path(path).read_text().splitlines())


async def three_appends(proc: Process, path: str, pause_s: float) -> list[int]:
    """Append 'one' and 'two', pause, then append 'three'."""
    counts = []
    for text in ("one", "two"):
        reply = await proc.syscall("tool.call", name="append_line", arguments={"path": path, "text": text})
        counts.append(reply.unwrap()["content"])
    await proc.syscall("sleep", seconds=pause_s)
    reply = await proc.syscall("tool.call", name="append_line", arguments={"path": path, "text": "three"})
    counts.append(reply.unwrap()["content"])
    return counts


async def parent_of_sleepers(proc: Process, children: int) -> None:
    for _ in range(children):
        (await proc.syscall("proc.spawn", program=f"{__name__}:sleeper")).unwrap()
    await proc.syscall("sleep", seconds=3600)


async def sleeper(proc: Process) -> None:
    await proc.syscall("sleep", seconds=3600)
