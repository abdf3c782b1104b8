"""Sandbox fixtures: one sandbox per test for each backend, and a private Docker engine per run.

The `sandbox` fixture is parametrized over "namespace", "subprocess" and "docker". The docker
param needs a private dockerd and the sandbox image (both built here, once per test session); when
that cannot work the docker tests FAIL with the reason instead of being skipped.
After each test the fixture closes the sandbox and checks the host: no process of the sandbox is
left, no cgroup, no spare directory of a warm worker.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from llmos.config import Config, SandboxConfig, SandboxLimits
from llmos.kernel.devices import Sandbox
from llmos.sandbox import open_sandbox

BACKENDS = ["namespace", "subprocess", "docker"]

# Small limits keep bombs cheap on a shared 2-core machine.
TEST_LIMITS = SandboxLimits(wall_time_s=5.0, cpu_s=5.0, memory_mb=128, pids=32, output_bytes=64_000)


@pytest.fixture(scope="session")
def docker_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private dockerd (no bridge, no iptables) with the sandbox image built offline."""
    try:
        from llmos.sandbox.dockerd import running_engine
        from llmos.sandbox.image import build_image
    except ImportError as exc:
        pytest.fail(f"the docker backend cannot be tested: {exc}")
    with running_engine(tmp_path_factory.mktemp("dockerd")) as host:
        build_image(Config(home=tmp_path_factory.mktemp("home"), sandbox=SandboxConfig(docker_host=host)))
        yield host


@pytest.fixture
def limits() -> SandboxLimits:
    return TEST_LIMITS


@pytest.fixture
def find_processes() -> Callable[[str], list[int]]:
    return processes_mentioning


def sandbox_config(home: Path, backend: str, docker_host: str | None = None) -> Config:
    return Config(
        home=home,
        # No warm pool: each test starts only the workers it uses (pools have their own tests).
        sandbox=SandboxConfig(backend=backend, docker_host=docker_host, limits=TEST_LIMITS, pool_size=0),
    )


def processes_mentioning(text: str) -> list[int]:
    """Pids of host processes whose command line contains `text`."""
    found = []
    needle = text.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                cmdline = handle.read()
        except OSError:
            continue
        if needle in cmdline:
            found.append(int(entry))
    return found


def stray_processes(home: Path, cgroup_token: str | None) -> list[int]:
    """Host processes that belong to a sandbox under `home`: by command line, working directory
    (subprocess backend) or session cgroup (namespace backend), whatever they renamed themselves to."""
    found = set(processes_mentioning(str(home)))
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
            with open(f"/proc/{entry}/cgroup") as handle:
                cgroups = handle.read()
        except OSError:
            continue
        if cwd.startswith(str(home)) or (cgroup_token and f"/llmos/{cgroup_token}-" in cgroups):
            found.add(int(entry))
    return sorted(found)


def llmos_cgroups() -> list[Path]:
    found: list[Path] = []
    for controller in ("memory", "pids"):
        base = Path("/sys/fs/cgroup") / controller / "llmos"
        if base.is_dir():
            found += [path for path in base.iterdir() if path.is_dir()]
    return found


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
async def sandbox(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Sandbox]:
    monkeypatch.setenv("LLMOS_HOME", str(tmp_path))
    host = request.getfixturevalue("docker_host") if backend == "docker" else None
    config = sandbox_config(tmp_path / "home", backend, host)
    opened = open_sandbox(config)
    instance = getattr(opened, "instance_id", None)
    try:
        yield opened
    finally:
        await opened.aclose()
    # The host is unaffected: nothing that mentions this sandbox's home is still running, no new
    # cgroup is left, and no warm worker's spare directory. (Workspaces stay: they are the processes'.)
    assert stray_processes(config.home, instance) == []
    # Its own cgroups are named after its instance (other runs on the machine may have theirs).
    assert [path for path in llmos_cgroups() if instance and path.name.startswith(f"{instance}-")] == []
    spares = config.home / "sandbox" / backend / "spares"
    assert not spares.exists() or list(spares.iterdir()) == []
