"""Sessions behave like notebook kernels on every backend; choosing a backend fails clearly."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from llmos.config import Config, SandboxConfig, SandboxLimits
from llmos.kernel.devices import Sandbox
from llmos.sandbox import SandboxError, SandboxUnavailable, open_sandbox
from llmos.sandbox.cli import app
from llmos.sandbox.frame import WorkerSandbox
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


@pytest.fixture(params=["namespace", "docker"])
async def pooled(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    limits: SandboxLimits,
    find_processes: Callable[[str], list[int]],
) -> AsyncIterator[WorkerSandbox[Any]]:
    """A sandbox of a backend with a warm pool of one worker, started."""
    host = request.getfixturevalue("docker_host") if request.param == "docker" else None
    sandbox_config = SandboxConfig(backend=request.param, docker_host=host, pool_size=1, limits=limits)
    sandbox = open_sandbox(Config(home=tmp_path / "home", sandbox=sandbox_config))
    try:
        await sandbox.warm_up()
        yield sandbox
    finally:
        await sandbox.aclose()
    # Closing drains the pool: no warm worker is left running, and no spare directory.
    assert find_processes(str(tmp_path)) == []
    assert list(sandbox.spares.iterdir()) == []


async def test_warm_worker_serves_a_new_session_in_its_workspace(pooled: WorkerSandbox[Any]) -> None:
    [warm] = pooled.warm_pids
    # The kernel made the process's folder and a file tool wrote to it before any code ran.
    workspace = pooled.config.workspace("fresh")
    workspace.mkdir(parents=True)
    (workspace / "given.txt").write_text("from a file tool")
    listed = await pooled.exec(
        "fresh", "open('made.txt', 'w').write('hi')\nimport os\nsorted(os.listdir('.'))"
    )
    assert pooled.session("fresh").pid == warm
    assert listed.value == "['given.txt', 'made.txt']" and not listed.restarted
    assert (workspace / "made.txt").read_text() == "hi"
    # Other limits than the pool's: a worker of its own, but nothing was lost, so not `restarted`.
    other = await pooled.exec("other", "1", pooled.config.sandbox.limits.model_copy(update={"memory_mb": 64}))
    assert other.value == "1" and not other.restarted and pooled.session("other").pid != warm
    await pooled.warm_up()  # the pool was refilled behind the session's back
    assert len(pooled.warm_pids) == 1 and pooled.warm_pids != [warm]
    assert (pooled.config.workspace("fresh") / "given.txt").read_text() == "from a file tool"


async def test_a_dead_warm_worker_is_not_handed_out(pooled: WorkerSandbox[Any]) -> None:
    [dead] = pooled.warm_pids
    os.kill(dead, signal.SIGKILL)
    async with asyncio.timeout(30):
        while dead in pooled.warm_pids:
            await asyncio.sleep(0.01)
    result = await pooled.exec("s", "6 * 7")
    assert result.value == "42" and not result.restarted and pooled.session("s").pid != dead


async def test_warm_pool_refuses_a_symlinked_workspace_and_leaves_its_target_alone(
    pooled: WorkerSandbox[Any], tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious.txt").write_text("keep")
    link = pooled.config.workspace("evil")
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(elsewhere)
    with pytest.raises(SandboxError, match="symbolic link"):
        await pooled.exec("evil", "1")
    assert [p.name for p in elsewhere.iterdir()] == ["precious.txt"]
    assert len(pooled.warm_pids) == 1  # the warm worker still waits for a session


async def test_a_call_leaves_the_workspace_folder_as_it_is(sandbox: Sandbox) -> None:
    # The workspace is made ready when a worker starts in it, not on every call: a user who
    # opens the folder to a group keeps it open.
    await sandbox.exec("s", "1")
    workspace = sandbox.workspace("s")
    workspace.chmod(0o750)
    assert (await sandbox.exec("s", "open('f', 'w').write('x')")).ok
    assert stat.S_IMODE(workspace.stat().st_mode) == 0o750


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
