"""A coder and a reviewer (an AutoGen round-robin team) as llmos processes, on the local model.

    .venv/bin/python examples/team.py [--model qwen2.5-coder-0.5b-instruct] [--max-turns 4]

The team is one process and each member a child process: their model calls are syscalls,
charged to the member that made them. The members' text is printed as it is generated.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from llmos import Kernel
from llmos.agents.autogen import MemberSpec, TeamSpec, run_team
from llmos.kernel import State

TASK = (
    "Write a Python function is_palindrome(text: str) -> bool that ignores case and spaces. "
    "Reply with the code only."
)
CODER = "You are a Python programmer. Answer with one short Python code block and nothing else."
REVIEWER = (
    "You review Python code. If the code is correct, reply with the single word APPROVE. "
    "Otherwise say in one sentence what to fix."
)


class Printer:
    """Prints each member's text as it streams, with a header when the speaker changes."""

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self.speaking: int | None = None

    def __call__(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "text":
            if self.speaking != data["pid"]:
                self.speaking = data["pid"]
                name = self.kernel.process(data["pid"]).name
                print(f"\n--- {name} (pid {data['pid']})", flush=True)
            print(data["text"], end="", flush=True)
        elif kind == "team.message" and data["source"] == "user":
            print(f"--- task\n{data['content']}", flush=True)


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="catalog name or .gguf path")
    parser.add_argument("--max-turns", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=160, help="per model call")
    options = parser.parse_args()

    spec = TeamSpec(
        kind="round_robin",
        model=options.model,
        members=[
            MemberSpec(name="coder", system_message=CODER, description="writes the code"),
            MemberSpec(name="reviewer", system_message=REVIEWER, description="reviews the code"),
        ],
        max_turns=options.max_turns,
        max_tokens=options.max_tokens,
        termination_text="APPROVE",
    )
    async with Kernel() as kernel:
        kernel.listeners.append(Printer(kernel))
        print(f"loading {options.model} ...", flush=True)
        info = await run_team(kernel, spec, TASK)
        print("\n")
        if info.result is None:
            print(f"the team {info.state.value}: {info.error}", file=sys.stderr)
            return 1
        print(f"stopped: {info.result['stop_reason']}")
        print(f"{'PID':>4} {'PPID':>4} {'NAME':<10} {'STATE':<8} {'TOKENS':>7} {'LLM CALLS':>9}")
        for row in kernel.ps():
            if row.pid != info.pid and row.ppid != info.pid:
                continue  # earlier runs in the same LLMOS_HOME
            calls = sum(1 for e in kernel.log(row.pid) if e.kind == "result" and e.name == "llm.chat")
            ppid = "" if row.ppid is None else str(row.ppid)
            state, tokens = row.state.value, row.usage.tokens
            print(f"{row.pid:>4} {ppid:>4} {row.name:<10} {state:<8} {tokens:>7} {calls:>9}")
        return 0 if info.state == State.DONE else 1


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
