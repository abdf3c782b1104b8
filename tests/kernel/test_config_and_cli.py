"""Config precedence and errors; the `llmos` command's ps, log, config show and --version."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmos import Kernel
from llmos.cli import app
from llmos.config import ConfigError, load_config
from llmos.kernel import Process


def test_defaults_work_offline_and_home_comes_from_the_environment(tmp_path: Path) -> None:
    config = load_config(env={"LLMOS_HOME": str(tmp_path)})
    assert config.home == tmp_path and config.llm.base_url is None
    assert config.llm.model == "qwen2.5-coder-0.5b-instruct"
    assert config.journal_path == tmp_path / "journal.sqlite3"


def test_environment_overrides_the_file_which_overrides_defaults(tmp_path: Path) -> None:
    file = tmp_path / "config.toml"
    file.write_text(
        '[llm]\nmodel = "smollm2-135m-instruct"\nn_ctx = 2048\n[sandbox]\nbackend = "namespace"\n'
    )
    env = {"LLMOS_CONFIG": str(file), "LLMOS_LLM__N_CTX": "8192"}
    config = load_config(env=env)
    assert config.llm.model == "smollm2-135m-instruct"
    assert config.llm.n_ctx == 8192
    assert config.sandbox.backend == "namespace"


@pytest.mark.parametrize(
    ("env", "file_text", "expected"),
    [
        ({"LLMOS_LLM__N_CTX": "lots"}, "", "Bad config value llm.n_ctx='lots' (from LLMOS_LLM__N_CTX)"),
        ({}, '[sandbox]\nbackend = "chroot"\n', "Bad config value sandbox.backend='chroot'"),
        ({"LLMOS_LLM__MODLE": "x"}, "", "Unknown config key 'llm.modle' (from LLMOS_LLM__MODLE)"),
        ({}, "[llm\n", "is not valid TOML"),
    ],
)
def test_a_bad_value_stops_with_one_sentence(
    tmp_path: Path, env: dict[str, str], file_text: str, expected: str
) -> None:
    file = tmp_path / "config.toml"
    file.write_text(file_text)
    with pytest.raises(ConfigError) as caught:
        load_config(env={"LLMOS_CONFIG": str(file), **env})
    message = str(caught.value)
    assert expected in message and "\n" not in message
    if "backend" in expected:
        assert "'docker'" in message  # says what is allowed


def test_cli_version_ps_log_and_config_show(llmos_home: Path) -> None:
    async def program(proc: Process) -> None:
        await proc.syscall("noop")
        await proc.syscall("sleep", seconds="never")

    async def run() -> int:
        async with Kernel() as kernel:
            return (await kernel.run(program)).pid

    pid = asyncio.run(run())
    runner = CliRunner()
    assert runner.invoke(app, ["--version"]).output.startswith("llmos ")
    listing = runner.invoke(app, ["ps", "--all"])
    assert listing.exit_code == 0 and "program" in listing.output and "done" in listing.output
    trace = runner.invoke(app, ["log", str(pid)])
    assert trace.exit_code == 0
    assert "#1 noop() = ok" in trace.output
    assert '#2 sleep(seconds="never") = error[invalid_args]' in trace.output
    assert runner.invoke(app, ["log", "42"]).exit_code == 1
    shown = runner.invoke(app, ["config", "show"])
    assert shown.exit_code == 0 and "[llm]" in shown.output and str(llmos_home) in shown.output


def test_ps_shows_the_syscall_a_running_process_is_in(llmos_home: Path) -> None:
    async def napper(proc: Process) -> None:
        await proc.syscall("sleep", seconds=30)

    async def run() -> str:
        async with Kernel() as kernel:
            pid = await kernel.spawn(napper)
            await asyncio.sleep(0.3)
            # Another terminal's `llmos ps`: it reads the journal while the kernel runs.
            listing = await asyncio.to_thread(CliRunner().invoke, app, ["ps"])
            await kernel.kill(pid)
            return f"{pid} {listing.output}"

    output = asyncio.run(run())
    pid, _, table = output.partition(" ")
    row = next(line for line in table.splitlines() if line.split()[:1] == [pid])
    assert "napper" in row and "sleep 0s" in row, table


def test_prune_deletes_old_workspaces_of_finished_processes_only(llmos_home: Path) -> None:
    async def write(proc: Process, path: str, content: str) -> None:
        args = {"path": path, "content": content}
        (await proc.syscall("tool.call", name="write_file", arguments=args)).unwrap()

    async def writer(proc: Process) -> None:
        await write(proc, "out.txt", "x" * 5000)

    async def napper(proc: Process) -> None:
        await write(proc, "notes.txt", "keep me")
        await proc.syscall("sleep", seconds=30)

    async def run() -> tuple[int, int]:
        async with Kernel() as kernel:
            done = (await kernel.run(writer)).pid
            running = await kernel.spawn(napper)
            await asyncio.sleep(0.2)
        return done, running  # the napper is interrupted by the shutdown: resumable, so kept

    done, interrupted = asyncio.run(run())
    runner = CliRunner()
    kept = runner.invoke(app, ["prune"])  # ended seconds ago: younger than 7 days
    assert kept.exit_code == 0 and "0 workspaces" in kept.output
    dry = runner.invoke(app, ["prune", "--days", "0", "--dry-run"])
    assert "1 workspaces" in dry.output and "would free" in dry.output
    assert (llmos_home / "workspaces" / str(done)).is_dir()
    pruned = runner.invoke(app, ["prune", "--days", "0"])
    assert pruned.exit_code == 0 and "1 workspaces" in pruned.output and "freed" in pruned.output
    assert not (llmos_home / "workspaces" / str(done)).exists()
    assert (llmos_home / "workspaces" / str(interrupted) / "notes.txt").read_text() == "keep me"
