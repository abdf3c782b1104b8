"""The coder: solves a task by writing Python that runs in the sandbox, on the default local model.

Run: .venv/bin/python examples/coder.py "How many primes are there below 1000?"
"""

from __future__ import annotations

import sys

from rich.console import Console
from rich.text import Text

from llmos import Agent
from llmos.agents.render import EventPrinter

TASK = "What is the sum of all the prime numbers below 1000?"


def main(task: str) -> int:
    console = Console(highlight=False)
    console.print(Text.assemble(("task: ", "bold"), task))
    coder = Agent("coder")  # its python tool is one of the kernel's built-in tools
    result = coder.run(task, on_event=EventPrinter(console, stream_text=False))
    console.print(f"[dim]{result.usage.tokens} tokens, {result.usage.tool_calls} tool calls[/]")
    if not result.ok:
        console.print(f"failed: {result.error}", style="red", markup=False)
        return 1
    console.print(result.answer, style="bold green", markup=False)
    return 0


if __name__ == "__main__":
    sys.exit(main(" ".join(sys.argv[1:]) or TASK))
