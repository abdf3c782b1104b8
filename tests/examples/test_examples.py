"""Each example agent runs with one command on the default local model and gets its task right."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize(
    ("script", "args", "expected"),
    [
        ("coder.py", ["What is the sum of the decimal digits of 2**100?"], "115"),
        ("researcher.py", [], "1871 [sources: lighthouse.txt]"),
        ("api_agent.py", [], "37"),
    ],
)
def test_example_agent(script: str, args: list[str], expected: str) -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        env=os.environ.copy(), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert expected in done.stdout.strip().splitlines()[-1]
