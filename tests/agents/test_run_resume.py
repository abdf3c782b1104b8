"""`llmos run` killed with SIGKILL mid-task; `llmos resume PID` finishes without re-running tool calls.

The model is a scripted fake (named so) that replies by turn, so the test is exact; the tools,
the journal and the two OS processes are real.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

SCRIPT = {
    "delay_s": 1.0,
    "replies": [
        {"tool": "write_file", "arguments": {"path": "log.txt", "content": "one\n", "append": True}},
        {"tool": "write_file", "arguments": {"path": "log.txt", "content": "two\n", "append": True}},
        {"tool": "final_answer", "arguments": {"answer": "wrote two lines"}},
    ],
}


def test_sigkill_then_resume_does_not_repeat_finished_tool_calls(tmp_path: Path, llmos_home: Path) -> None:
    script = tmp_path / "script.json"
    script.write_text(json.dumps(SCRIPT))
    llmos = [sys.executable, "-m", "llmos"]
    model = ["--model", f"scripted:{script}"]
    command = [*llmos, "run", "--agent", "assistant", *model, "write two lines"]
    run = subprocess.Popen(command, env=os.environ.copy())
    log = llmos_home / "workspaces" / "1" / "log.txt"
    deadline = time.monotonic() + 60
    while not (log.exists() and log.read_text() == "one\ntwo\n"):
        assert time.monotonic() < deadline and run.poll() is None, "the run never wrote its two lines"
        time.sleep(0.02)
    run.send_signal(signal.SIGKILL)  # now it waits for the model's third turn
    run.wait()

    listing = subprocess.run([*llmos, "ps"], capture_output=True, text=True, check=True)
    assert "interrupted" in listing.stdout
    resumed = subprocess.run([*llmos, "resume", "1"], capture_output=True, text=True, timeout=60)
    assert resumed.returncode == 0, resumed.stderr
    assert "wrote two lines" in resumed.stdout
    assert f"its files (1): {log.parent}" in resumed.stdout
    assert log.read_text() == "one\ntwo\n"  # neither write ran again
    trace = subprocess.run([*llmos, "log", "1"], capture_output=True, text=True, check=True).stdout
    assert trace.count("tool.call(") == 2
