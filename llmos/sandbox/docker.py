"""The docker backend: one hardened, long-lived container per session, kept warm in a small pool.

Each container runs the same worker as the other backends (`python3 -I -c <worker.py> ARGS`) and
is talked to through `docker run -i`'s stdin/stdout, so a warm call costs one round trip through
the engine (well under a millisecond), not a container start (hundreds of milliseconds).

Hardening (every container): no network, read-only root, a small private /tmp, a non-root uid,
memory (no swap), pids, cpus and ulimits, all capabilities dropped, no-new-privileges, no IPC
namespace sharing, an init process to reap zombies. Never --privileged, never the docker socket:
the session workspace under LLMOS_HOME is the only host directory mounted, and it is validated.

Warm pool (pool.py, shared with the namespace backend): `pool_size` containers are started ahead
with a spare directory mounted at /workspace; the session that takes one gets the spare directory
renamed to its workspace (the bind mount follows the directory, not its name). Containers carry
labels (llmos=1, llmos.owner, llmos.session) so strays can be found and removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from llmos.config import Config
from llmos.sandbox.base import Limits, SandboxError, worker_args, worker_source
from llmos.sandbox.dockerd import DockerdError, docker_command, engine_answers
from llmos.sandbox.frame import WorkerSandbox
from llmos.sandbox.image import docker_host_of, image_labels
from llmos.sandbox.session import WorkerSession

CONTAINER_WORKSPACE = "/workspace"
CPUS = "1.0"  # one of the machine's cores at most, whatever the code does
NOFILE = 256
# RLIMIT_NPROC counts every process of the uid on the whole host (other containers, the namespace
# backend), so it is only a loose backstop; the pids cgroup is the per-container limit.
NPROC_FACTOR = 4
WARM_LABEL = "(warm)"
STRAY_WAIT_S = 10.0


def docker_available(config: Config) -> str | None:
    """None when the docker backend can run; otherwise the reason, as a clause with the fix."""
    host = docker_host_of(config)
    try:
        docker_command(host)
    except DockerdError:
        return "the docker CLI is not installed (`apt-get install docker.io`)"
    if not engine_answers(host):
        where = host or "the default socket"
        return (
            f"no Docker engine answers at {where} (start one with "
            "`python -m llmos.sandbox.dockerd start`, or set sandbox.docker_host)"
        )
    if image_labels(config) is None:
        return (
            f"the sandbox image {config.sandbox.image} is missing (build it with `llmos sandbox build-image`)"
        )
    return None


def hardened_run_args(
    config: Config, limits: Limits, *, name: str, session: str, owner: str, workspace: Path
) -> list[str]:
    """`docker run` options for one sandbox container (without the image and command)."""
    uid = config.sandbox.uid
    file_size = limits.file_size_mb * 1024 * 1024
    nproc = limits.pids * NPROC_FACTOR
    return [
        "--interactive",
        "--rm",
        "--name",
        name,
        "--label",
        "llmos=1",
        "--label",
        f"llmos.owner={owner}",
        "--label",
        f"llmos.session={session}",
        "--network",
        "none",
        "--read-only",
        "--tmpfs",
        f"/tmp:rw,nosuid,nodev,noexec,size={max(16, limits.file_size_mb * 2)}m,mode=1777",
        "--user",
        f"{uid}:{uid}",
        "--memory",
        f"{limits.memory_mb}m",
        "--memory-swap",
        f"{limits.memory_mb}m",
        "--pids-limit",
        str(limits.pids),
        "--cpus",
        CPUS,
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
        "--ipc",
        "none",
        "--init",
        "--ulimit",
        f"nofile={NOFILE}:{NOFILE}",
        "--ulimit",
        f"nproc={nproc}:{nproc}",
        "--ulimit",
        f"fsize={file_size}:{file_size}",
        "--ulimit",
        "core=0:0",
        # stdout is the protocol channel: no copy of it in the engine's log files.
        "--log-driver",
        "none",
        "--hostname",
        "sandbox",
        "--workdir",
        CONTAINER_WORKSPACE,
        "--mount",
        f"type=bind,source={workspace},target={CONTAINER_WORKSPACE}",
    ]


# Where a container's memory cgroup may be, by its id, when the engine runs on this host.
CGROUP_CANDIDATES = (
    "/sys/fs/cgroup/memory/docker/{cid}",  # cgroup v1
    "/sys/fs/cgroup/docker/{cid}",  # cgroup v2, cgroupfs driver
    "/sys/fs/cgroup/system.slice/docker-{cid}.scope",  # cgroup v2, systemd driver
)


@dataclass
class _Container:
    name: str
    process: asyncio.subprocess.Process
    cidfile: Path
    cgroup: Path | None = None
    cgroup_looked_for: bool = False  # looked once: a cgroup that was not there does not appear later

    def memory_cgroup(self) -> Path | None:
        """The container's memory cgroup, when the engine runs on this host with cgroupfs."""
        if not self.cgroup_looked_for:
            try:
                cid = self.cidfile.read_text().strip()
            except OSError:
                cid = ""
            if not cid:
                return None  # not written yet: look again next time
            self.cgroup_looked_for = True
            candidates = [Path(candidate.format(cid=cid)) for candidate in CGROUP_CANDIDATES]
            self.cgroup = next((path for path in candidates if path.is_dir()), None)
        return self.cgroup


class DockerWorker(WorkerSession):
    """The worker in one hardened container; a restart is a new container on the same workspace."""

    backend = "docker"
    sandboxed = True

    def __init__(self, sandbox: DockerSandbox, workspace: Path) -> None:
        super().__init__(workspace, max_calls=sandbox.config.sandbox.max_calls_per_session)
        self._sandbox = sandbox
        self.container: _Container | None = None

    async def _spawn(self, limits: Limits) -> asyncio.subprocess.Process:
        # The llmos.session label: a session's workspace is named after it; a spare, not yet.
        label = WARM_LABEL if self.workspace.parent == self._sandbox.spares else self.workspace.name
        self.container = await self._sandbox.run_container(limits, self.workspace, label)
        return self.container.process

    async def _teardown(self) -> None:
        container, self.container = self.container, None
        if container is not None:
            await self._sandbox.remove(container)

    def _peak_memory(self) -> float | None:
        cgroup = self.container.memory_cgroup() if self.container is not None else None
        if cgroup is None:
            return None
        for name in ("memory.max_usage_in_bytes", "memory.peak"):
            with contextlib.suppress(OSError, ValueError):
                return int((cgroup / name).read_text().split()[0]) / (1024 * 1024)
        return None

    def _reset_peak_memory(self) -> None:
        cgroup = self.container.memory_cgroup() if self.container is not None else None
        if cgroup is None:
            return
        for name in ("memory.max_usage_in_bytes", "memory.peak"):
            with contextlib.suppress(OSError):
                (cgroup / name).write_text("0")
                return


class DockerSandbox(WorkerSandbox[DockerWorker]):
    """Sessions in hardened containers on the engine at sandbox.docker_host (or $DOCKER_HOST)."""

    name = "docker"
    sandboxed = True
    pooled = True

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.docker = docker_command(docker_host_of(config))
        self.owner = uuid.uuid4().hex[:12]
        self.containers_started = 0
        self._serial = itertools.count()
        self._closed = False

    def _worker(self, workspace: Path) -> DockerWorker:
        return DockerWorker(self, workspace)

    def _prepare_workspace(self, path: Path) -> None:
        # The container runs as the sandbox uid: hand it the directory.
        if os.geteuid() == 0:
            os.chown(path, self.config.sandbox.uid, self.config.sandbox.uid)
        else:
            path.chmod(0o777)

    def container_of(self, session: str) -> str | None:
        """The name of the container running `session` now, if any."""
        worker = self._sessions.get(session)
        container = worker.container if worker is not None else None
        return container.name if container is not None else None

    # -- containers ----------------------------------------------------------------------------

    def _checked_mount(self, path: Path) -> Path:
        """The only host path ever mounted: a real directory under LLMOS_HOME, no symlink on the way."""
        home = self.config.home.absolute()
        path = path.absolute()
        if not path.is_relative_to(home) or path == home:
            raise SandboxError(f"The sandbox workspace {path} must be a directory under {home}.")
        current = home
        for part in path.relative_to(home).parts:
            current = current / part
            if current.is_symlink() or part == "..":
                raise SandboxError(f"The sandbox workspace {path} goes through {current}; remove that link.")
        if not path.is_dir():
            raise SandboxError(f"The sandbox workspace {path} is not a directory; remove what is there.")
        resolved = path.resolve()
        if any(char in str(resolved) for char in ",=\n"):
            raise SandboxError(
                f"The sandbox workspace path {resolved} has a ',' or '='; choose another LLMOS_HOME."
            )
        return resolved

    async def run_container(self, limits: Limits, workspace: Path, label: str) -> _Container:
        """Start a hardened container with `workspace` mounted at /workspace, running the worker."""
        if self._closed:
            raise SandboxError("This docker sandbox is closed; open a new one.")
        mount = self._checked_mount(self.ready_workspace(workspace))
        name = f"llmos-{self.owner}-{next(self._serial)}"
        cidfile = self.root / "cids" / f"{name}.cid"
        cidfile.parent.mkdir(parents=True, exist_ok=True)
        cidfile.unlink(missing_ok=True)
        options = hardened_run_args(
            self.config, limits, name=name, session=label, owner=self.owner, workspace=mount
        )
        command = [
            "python3",
            "-I",
            "-c",
            worker_source(),
            *worker_args(CONTAINER_WORKSPACE, limits, nproc=limits.pids * NPROC_FACTOR),
        ]
        process = await asyncio.create_subprocess_exec(
            *self.docker,
            "run",
            "--cidfile",
            str(cidfile),
            *options,
            self.config.sandbox.image,
            *command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        self.containers_started += 1
        return _Container(name=name, process=process, cidfile=cidfile)

    async def remove(self, container: _Container) -> None:
        """Kill the `docker run` client, then `docker rm -f` (killing a client does not stop a container)."""
        if container.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                container.process.kill()
        await self._docker_quiet("rm", "-f", container.name)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(container.process.wait(), 5.0)
        container.cidfile.unlink(missing_ok=True)

    async def _docker_quiet(self, *args: str) -> str:
        process = await asyncio.create_subprocess_exec(
            *self.docker, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
        )
        stdout, _ = await process.communicate()
        return stdout.decode()

    async def stray_containers(self) -> list[str]:
        """Names of containers this sandbox started that still exist."""
        listed = await self._docker_quiet(
            "ps", "-a", "--filter", f"label=llmos.owner={self.owner}", "--format", "{{.Names}}"
        )
        return listed.split()

    async def aclose(self) -> None:
        """Stop every session and warm container this sandbox made, and remove them."""
        self._closed = True
        await super().aclose()  # waits for warm containers being started, then removes them
        # Belt and braces: anything with our label that escaped the bookkeeping. A container the
        # engine is still removing (`--rm` raced our `rm -f`) is listed until it is gone: wait.
        deadline = time.monotonic() + STRAY_WAIT_S
        while (strays := await self.stray_containers()) and time.monotonic() < deadline:
            await self._docker_quiet("rm", "-f", *strays)
            await asyncio.sleep(0.05)
        shutil.rmtree(self.root / "cids", ignore_errors=True)
