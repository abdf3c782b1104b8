"""Text from a model, a tool or a user is printed as it is by `llmos run` and `llmos log`: never as markup.

The model is the scripted fake (named so: this tests what the command prints, not the model);
the command, the kernel and the file tools are real.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

LLMOS = Path(sys.executable).with_name("llmos")

# Each is mangled by rich markup: brackets eaten, or a MarkupError for the closing tag.
TRICKY = ["def f(x: list[str]) -> dict[str, int]", "see [link] and [red]", "a[/b]", "thumbs :thumbs_up:"]


def llmos(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}  # events fit on one line each
    return subprocess.run([str(LLMOS), *args], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("text", TRICKY)
def test_run_prints_the_answer_the_tool_result_and_the_trace_verbatim(tmp_path: Path, text: str) -> None:
    script = tmp_path / "script.json"
    replies = [
        {"tool": "write_file", "arguments": {"path": "note.txt", "content": text}},
        {"tool": "read_file", "arguments": {"path": "note.txt"}},
        {"tool": "final_answer", "arguments": {"answer": text}},
    ]
    script.write_text(json.dumps(replies))
    result = llmos("run", "--agent", "assistant", "--model", f"scripted:{script}", "keep a note")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1] == text  # the answer, as the model gave it
    assert f"answer: {text}" in lines  # the agent's answer event
    assert f"content: {text}" in lines  # the read_file tool's result event
    assert any(line.startswith("write_file(") and json.dumps(text) in line for line in lines)  # the call

    trace = llmos("log", "1")
    assert trace.returncode == 0, trace.stderr
    assert json.dumps(text) in trace.stdout  # the write_file call's arguments, as journaled


def test_config_show_prints_values_verbatim(monkeypatch: pytest.MonkeyPatch) -> None:
    value = "thumbs :thumbs_up: and [red]"
    monkeypatch.setenv("LLMOS_LLM__MODEL", value)
    shown = llmos("config", "show")
    assert shown.returncode == 0, shown.stderr
    assert f"model = {json.dumps(value)}" in shown.stdout.splitlines()
