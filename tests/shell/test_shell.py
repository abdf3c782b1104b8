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
        shell.expect(r"approval needed \[2:2\] write_file")  # its first syscall is the model call
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
