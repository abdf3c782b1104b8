"""The docker backend: one hardened, long-lived container per session, kept warm in a small pool.

Each container runs the same worker as the other backends (`python3 -I -c <worker.py> ARGS`) and
is talked to through `docker run -i`'s stdin/stdout, so a warm call costs one round trip through
the engine (well under a millisecond), not a container start (hundreds of milliseconds).

Hardening (every container): no network, read-only root, a small private /tmp, a non-root uid,
memory (no swap), pids, cpus and ulimits, all capabilities dropped, no-new-privileges, no IPC
namespace sharing, an init process to reap zombies. Never --privileged, never the docker socket:
the session workspace under LLMOS_HOME is the only host directory mounted, and it is validated.

Warm pool: `pool_size` containers are started ahead with a spare directory mounted at
/workspace. A session that needs a container takes one and the spare directory is renamed to the
session's workspace (the bind mount follows the directory, not its name); files a recycled
session had are moved in first. Containers carry labels (llmos=1, llmos.owner, llmos.session)
so strays can be found and removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from llmos.config import Config
from llmos.sandbox.base import (
    HEADER,
    START_TIMEOUT_S,
    Limits,
    SandboxError,
    WorkerSandbox,
    WorkerSession,
    adopt_spare,
    limits_fit,
    worker_args,
    worker_source,
)
from llmos.sandbox.dockerd import DockerdError, docker_command
from llmos.sandbox.image import docker_host_of, image_labels

CONTAINER_WORKSPACE = "/workspace"
CPUS = "1.0"  # one of the machine's cores at most, whatever the code does
NOFILE = 256
# RLIMIT_NPROC counts every process of the uid on the whole host (other containers, the namespace
# backend), so it is only a loose backstop; the pids cgroup is the per-container limit.
NPROC_FACTOR = 4
WARM_LABEL = "(warm)"


def docker_available(config: Config) -> str | None:
    """None when the docker backend can run; otherwise the reason, as a clause with the fix."""
    host = docker_host_of(config)
    try:
        docker = docker_command(host)
    except DockerdError:
        return "the docker CLI is not installed (`apt-get install docker.io`)"
    try:
        info = subprocess.run(
            [*docker, "version", "--format", "{{.Server.Version}}"], capture_output=True, timeout=5
        )
    except subprocess.TimeoutExpired:
        info = None
    if info is None or info.returncode != 0:
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


@dataclass
class _Container:
    name: str
    process: asyncio.subprocess.Process
    limits: Limits
    workspace: Path  # the host directory bind-mounted at /workspace
    cidfile: Path
    cgroup: Path | None = None

    @property
    def alive(self) -> bool:
        return self.process.returncode is None


class DockerSandbox(WorkerSandbox):
    """Sessions in hardened containers on the engine at sandbox.docker_host (or $DOCKER_HOST)."""

    name = "docker"
    sandboxed = True

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.docker = docker_command(docker_host_of(config))
        self.owner = uuid.uuid4().hex[:12]
        self.containers_started = 0
        self._serial = itertools.count()
        self._warm: list[_Container] = []
        self._by_session: dict[str, _Container] = {}
        self._refills: set[asyncio.Task[None]] = set()  # warm containers being started
        self._removals: set[asyncio.Task[None]] = set()  # unusable warm containers being removed
        self._closed = False

    # -- sessions ------------------------------------------------------------------------------

    def _new_session(self, session: str) -> WorkerSession:
        return WorkerSession(
            partial(self._spawn, session),
            partial(self._teardown, session),
            backend=self.name,
            sandboxed=True,
            max_calls=self.config.sandbox.max_calls_per_session,
            peak_memory=partial(self._peak_memory, session),
            reset_peak_memory=partial(self._reset_peak_memory, session),
        )

    def _prepare_workspace(self, path: Path) -> None:
        # The container runs as the sandbox uid: hand it the directory.
        if os.geteuid() == 0:
            os.chown(path, self.config.sandbox.uid, self.config.sandbox.uid)
        else:
            path.chmod(0o777)

    async def _spawn(self, session: str, limits: Limits) -> asyncio.subprocess.Process:
        if self._closed:
            raise SandboxError("This docker sandbox is closed; open a new one.")
        workspace = self._checked_mount(self.workspace(session))
        container = self._take_warm(limits, workspace)
        if container is None:
            container = await self._run(limits, workspace, session)
        self._by_session[session] = container
        self.fill_pool()
        return container.process

    async def _teardown(self, session: str) -> None:
        container = self._by_session.pop(session, None)
        if container is not None:
            await self._remove([container])

    # -- warm pool -----------------------------------------------------------------------------

    def fill_pool(self) -> None:
        """Start warm containers in the background until `pool_size` are ready or starting."""
        if self._closed:
            return
        missing = self.config.sandbox.pool_size - len(self._warm) - len(self._refills)
        for _ in range(max(0, missing)):
            task = asyncio.get_running_loop().create_task(self._add_warm())
            self._refills.add(task)
            task.add_done_callback(self._refills.discard)

    async def warm_up(self) -> None:
        """Fill the warm pool and wait until its containers are started."""
        self.fill_pool()
        await asyncio.gather(*list(self._refills), return_exceptions=True)

    async def _add_warm(self) -> None:
        spare = self._new_spare(f"{self.owner}-{next(self._serial)}")
        try:
            container = await self._run(self.config.sandbox.limits, spare, WARM_LABEL)
        except BaseException:
            shutil.rmtree(spare, ignore_errors=True)
            raise
        try:
            await asyncio.wait_for(self._until_ready(container), START_TIMEOUT_S)
        except (TimeoutError, asyncio.IncompleteReadError):
            await self._remove([container])
            return
        if self._closed:
            await self._remove([container])
        else:
            self._warm.append(container)

    @staticmethod
    async def _until_ready(container: _Container) -> None:
        """Wait for the worker's first message, then put it back for the session that takes it.

        The worker writes nothing else until it gets a request, so the bytes fed back are the
        whole buffer and the session reads them first, as from a worker it just started.
        """
        stdout = container.process.stdout
        assert stdout is not None
        header = await stdout.readexactly(HEADER.size)
        body = await stdout.readexactly(HEADER.unpack(header)[0])
        stdout.feed_data(header + body)

    def _take_warm(self, limits: Limits, workspace: Path) -> _Container | None:
        """A live warm container that fits `limits`, its spare directory now the session's workspace."""
        for dead in [container for container in self._warm if not container.alive]:
            self._warm.remove(dead)
            self._discard(dead)
        fitting = [container for container in self._warm if limits_fit(container.limits, limits)]
        if fitting:
            container = fitting[0]
            self._warm.remove(container)
            adopt_spare(container.workspace, workspace)
            container.workspace = workspace
            return container
        return None

    def _discard(self, container: _Container) -> None:
        task = asyncio.get_running_loop().create_task(self._remove([container]))
        self._removals.add(task)
        task.add_done_callback(self._removals.discard)

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

    async def _run(self, limits: Limits, workspace: Path, session: str) -> _Container:
        name = f"llmos-{self.owner}-{next(self._serial)}"
        cidfile = self.root / "cids" / f"{name}.cid"
        cidfile.parent.mkdir(parents=True, exist_ok=True)
        cidfile.unlink(missing_ok=True)
        options = hardened_run_args(
            self.config, limits, name=name, session=session, owner=self.owner, workspace=workspace
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
        return _Container(name=name, process=process, limits=limits, workspace=workspace, cidfile=cidfile)

    async def _remove(self, containers: list[_Container]) -> None:
        """Kill the `docker run` clients, then `docker rm -f` (killing a client does not stop a container)."""
        if not containers:
            return
        for container in containers:
            if container.alive:
                with contextlib.suppress(ProcessLookupError):
                    container.process.kill()
        await self._docker_quiet("rm", "-f", *(container.name for container in containers))
        for container in containers:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(container.process.wait(), 5.0)
            container.cidfile.unlink(missing_ok=True)
            if container.workspace.name.startswith(".warm-"):
                shutil.rmtree(container.workspace, ignore_errors=True)

    async def _docker_quiet(self, *args: str) -> str:
        process = await asyncio.create_subprocess_exec(
            *self.docker, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
        )
        stdout, _ = await process.communicate()
        return stdout.decode()

    def container_of(self, session: str) -> str | None:
        """The name of the container running `session` now, if any."""
        container = self._by_session.get(session)
        return container.name if container is not None else None

    async def stray_containers(self) -> list[str]:
        """Names of containers this sandbox started that still exist."""
        listed = await self._docker_quiet(
            "ps", "-a", "--filter", f"label=llmos.owner={self.owner}", "--format", "{{.Names}}"
        )
        return listed.split()

    async def aclose(self) -> None:
        """Stop every session and warm container this sandbox made, and remove them."""
        self._closed = True
        for task in [*self._refills, *self._removals]:
            with contextlib.suppress(Exception):
                await task
        await super().aclose()
        warm, self._warm = self._warm, []
        await self._remove(warm)
        # Belt and braces: anything with our label that escaped the bookkeeping.
        strays = await self.stray_containers()
        if strays:
            await self._docker_quiet("rm", "-f", *strays)
        shutil.rmtree(self.root / "cids", ignore_errors=True)

    # -- resources -----------------------------------------------------------------------------

    def _cgroup(self, session: str) -> Path | None:
        """The container's memory cgroup, when the engine runs on this host with cgroupfs."""
        container = self._by_session.get(session)
        if container is None:
            return None
        if container.cgroup is None:
            try:
                cid = container.cidfile.read_text().strip()
            except OSError:
                return None
            for candidate in (
                Path("/sys/fs/cgroup/memory/docker") / cid,  # cgroup v1
                Path("/sys/fs/cgroup/docker") / cid,  # cgroup v2, cgroupfs driver
                Path(f"/sys/fs/cgroup/system.slice/docker-{cid}.scope"),  # cgroup v2, systemd driver
            ):
                if cid and candidate.is_dir():
                    container.cgroup = candidate
                    break
        return container.cgroup

    def _peak_memory(self, session: str) -> float | None:
        cgroup = self._cgroup(session)
        if cgroup is None:
            return None
        for name in ("memory.max_usage_in_bytes", "memory.peak"):
            with contextlib.suppress(OSError, ValueError):
                return int((cgroup / name).read_text().split()[0]) / (1024 * 1024)
        return None

    def _reset_peak_memory(self, session: str) -> None:
        cgroup = self._cgroup(session)
        if cgroup is None:
            return
        for name in ("memory.max_usage_in_bytes", "memory.peak"):
            with contextlib.suppress(OSError):
                (cgroup / name).write_text("0")
                return
