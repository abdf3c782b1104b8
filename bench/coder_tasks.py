"""The coder agent on 10 small computational tasks with exact answers, on the default local model.

Prints, per task, whether the answer was right, the tokens and the time; then the count.
Run: .venv/bin/python bench/coder_tasks.py [--model NAME]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmos import Kernel
from llmos.agents.agent import run_agent
from llmos.agents.catalog import CODER
from llmos.config import load_config

TASKS: list[tuple[str, str]] = [
    ("What is the sum of the squares of the integers from 1 to 20?", "2870"),
    ("What is the 15th Fibonacci number, if the 1st and 2nd are both 1?", "610"),
    ("How many prime numbers are there below 100?", "25"),
    ("What is the sum of the decimal digits of 2**100?", "115"),
    ("What is 10 factorial?", "3628800"),
    ("How many times does the letter 's' occur in the word 'mississippi'?", "4"),
    ("What is the greatest common divisor of 1071 and 462?", "21"),
    ("How many days lie between the dates 2024-01-01 and 2024-12-31 (their difference in days)?", "365"),
    ("What is the string 'llmos kernel' reversed?", "lenrek somll"),
    ("How many integers from 1 to 1000 (inclusive) are divisible by 3 or by 5?", "467"),
]  # fmt: skip


def normalise(answer: str) -> str:
    return answer.strip().strip("'\"`").rstrip(".").strip()


async def main(model: str | None) -> dict[str, float | int | str]:
    with tempfile.TemporaryDirectory() as home:
        overrides = {"llm": {"model": model}} if model else {}
        config = load_config(env={**os.environ, "LLMOS_HOME": home}, **overrides)
        spec = CODER.model_dump()
        solved = tokens = 0
        started = time.monotonic()
        async with Kernel(config) as kernel:
            await kernel.llm()
            for task, expected in TASKS:
                t0 = time.monotonic()
                args = {"spec": spec, "task": task}
                info = await kernel.run(run_agent, args=args, capabilities=["llm", "tool:*"])
                answer = normalise(str(info.result)) if info.result is not None else f"({info.error})"
                right = answer == expected
                solved += right
                tokens += info.usage.tokens
                print(
                    f"{'ok  ' if right else 'MISS'} {time.monotonic() - t0:5.1f}s {info.usage.tokens:5d} tok "
                    f"{info.usage.tool_calls} calls  {task[:60]!r} -> {answer[:40]!r} (expected {expected})",
                    flush=True,
                )
        return {
            "model": config.llm.model,
            "sandbox": config.sandbox.backend,
            "solved": solved,
            "tasks": len(TASKS),
            "tokens": tokens,
            "seconds": round(time.monotonic() - started, 1),
        }


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    figures = asyncio.run(main(parser.parse_args().model))
    print(f"solved {figures['solved']} of {figures['tasks']} (target: at least 8)")
    print(json.dumps(figures))
