"""Every mistake a user can make with the `llmos` command ends in one sentence, not a traceback.

Each test runs the installed `llmos` entry point in a subprocess, so a traceback printed by the
entry point itself would show. Exit codes: 2 for a configuration or usage mistake (as typer does
for a bad option), 1 for everything else a user must fix.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

LLMOS = Path(sys.executable).with_name("llmos")
PS_COLUMNS = ["PID", "PPID", "NAME", "STATE", "TRUST", "NOW", "TOKENS", "TOOLS", "SYSCALLS", "TIME"]


def llmos(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real command, with this test's LLMOS_HOME and LLMOS_CONFIG (from the autouse fixture)."""
    return subprocess.run(
        [str(LLMOS), *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def one_sentence(result: subprocess.CompletedProcess[str], exit_code: int) -> str:
    """The error line, after checking it is the only thing on stderr and the exit code is right."""
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    assert result.returncode == exit_code, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


# --- configuration ---------------------------------------------------------------------------


def test_llmos_config_naming_a_folder(tmp_path: Path) -> None:
    line = one_sentence(llmos("ps", env={"LLMOS_CONFIG": str(tmp_path)}), 2)
    assert f"Config file {tmp_path} (from LLMOS_CONFIG) is a folder" in line


def test_a_config_file_that_is_not_utf8(tmp_path: Path) -> None:
    latin1 = tmp_path / "config.toml"
    latin1.write_bytes('[llm]\nmodel = "café"\n'.encode("latin-1"))
    line = one_sentence(llmos("ps", env={"LLMOS_CONFIG": str(latin1)}), 2)
    assert f"Config file {latin1} (from LLMOS_CONFIG) is not UTF-8 text" in line
    assert "save it as UTF-8" in line


def test_llmos_config_naming_a_missing_file_is_not_ignored(tmp_path: Path) -> None:
    missing = tmp_path / "typo.toml"
    line = one_sentence(llmos("ps", env={"LLMOS_CONFIG": str(missing)}), 2)
    assert f"Config file {missing} (from LLMOS_CONFIG) does not exist" in line


def test_the_default_config_file_may_be_missing(tmp_path: Path) -> None:
    result = llmos("ps", env={"LLMOS_CONFIG": "", "XDG_CONFIG_HOME": str(tmp_path / "none")})
    assert result.returncode == 0 and "PID" in result.stdout, result.stderr


def test_llmos_home_naming_a_file(tmp_path: Path) -> None:
    file = tmp_path / "home"
    file.write_text("not a folder")
    line = one_sentence(llmos("ps", env={"LLMOS_HOME": str(file)}), 2)
    assert f"home = {file} (from LLMOS_HOME) is a file; point it at a folder." in line
    under = one_sentence(llmos("ps", env={"LLMOS_HOME": str(file / "state")}), 2)
    assert f"is under {file}, which is a file" in under


def test_an_unknown_llmos_variable_is_warned_about_once_and_ignored(tmp_path: Path) -> None:
    script = tmp_path / "script.json"
    script.write_text(json.dumps([{"tool": "final_answer", "arguments": {"answer": "42"}}]))
    env = {"LLMOS_DEBUG": "1", "LLMOS_TEST_DOCKER_HOST": "unix:///nowhere.sock", "LLMOS_LLM_MODEL": "x"}
    result = llmos("run", "--agent", "assistant", "--model", f"scripted:{script}", "answer", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "42"
    warnings = result.stderr.splitlines()
    assert warnings.count("warning: LLMOS_DEBUG is not an llmos setting; ignored.") == 1
    assert any(
        line.startswith("warning: LLMOS_LLM_MODEL is not") and "LLMOS_LLM__KEY" in line for line in warnings
    )
    assert "LLMOS_TEST_DOCKER_HOST" not in result.stderr  # the project's own: read by the sandbox tests
    assert len(warnings) == 2


def test_a_typo_in_a_key_of_a_known_section_still_stops() -> None:
    line = one_sentence(llmos("ps", env={"LLMOS_LLM__MODLE": "x"}), 2)
    assert "Unknown config key 'llm.modle' (from LLMOS_LLM__MODLE)" in line


# --- read-only commands on a fresh home --------------------------------------------------------


def test_read_only_commands_on_a_fresh_home_answer_and_create_nothing(llmos_home: Path) -> None:
    listing = llmos("ps", "--all")
    assert listing.returncode == 0 and listing.stderr == "", listing.stderr
    assert listing.stdout.split() == PS_COLUMNS  # an empty table
    pending = llmos("approvals")
    assert pending.returncode == 0 and pending.stdout.split()[:2] == ["KEY", "PID"], pending.stderr
    pruned = llmos("prune", "--days", "0")
    assert pruned.returncode == 0 and pruned.stdout.startswith("0 workspaces"), pruned.stderr
    assert "No process 1;" in one_sentence(llmos("log", "1"), 1)
    assert "No process 7;" in one_sentence(llmos("resume", "7"), 1)
    assert "No pending approval 'abc'" in one_sentence(llmos("approve", "abc"), 1)
    memory = llmos("memory", "search", "anything")
    assert memory.returncode == 0 and "no matching memories" in memory.stdout, memory.stderr
    stats = llmos("memory", "stats")
    assert stats.returncode == 0 and "records: 0" in stats.stdout, stats.stderr
    assert not llmos_home.exists()


def test_ps_reads_a_journal_that_another_part_made_before_any_process_ran(llmos_home: Path) -> None:
    llmos_home.mkdir()
    # What memory made on its first use before it wrote through the kernel (its page-out table).
    db = sqlite3.connect(llmos_home / "journal.sqlite3")
    db.execute("CREATE TABLE pageouts (id INTEGER PRIMARY KEY, window TEXT NOT NULL)")
    db.close()
    listing = llmos("ps")
    assert listing.returncode == 0 and listing.stdout.split()[:3] == ["PID", "PPID", "NAME"], listing.stderr
    assert "No process 1;" in one_sentence(llmos("log", "1"), 1)


# --- arguments ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["prune", "--days", "-1"], "Invalid value for '--days': Input should be greater than or equal to 0"),
        (["log", "abc"], "Invalid value for 'pid': Input should be a valid integer"),
        (["resume", "abc"], "Invalid value for 'pid': Input should be a valid integer"),
        (["run", "--agent", "nosuch", "hi"], "No agent named 'nosuch'"),
        (["run", "--max-steps", "0", "hi"], "Invalid value for '--max-steps': Input should be greater"),
    ],
)
def test_bad_arguments_are_refused_with_a_usage_error(args: list[str], expected: str) -> None:
    result = llmos(*args)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert expected in " ".join(result.stderr.replace("│", " ").split())


def test_memory_export_into_a_missing_folder(tmp_path: Path) -> None:
    target = tmp_path / "missing" / "dir" / "memory.jsonl"
    line = one_sentence(llmos("memory", "export", "-o", str(target)), 1)
    assert f"the folder {target.parent} does not exist; create it first." in line
    into_folder = one_sentence(llmos("memory", "export", "-o", str(tmp_path)), 1)
    assert "it is a folder" in into_folder


# --- resume ------------------------------------------------------------------------------------


def test_resume_of_a_finished_process_says_so_before_loading_a_model(tmp_path: Path) -> None:
    script = tmp_path / "script.json"
    script.write_text(json.dumps([{"tool": "final_answer", "arguments": {"answer": "done"}}]))
    ran = llmos("run", "--agent", "assistant", "--model", f"scripted:{script}", "finish")
    assert ran.returncode == 0, ran.stderr
    script.unlink()  # the model can no longer load: only the journal can answer now
    result = llmos("resume", "1")
    line = one_sentence(result, 1)
    assert "Process 1 is done; only an interrupted process can be resumed." in line
    assert "loading model" not in result.stdout


# --- extras ------------------------------------------------------------------------------------


def test_a_local_model_without_the_local_extra_names_the_extra(tmp_path: Path) -> None:
    # A llama_cpp that cannot be imported, first on the path: as if llama-cpp-python were not installed.
    stand_in = tmp_path / "site" / "llama_cpp"
    stand_in.mkdir(parents=True)
    (stand_in / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'llama_cpp'\", name='llama_cpp')\n"
    )
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(stand_in.parent), os.environ.get("PYTHONPATH")]))}
    line = one_sentence(llmos("run", "--model", "smollm2-135m-instruct", "hi", env=env), 1)
    assert "pip install 'llmos[local]'" in line and "smollm2-135m-instruct" in line


def test_a_scripted_model_file_that_is_missing(tmp_path: Path) -> None:
    missing = tmp_path / "script.json"
    line = one_sentence(llmos("run", "--model", f"scripted:{missing}", "hi"), 1)
    assert f"Scripted model {missing} cannot be read (FileNotFoundError" in line
