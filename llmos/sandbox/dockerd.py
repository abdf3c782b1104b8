"""A private Docker engine for llmos: start, wait until it answers, stop and clean up.

Machines without a running engine (CI runners, this project's build boxes) can still use the
docker backend: `ManagedDockerd` starts Debian's `dockerd` with networking switched off (the sandbox
runs with `--network none` anyway, and no bridge means no iptables changes on the host) and every
path under one state directory. The data root survives `stop()`, so a built image is reused by the
next run.

    with ManagedDockerd(state_dir) as engine:
        os.environ["DOCKER_HOST"] = engine.docker_host

From a shell (the Makefile): `python -m llmos.sandbox.dockerd start --state-dir DIR` prints the
DOCKER_HOST to use; `... stop --state-dir DIR` stops it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

from llmos.config import Config, load_config

# Unix socket paths are limited to 108 bytes and containerd puts sockets two levels below the
# exec-root, so a long state dir (pytest's tmp_path) gets its exec-root under /tmp instead.
_MAX_EXEC_ROOT_LEN = 48
_LOG_TAIL_LINES = 15


class DockerdError(Exception):
    """The private Docker engine could not be started or stopped; the message says what to do."""


def docker_command(docker_host: str | None) -> list[str]:
    """The docker CLI argv prefix talking to `docker_host` (None: the CLI's own default)."""
    if shutil.which("docker") is None:
        raise DockerdError("The docker CLI is not installed; install it with `apt-get install docker.io`.")
    return ["docker", "-H", docker_host] if docker_host else ["docker"]


def engine_answers(docker_host: str | None, timeout_s: float = 5.0) -> bool:
    """True when `docker info` gets an answer from the engine at `docker_host`."""
    try:
        done = subprocess.run(
            [*docker_command(docker_host), "info", "--format", "{{.ServerVersion}}"],
            capture_output=True,
            timeout=timeout_s,
            check=False,
        )
    except (subprocess.TimeoutExpired, DockerdError):
        return False
    return done.returncode == 0


class ManagedDockerd:
    """One `dockerd` process with its data root, exec root, socket, pid file and log in `state_dir`.

    If a dockerd started earlier for the same state dir is still alive and answering (the CLI's
    `start`, or another fixture in the same test session), it is reused and `stop()` leaves it
    running unless `force=True`: the data root cannot be shared by two engines.
    """

    def __init__(
        self, state_dir: Path | None = None, *, config: Config | None = None, timeout_s: float = 60.0
    ):
        if state_dir is None:
            state_dir = (config or load_config()).home / "dockerd"
        self.state_dir = Path(state_dir).expanduser().absolute()
        self.timeout_s = timeout_s
        self.data_root = self.state_dir / "data"
        self.log_path = self.state_dir / "dockerd.log"
        self.pid_path = self.state_dir / "dockerd.pid"
        self.exec_root = self._exec_root_for(self.state_dir)
        self.socket_path = self.exec_root / "docker.sock"
        self._process: subprocess.Popen[bytes] | None = None
        self._owned = False

    @staticmethod
    def _exec_root_for(state_dir: Path) -> Path:
        local = state_dir / "run"
        if len(str(local)) <= _MAX_EXEC_ROOT_LEN:
            return local
        digest = hashlib.sha256(str(state_dir).encode()).hexdigest()[:12]
        return Path("/tmp") / f"llmos-dockerd-{digest}"

    @property
    def docker_host(self) -> str:
        return f"unix://{self.socket_path}"

    def _running_pid(self) -> int | None:
        """The pid of a live dockerd recorded in our pid file, if any."""
        try:
            pid = int(self.pid_path.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return None
        return pid if b"dockerd" in cmdline and str(self.data_root).encode() in cmdline else None

    def start(self) -> str:
        """Start the engine (or adopt the one already running for this state dir); return DOCKER_HOST."""
        if self._running_pid() is not None and engine_answers(self.docker_host):
            return self.docker_host
        binary = shutil.which("dockerd")
        if binary is None:
            raise DockerdError("dockerd is not installed; install it with `apt-get install docker.io`.")
        if os.geteuid() != 0:
            raise DockerdError(
                "Starting a private dockerd needs root; run as root or point DOCKER_HOST at an engine."
            )
        self._remove_leftovers()
        for path in (self.state_dir, self.data_root, self.exec_root):
            path.mkdir(parents=True, exist_ok=True)
        argv = [
            binary,
            "--bridge=none",
            "--iptables=false",
            "--ip6tables=false",
            "--ip-masq=false",
            "--data-root",
            str(self.data_root),
            "--exec-root",
            str(self.exec_root),
            "-H",
            self.docker_host,
            "--pidfile",
            str(self.pid_path),
        ]
        with self.log_path.open("ab") as log:
            # A session of its own: Ctrl-C in the shell that ran `start` must not kill the engine.
            self._process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
        self._owned = True
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise DockerdError(
                    f"dockerd exited with status {self._process.returncode} while starting; "
                    f"see its log {self.log_path}:\n{self._log_tail()}"
                )
            if self.socket_path.exists() and engine_answers(self.docker_host, timeout_s=2.0):
                return self.docker_host
            time.sleep(0.1)
        self.stop(force=True)
        raise DockerdError(
            f"dockerd did not answer within {self.timeout_s:.0f} s; "
            f"see its log {self.log_path}:\n{self._log_tail()}"
        )

    def stop(self, *, force: bool = False) -> None:
        """Remove every container, stop dockerd and clean its runtime leftovers (the data root stays)."""
        if not (self._owned or force):
            return
        pid = self._process.pid if self._process is not None else self._running_pid()
        if pid is not None and engine_answers(self.docker_host, timeout_s=2.0):
            self._remove_all_containers()
        if pid is not None:
            self._terminate(pid)
        self._process = None
        self._owned = False
        self._remove_leftovers()

    def _remove_all_containers(self) -> None:
        docker = docker_command(self.docker_host)
        listed = subprocess.run(
            [*docker, "ps", "-aq"], capture_output=True, text=True, timeout=30, check=False
        )
        ids = listed.stdout.split()
        if ids:
            subprocess.run([*docker, "rm", "-f", *ids], capture_output=True, timeout=60, check=False)

    def _terminate(self, pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and _alive(pid, self._process):
            time.sleep(0.05)
        if _alive(pid, self._process):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            if self._process is not None:
                self._process.wait(timeout=10)

    def _remove_leftovers(self) -> None:
        """Unmount what a killed engine left mounted and remove its sockets and pid file."""
        if self._running_pid() is not None:
            return
        for mount in reversed(_mounts_under((self.data_root, self.exec_root))):
            subprocess.run(["umount", "-l", mount], capture_output=True, check=False)
        shutil.rmtree(self.exec_root, ignore_errors=True)
        self.pid_path.unlink(missing_ok=True)

    def _log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-_LOG_TAIL_LINES:])

    def __enter__(self) -> ManagedDockerd:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _alive(pid: int, process: subprocess.Popen[bytes] | None) -> bool:
    if process is not None:
        return process.poll() is None
    try:
        # A zombie (exited, not yet reaped by its parent) counts as gone.
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _mounts_under(roots: tuple[Path, ...]) -> list[str]:
    prefixes = tuple(f"{root}/" for root in roots)
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    points = (line.split()[4] for line in lines)
    return [point for point in points if point.startswith(prefixes)]


@contextlib.contextmanager
def running_engine(state_dir: Path) -> Iterator[str]:
    """Pytest-friendly helper: yield a DOCKER_HOST of an engine for `state_dir`, stopped afterwards.

    Uses $LLMOS_TEST_DOCKER_HOST (an engine started by the Makefile) when it answers, so a test
    run starts no second engine.
    """
    shared = os.environ.get("LLMOS_TEST_DOCKER_HOST")
    if shared and engine_answers(shared):
        yield shared
        return
    engine = ManagedDockerd(state_dir)
    engine.start()
    try:
        yield engine.docker_host
    finally:
        engine.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmos.sandbox.dockerd", description=__doc__)
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("--state-dir", type=Path, default=None, help="default: $LLMOS_HOME/dockerd")
    args = parser.parse_args(argv)
    engine = ManagedDockerd(args.state_dir)
    try:
        if args.action == "start":
            print(engine.start())
        elif args.action == "stop":
            engine.stop(force=True)
        else:
            running = engine._running_pid() is not None and engine_answers(engine.docker_host)
            print(engine.docker_host if running else "stopped")
            return 0 if running else 1
    except DockerdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
