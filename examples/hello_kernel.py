"""The smallest real end-to-end job: one process asks the local model a question through the kernel.

The answer streams as it is generated; then the process table and the process's syscall trace
show what the kernel checked, charged and journaled. Run: .venv/bin/python examples/hello_kernel.py
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

from rich.console import Console
from rich.text import Text

from llmos import Kernel, Process
from llmos.kernel.trace import trace_lines

console = Console()
QUESTION = "In two sentences: what does an operating system kernel do?"


async def ask(proc: Process, question: str) -> str:
    # The time comes through the kernel too, so a resumed run sees the time it saw before.
    now = time.strftime("%Y-%m-%d %H:%M", time.gmtime((await proc.syscall("clock.now")).unwrap()))
    reply = await proc.syscall(
        "llm.chat",
        messages=[
            {"role": "system", "content": f"You are a concise assistant. It is {now} UTC."},
            {"role": "user", "content": question},
        ],
        max_tokens=120,
    )
    return str(reply.unwrap().text)


def stream(kind: str, data: dict[str, Any]) -> None:
    if kind == "text":
        console.print(data["text"], end="", markup=False, highlight=False)


async def main(question: str) -> int:
    async with Kernel() as kernel:
        console.print(
            Text.assemble(
                ("model: ", "bold"), kernel.config.llm.model, ("   home: ", "bold"), str(kernel.config.home)
            )
        )
        with console.status("loading the model..."):
            await kernel.llm()
        console.print(Text.assemble(("question: ", "bold"), question, ("\nanswer: ", "bold")), end="")
        kernel.listeners.append(stream)
        info = await kernel.run(ask, args={"question": question}, capabilities=["llm"])
        console.print()
        if info.error:
            console.print(Text.assemble(("error: ", "red"), info.error))
            return 1
        usage = info.usage
        console.print(
            f"\n[bold]process {info.pid}[/] {info.state.value}: {usage.prompt_tokens} prompt + "
            f"{usage.completion_tokens} completion tokens, {usage.wall_time_s:.1f}s"
        )
        console.print("[bold]syscall trace[/] (llmos log):")
        for line in trace_lines(kernel.log(info.pid)):
            console.print("  " + line, markup=False, highlight=False)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(" ".join(sys.argv[1:]) or QUESTION)))
