"""`llmos shell` driven in a pseudo-terminal, with a scripted fake LLM (named so: this tests the UI)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pexpect

SCRIPT = [
    {"tool": "write_file", "arguments": {"path": "note.txt", "content": "hello"}},
    {"tool": "final_answer", "arguments": {"answer": "wrote note.txt"}},
    {"tool": "write_file", "arguments": {"path": "background.txt", "content": "x"}},
]


def test_shell_runs_a_task_lists_approves_and_kills(tmp_path: Path, llmos_home: Path) -> None:
    script = tmp_path / "script.json"
    script.write_text(json.dumps(SCRIPT))
    env = {
        **os.environ,
        "LLMOS_POLICY__WRITE": "ask",
        "TERM": "xterm",
        "NO_COLOR": "1",
        "COLUMNS": "160",
        "PROMPT_TOOLKIT_NO_CPR": "1",
    }
    shell = pexpect.spawn(
        sys.executable, ["-m", "llmos", "shell", "--agent", "assistant", "--model", f"scripted:{script}"],
        env=env, encoding="utf-8", timeout=30, dimensions=(50, 160),
    )  # fmt: skip
    try:
        shell.expect("llmos>")
        shell.sendline("write a note for me")
        shell.expect('"write_file"')  # the model's output, streamed as it comes
        shell.expect(r"approve write_file\? \[y/N\]")
        shell.sendline("y")
        shell.expect(r"answer:\S* wrote note.txt")
        shell.expect("llmos>")
        assert (llmos_home / "workspaces" / "1" / "note.txt").read_text() == "hello"

        shell.sendline("/ps")
        shell.expect(r"1\s+-\s+assistant\s+done")

        shell.sendline("/spawn write in the background")
        shell.expect(r"approval needed \[2:3\] write_file")  # after tool.list and the model call
        shell.sendline("/ps")
        shell.expect(r"2\s+-\s+assistant\s+blocked-on-approval")
        shell.sendline("/top 0.5")  # NOW: the syscall it waits in
        shell.expect(r"2\W+assistant\W+blocked-on-approval\W+tool\.call \d+s")
        shell.sendline("/kill 2")
        shell.expect("process 2 killed")
        shell.sendline("/ps -a")
        shell.expect(r"2\s+-\s+assistant\s+killed")
        assert not (llmos_home / "workspaces" / "2" / "background.txt").exists()

        shell.sendline("/exit")
        shell.expect(pexpect.EOF)
    finally:
        shell.close(force=True)


TRICKY = "def f(x: list[str]) -> dict[str, int] ~ see [link] and [red] ~ a[/b] ~ :thumbs_up:"

TYPOS = [  # what a person might type, and the start of the shell's one-line answer
    ("/model nosuch", "Unknown model 'nosuch'"),
    ("/kill", "usage: /kill PID"),
    ("/kill abc", "usage: /kill PID"),
    ("/kill 99", "No process 99;"),
    ("/kill 1", "process 1 has already ended (done)"),
    ("/top abc", "usage: /top [SECONDS]"),
    ("/top -1", "usage: /top [SECONDS]"),
    ("/agents nosuch", "No agent named 'nosuch'; the agents are: coder, assistant, researcher."),
    ("/agents a b", "usage: /agents [NAME]"),
    ("/log", "usage: /log PID"),
    ("/log 99", "No process 99;"),
    ("/ps -z", "usage: /ps [-a]"),
    ("/approve k maybe", "usage: /approve [KEY [yes|no]]"),
    ("/approve nokey", "No pending approval 'nokey'"),
    ("/approve", "no approval is pending"),
    ("/spawn", "usage: /spawn TASK"),
    ('/spawn "unclosed', "No closing quotation"),
    ("/tools x", "usage: /tools"),
    ("/nosuch", "unknown command /nosuch"),
]


def test_shell_prints_text_verbatim_and_never_dies_of_a_typo(tmp_path: Path, llmos_home: Path) -> None:
    script = tmp_path / "[red]" / "script.json"  # a model named by a user, shown as it is
    script.parent.mkdir()
    script.write_text(
        json.dumps(
            [
                {"tool": "write_file", "arguments": {"path": "note.txt", "content": TRICKY}},
                {"tool": "read_file", "arguments": {"path": "note.txt"}},
                {"tool": "final_answer", "arguments": {"answer": TRICKY}},
            ]
        )
    )
    env = {**os.environ, "TERM": "xterm", "NO_COLOR": "1", "COLUMNS": "160", "PROMPT_TOOLKIT_NO_CPR": "1"}
    shell = pexpect.spawn(
        sys.executable, ["-m", "llmos", "shell", "--agent", "assistant", "--model", f"scripted:{script}"],
        env=env, encoding="utf-8", timeout=30, dimensions=(50, 160),
    )  # fmt: skip
    try:
        shell.expect_exact(f"model scripted:{script}")
        shell.expect("llmos>")
        shell.sendline("keep a note")
        shell.expect_exact(f"content: {TRICKY}")  # the tool's result
        shell.expect(r"answer:\S* ")
        shell.expect_exact(TRICKY)  # the model's answer
        shell.expect("llmos>")
        shell.sendline("/log 1")
        shell.expect_exact(json.dumps(TRICKY)[:50])  # the trace cuts arguments at 60 characters
        shell.expect("llmos>")

        for typed, answer in TYPOS:
            shell.sendline(typed)
            shell.expect_exact(answer)
            shell.expect("llmos>")
        shell.sendline("/model")  # still the model it had: the failed switch changed nothing
        shell.expect_exact(f"model: scripted:{script}")
        shell.expect("llmos>")
        shell.sendline("/exit")
        shell.expect(pexpect.EOF)
    finally:
        shell.close(force=True)
    assert "Traceback" not in (shell.before or "")
    assert shell.exitstatus == 0
