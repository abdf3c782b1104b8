"""Sessions behave like notebook kernels on every backend; choosing a backend fails clearly."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmos.config import Config, SandboxConfig, SandboxLimits
from llmos.sandbox import SandboxError, SandboxUnavailable, open_sandbox
from llmos.sandbox.base import Sandbox
from llmos.sandbox.cli import app
from llmos.sandbox.namespace import NamespaceSandbox
from llmos.sandbox.subprocess import SubprocessSandbox


async def test_variables_persist_between_calls(sandbox: Sandbox) -> None:
    first = await sandbox.exec("s", "x = 40\nprint('set')")
    second = await sandbox.exec("s", "x += 2\nx")
    assert (first.stdout, first.value, first.error) == ("set\n", None, None)
    assert second.value == "42" and not second.restarted


async def test_sessions_are_separate(sandbox: Sandbox) -> None:
    await sandbox.exec("a", "secret = 1")
    other = await sandbox.exec("b", "'secret' in globals()")
    assert other.value == "False"


async def test_final_expression_value(sandbox: Sandbox) -> None:
    assert (await sandbox.exec("s", "[1, 2][-1]")).value == "2"
    assert (await sandbox.exec("s", "None")).value is None
    assert (await sandbox.exec("s", "y = 3")).value is None
    assert (await sandbox.exec("s", "'text'")).value == "'text'"


async def test_errors_come_back_as_data(sandbox: Sandbox) -> None:
    raised = await sandbox.exec("s", "def f():\n    return 1 / 0\nf()")
    assert raised.exit_status == 1 and raised.error is not None
    assert "ZeroDivisionError" in raised.error and "return 1 / 0" in raised.error
    assert "worker.py" not in raised.error  # only the model's own frames
    syntax = await sandbox.exec("s", "def (")
    assert syntax.error is not None and "SyntaxError" in syntax.error
    exited = await sandbox.exec("s", "raise SystemExit(3)")
    assert exited.error is not None and "SystemExit" in exited.error and not exited.restarted
    odd = await sandbox.exec("s", "raise ValueError('\\udc80 not utf-8')")
    assert odd.error is not None and "not utf-8" in odd.error and not odd.restarted
    assert (await sandbox.exec("s", "'alive'")).value == "'alive'"


async def test_changed_files_are_listed(sandbox: Sandbox) -> None:
    made = await sandbox.exec(
        "s", "import os\nos.makedirs('out', exist_ok=True)\nopen('out/a.txt', 'w').write('a')"
    )
    assert made.files == ["out/a.txt"]
    assert (sandbox.workspace("s") / "out" / "a.txt").read_text() == "a"
    untouched = await sandbox.exec("s", "open('out/a.txt').read()")
    assert untouched.files == [] and untouched.value == "'a'"
    changed = await sandbox.exec("s", "open('out/a.txt', 'a').write('bb'); open('b.txt', 'w').write('')")
    assert changed.files == ["b.txt", "out/a.txt"]


async def test_timeout_kills_and_restarts(sandbox: Sandbox) -> None:
    await sandbox.exec("s", "kept = 1")
    slow = await sandbox.exec("s", "import time\ntime.sleep(30)", SandboxLimits(wall_time_s=0.5, cpu_s=5))
    assert slow.timed_out and slow.restarted and slow.exit_status != 0
    assert slow.error is not None and "Timed out" in slow.error
    again = await sandbox.exec("s", "'kept' in globals()")
    assert again.value == "False" and not again.timed_out


async def test_dead_worker_is_restarted(sandbox: Sandbox) -> None:
    died = await sandbox.exec("s", "import os\nos._exit(7)")
    assert died.restarted and died.error is not None and "died" in died.error
    assert (await sandbox.exec("s", "1 + 1")).value == "2"


async def test_output_is_truncated(sandbox: Sandbox, limits: SandboxLimits) -> None:
    small = limits.model_copy(update={"output_bytes": 2048})
    result = await sandbox.exec("s", "print('x' * 10_000)\n'y' * 10_000", small)
    assert result.truncated
    assert len(result.stdout) <= 2048 and result.value is not None and len(result.value) <= 2048
    fine = await sandbox.exec("s", "print('short')", small)
    assert fine.stdout == "short\n" and not fine.truncated


async def test_cpu_and_wall_time_are_reported(sandbox: Sandbox) -> None:
    result = await sandbox.exec("s", "sum(i * i for i in range(200_000))")
    assert result.cpu_s > 0 and result.wall_s > 0


async def test_close_session_stops_the_worker_and_keeps_the_workspace(sandbox: Sandbox) -> None:
    await sandbox.exec("s", "x = 1\nopen('f', 'w').write('x')")
    workspace = sandbox.workspace("s")
    await sandbox.close_session("s")
    assert (workspace / "f").read_text() == "x"  # the process's files are the user's
    after = await sandbox.exec("s", "import os\n('x' in globals(), os.listdir('.'))")
    assert after.value == "(False, ['f'])"


async def test_bad_session_name_is_refused(sandbox: Sandbox) -> None:
    with pytest.raises(SandboxError, match="session name"):
        await sandbox.exec("../escape", "1")


async def test_session_is_recycled_after_max_calls(tmp_path: Path) -> None:
    config = Config(home=tmp_path, sandbox=SandboxConfig(backend="subprocess", max_calls_per_session=2))
    async with SubprocessSandbox(config) as sandbox:
        await sandbox.exec("s", "a = 1")
        second = await sandbox.exec("s", "a")
        third = await sandbox.exec("s", "'a' in globals()")
    assert second.value == "1" and not second.restarted
    assert third.restarted and third.value == "False"


def test_subprocess_is_used_only_when_configured(tmp_path: Path) -> None:
    sandbox = open_sandbox(Config(home=tmp_path, sandbox=SandboxConfig(backend="subprocess")))
    assert isinstance(sandbox, SubprocessSandbox) and sandbox.sandboxed is False


def test_auto_without_docker_or_bubblewrap_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # neither docker nor bwrap can be found
    config = Config(
        home=tmp_path, sandbox=SandboxConfig(backend="auto", docker_host="unix:///nonexistent.sock")
    )
    with pytest.raises(SandboxUnavailable) as raised:
        open_sandbox(config)
    message = str(raised.value)
    assert "docker:" in message and "namespace:" in message and "bubblewrap" in message
    assert "subprocess" in message  # the explicit opt-in is named, never taken silently


def test_namespace_without_bubblewrap_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SandboxUnavailable, match="apt-get install bubblewrap"):
        open_sandbox(Config(home=tmp_path, sandbox=SandboxConfig(backend="namespace")))


def test_doctor_reports_each_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMOS_HOME", str(tmp_path))
    monkeypatch.setenv("LLMOS_SANDBOX__DOCKER_HOST", f"unix://{tmp_path}/no-engine.sock")
    result = CliRunner().invoke(app, ["doctor"])
    lines = result.output.replace("\n", " ")
    assert "docker: does not work" in lines and "no-engine.sock" in lines
    assert "namespace: works" in lines
    assert "subprocess: works" in lines and "NOT a sandbox" in lines
    assert "auto: would use namespace" in lines
    assert result.exit_code == 0


async def test_cpu_limit_stops_a_busy_cell(sandbox: Sandbox, limits: SandboxLimits) -> None:
    # Past its CPU seconds the cell gets SIGXCPU, well before the wall-clock limit.
    tight = limits.model_copy(update={"cpu_s": 1.0, "wall_time_s": 30.0})
    result = await sandbox.exec("s", "while True:\n    pass", tight)
    assert not result.timed_out and result.restarted, result
    assert result.error is not None and "CPU" in result.error
    assert (await sandbox.exec("s", "1 + 1", tight)).value == "2"


async def test_idle_session_is_stopped_and_says_so(tmp_path: Path) -> None:
    config = Config(home=tmp_path, sandbox=SandboxConfig(backend="subprocess", idle_timeout_s=0.2))
    async with SubprocessSandbox(config) as sandbox:
        await sandbox.exec("idle", "a = 1\nopen('kept.txt', 'w').write('x')")
        await asyncio.sleep(0.3)
        await sandbox.exec("other", "1")  # any call reaps idle sessions
        assert not sandbox.session("idle").running
        after = await sandbox.exec("idle", "import os\n('a' in globals(), os.listdir('.'))")
    assert after.restarted and after.value == "(False, ['kept.txt'])"


async def test_namespace_pool_serves_new_sessions_warm(tmp_path: Path, limits: SandboxLimits) -> None:
    config = Config(home=tmp_path, sandbox=SandboxConfig(backend="namespace", pool_size=2, limits=limits))
    async with NamespaceSandbox(config) as sandbox:
        await sandbox.warm_up()
        waiting = sandbox.warm_pids
        assert len(waiting) == 2
        result = await sandbox.exec("fresh", "open('out.txt', 'w').write('hi')\nimport os\nos.listdir('.')")
        assert sandbox.session("fresh").pid in waiting
        assert result.value == "['out.txt']" and not result.restarted
        assert (sandbox.workspace("fresh") / "out.txt").read_text() == "hi"
        # Other limits than the pool's: a new worker, but nothing was lost, so not `restarted`.
        other = await sandbox.exec("other", "1", limits.model_copy(update={"memory_mb": 64}))
        assert other.value == "1" and not other.restarted
    assert list((tmp_path / "sandbox" / "namespace" / "spares").iterdir()) == []
    assert (tmp_path / "workspaces" / "fresh" / "out.txt").read_text() == "hi"


def test_doctor_fails_when_the_configured_backend_cannot_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLMOS_HOME", str(tmp_path))
    monkeypatch.setenv("LLMOS_SANDBOX__BACKEND", "namespace")
    monkeypatch.setenv("LLMOS_SANDBOX__DOCKER_HOST", f"unix://{tmp_path}/no-engine.sock")
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap, no docker CLI
    result = CliRunner().invoke(app, ["doctor"])
    expected = "namespace: does not work - bubblewrap is not installed (`apt-get install bubblewrap`)"
    assert expected in result.output
    assert "auto: no sandbox available" in result.output
    assert result.exit_code == 1
