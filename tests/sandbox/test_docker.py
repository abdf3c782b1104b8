"""The docker backend on a real, private Docker engine with the offline-built image."""

from __future__ import annotations

import asyncio
import io
import subprocess
import tarfile
from pathlib import Path

import pytest

from llmos.config import Config, SandboxConfig, SandboxLimits
from llmos.sandbox.base import SandboxError
from llmos.sandbox.docker import DockerSandbox, docker_available, hardened_run_args
from llmos.sandbox.dockerd import ManagedDockerd
from llmos.sandbox.dockerd import main as dockerd_main
from llmos.sandbox.image import CONTENT_LABEL, build_image, image_labels

# The engine and image come from conftest's session-scoped `docker_host` fixture (a private dockerd
# started with llmos.sandbox.dockerd.running_engine, shared with the escape suite).


def make_config(home: Path, docker_host: str, **sandbox: object) -> Config:
    return Config(home=home, sandbox=SandboxConfig.model_validate({"docker_host": docker_host, **sandbox}))


def docker(host: str, *args: str) -> str:
    return subprocess.run(["docker", "-H", host, *args], capture_output=True, text=True, check=True).stdout


def container_names(host: str, owner: str) -> list[str]:
    return docker(
        host, "ps", "-a", "--filter", f"label=llmos.owner={owner}", "--format", "{{.Names}}"
    ).split()


async def test_session_keeps_variables_and_returns_the_last_value(tmp_path: Path, docker_host: str) -> None:
    async with DockerSandbox(make_config(tmp_path, docker_host, pool_size=0)) as sandbox:
        first = await sandbox.exec("s", "x = 41\nprint('hello')")
        second = await sandbox.exec("s", "x + 1")
    assert first.ok and first.stdout == "hello\n" and first.value is None
    assert second.value == "42"
    assert (second.backend, second.sandboxed, second.restarted) == ("docker", True, False)


async def test_errors_come_back_as_results(tmp_path: Path, docker_host: str) -> None:
    async with DockerSandbox(make_config(tmp_path, docker_host, pool_size=0)) as sandbox:
        failed = await sandbox.exec("s", "1 / 0")
        after = await sandbox.exec("s", "'still here'")
    assert failed.exit_status == 1 and failed.error is not None and "ZeroDivisionError" in failed.error
    assert after.value == "'still here'"


async def test_files_are_shared_through_the_workspace_only(tmp_path: Path, docker_host: str) -> None:
    async with DockerSandbox(make_config(tmp_path, docker_host, pool_size=0)) as sandbox:
        workspace = sandbox.workspace("s")
        (workspace / "input.txt").write_text("from the host")
        result = await sandbox.exec("s", "open('out.txt', 'w').write(open('input.txt').read().upper())")
        assert result.files == ["out.txt"]
        assert (workspace / "out.txt").read_text() == "FROM THE HOST"
        outside = await sandbox.exec(
            "s", "import os\n[os.getuid(), os.listdir('/tmp'), os.path.exists('/etc/shadow')]"
        )
        readonly = await sandbox.exec("s", "open('/etc/motd', 'w')")
    assert outside.value == "[65534, [], False]"
    assert readonly.error is not None and "Read-only file system" in readonly.error


async def test_no_network_and_limits_hold(tmp_path: Path, docker_host: str) -> None:
    async with DockerSandbox(make_config(tmp_path, docker_host, pool_size=0)) as sandbox:
        network = await sandbox.exec("s", "import socket\n[name for _, name in socket.if_nameindex()]")
        memory = await sandbox.exec("s", "b = bytearray(600 * 1024 * 1024)")
    assert network.value == "['lo']"
    assert memory.error is not None and "MemoryError" in memory.error


async def test_timeout_removes_the_container_and_the_next_call_starts_fresh(
    tmp_path: Path, docker_host: str
) -> None:
    config = make_config(tmp_path, docker_host, pool_size=0)
    async with DockerSandbox(config) as sandbox:
        await sandbox.exec("s", "x = 1")
        before = sandbox.container_of("s")
        hung = await sandbox.exec("s", "while True: pass", SandboxLimits(wall_time_s=1))
        assert hung.timed_out and hung.restarted and not hung.ok
        assert before is not None and before not in container_names(docker_host, sandbox.owner)
        after = await sandbox.exec("s", "'x' in globals()")
        assert after.value == "False"
        assert sandbox.container_of("s") not in (None, before)


async def test_warm_pool_container_serves_a_new_session(tmp_path: Path, docker_host: str) -> None:
    async with DockerSandbox(make_config(tmp_path, docker_host, pool_size=1)) as sandbox:
        await sandbox.warm_up()
        [warm] = container_names(docker_host, sandbox.owner)
        # Other container-level limits need a container of their own: the warm one stays in the pool.
        other = await sandbox.exec("other", "1", SandboxLimits(memory_mb=128))
        assert other.value == "1" and sandbox.container_of("other") != warm
        result = await sandbox.exec("fresh", "open('f.txt', 'w').write('ok')")
        assert result.ok and result.files == ["f.txt"]
        assert sandbox.container_of("fresh") == warm
        assert (sandbox.workspace("fresh") / "f.txt").read_text() == "ok"
        await sandbox.warm_up()  # the pool was refilled behind the session's back
        assert sandbox.containers_started == 3


async def test_session_is_recycled_after_max_calls_and_keeps_its_files(
    tmp_path: Path, docker_host: str
) -> None:
    config = make_config(tmp_path, docker_host, pool_size=1, max_calls_per_session=2)
    async with DockerSandbox(config) as sandbox:
        await sandbox.exec("s", "x = 1\nopen('keep.txt', 'w').write('kept')")
        second = await sandbox.exec("s", "x")
        first_container = sandbox.container_of("s")
        third = await sandbox.exec("s", "['x' in globals(), open('keep.txt').read()]")
    assert second.value == "1" and not second.restarted
    assert third.restarted and third.value == "[False, 'kept']"
    assert first_container is not None


async def test_aclose_leaves_no_containers(tmp_path: Path, docker_host: str) -> None:
    sandbox = DockerSandbox(make_config(tmp_path, docker_host, pool_size=2))
    await sandbox.exec("a", "1")
    await sandbox.exec("b", "2")
    await sandbox.warm_up()
    assert len(container_names(docker_host, sandbox.owner)) == 4
    await sandbox.aclose()
    assert container_names(docker_host, sandbox.owner) == []
    assert list(sandbox.spares.iterdir()) == []  # the warm containers' spare folders are gone
    workspaces = sandbox.config.workspace("a").parent
    assert sorted(p.name for p in workspaces.iterdir()) == ["a", "b"]  # the sessions' stay


async def test_symlinked_workspace_is_refused(tmp_path: Path, docker_host: str) -> None:
    async with DockerSandbox(make_config(tmp_path, docker_host, pool_size=0)) as sandbox:
        evil = sandbox.config.workspace("evil")
        evil.parent.mkdir(parents=True, exist_ok=True)
        evil.symlink_to("/etc")
        with pytest.raises(SandboxError, match="link"):
            await sandbox.exec("evil", "1")


def test_run_options_are_hardened(tmp_path: Path) -> None:
    args = hardened_run_args(
        Config(home=tmp_path), SandboxLimits(), name="n", session="s", owner="o", workspace=tmp_path / "w"
    )
    joined = " ".join(args)
    for flag in (
        "--network none",
        "--read-only",
        "--cap-drop ALL",
        "--ipc none",
        "--init",
        "--user 65534:65534",
    ):
        assert flag in joined
    assert "--memory 256m --memory-swap 256m" in joined and "--pids-limit 64" in joined
    assert "--privileged" not in joined and "docker.sock" not in joined
    assert [arg for arg in args if arg.startswith("type=bind")] == [
        f"type=bind,source={tmp_path / 'w'},target=/workspace"
    ]


def test_docker_available_says_what_is_missing(tmp_path: Path, docker_host: str) -> None:
    assert docker_available(make_config(tmp_path, docker_host)) is None
    no_engine = docker_available(make_config(tmp_path, f"unix://{tmp_path}/nothing.sock"))
    assert no_engine is not None and "no Docker engine" in no_engine
    no_image = docker_available(make_config(tmp_path, docker_host, image="llmos-missing:none"))
    assert no_image is not None and "build-image" in no_image


def test_build_image_is_idempotent(
    tmp_path: Path, docker_host: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = make_config(tmp_path, docker_host)
    label = (image_labels(config) or {}).get(CONTENT_LABEL)
    assert build_image(config) == config.sandbox.image
    assert "up to date" in capsys.readouterr().err
    assert label is not None and (image_labels(config) or {}).get(CONTENT_LABEL) == label


def test_managed_dockerd_stop_removes_containers_and_keeps_data(tmp_path: Path) -> None:
    state = tmp_path / "engine"
    tiny = io.BytesIO()
    with tarfile.open(fileobj=tiny, mode="w") as tar:
        tar.addfile(tarfile.TarInfo("empty"), io.BytesIO(b""))
    with ManagedDockerd(state) as engine:
        host = engine.docker_host
        subprocess.run(["docker", "-H", host, "import", "-", "tiny:1"], input=tiny.getvalue(), check=True)
        docker(host, "create", "--name", "leftover", "tiny:1", "/empty")
        assert dockerd_main(["status", "--state-dir", str(state)]) == 0
    assert not engine.socket_path.exists() and dockerd_main(["status", "--state-dir", str(state)]) == 1
    with ManagedDockerd(state) as engine:
        # Containers were removed at stop; images stay in the data root for the next run.
        assert docker(engine.docker_host, "ps", "-aq") == ""
        assert "tiny" in docker(engine.docker_host, "images", "--format", "{{.Repository}}")


async def test_idle_session_is_removed(tmp_path: Path, docker_host: str) -> None:
    async with DockerSandbox(make_config(tmp_path, docker_host, pool_size=0, idle_timeout_s=0.5)) as sandbox:
        await sandbox.exec("idle", "x = 1")
        idle_container = sandbox.container_of("idle")
        await asyncio.sleep(0.6)
        await sandbox.exec("busy", "1")  # any call reaps the sessions idle for too long
        assert idle_container not in container_names(docker_host, sandbox.owner)
        again = await sandbox.exec("idle", "'x' in globals()")
    assert again.value == "False"
