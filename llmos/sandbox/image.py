"""The docker sandbox image: pulled when a registry answers, built offline from the host otherwise.

Offline, the image is FROM scratch: the host's system CPython (/usr/bin/python3), its standard
library with precompiled bytecode (the container's root is read-only, so nothing could be cached at
run time), the shared libraries `ldd` says they need, the in-sandbox worker, a passwd entry for the
non-root sandbox uid, and empty /workspace and /tmp. There is no shell and no package manager in it:
less to attack. `docker import` of that ~36 MB tar takes about a second.

The image carries a label with a digest of everything that went into it, so `build_image` is a
no-op when nothing changed, and a label with the worker's digest, so the backend can tell a stale
image from a current one.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from llmos.config import Config
from llmos.sandbox.base import WORKER_PATH
from llmos.sandbox.dockerd import DockerdError, docker_command, engine_answers

PULL_IMAGE = "python:3.11-slim"
PULL_TIMEOUT_S = 5.0
HOST_PYTHON = Path("/usr/bin/python3")
WORKER_IN_IMAGE = "/opt/llmos/worker.py"
CONTENT_LABEL = "llmos.content"
WORKER_LABEL = "llmos.worker"
# Bump when the image layout changes, so existing images are rebuilt.
_LAYOUT_VERSION = "1"
# Parts of the standard library sandboxed code has no use for (GUI, test suites, build files).
_SKIPPED_STDLIB = {
    "test",
    "idlelib",
    "tkinter",
    "turtledemo",
    "ensurepip",
    "lib2to3",
    "pydoc_data",
    "venv",
    "distutils",
    "site-packages",
    "dist-packages",
    "__pycache__",
    "sitecustomize.py",  # Debian's hook points into /etc and imports apport
}
_SKIPPED_EXTENSIONS = re.compile(r"^(_test|_xx|xx|_ctypes_test)")
_LDD_PATH = re.compile(r"(?:=>\s*)?(/\S+)\s+\(0x")


class ImageBuildError(Exception):
    """The sandbox image could not be built; the message says what to do."""


def worker_source() -> bytes:
    """The in-sandbox worker script shipped in this package (the one every backend runs)."""
    try:
        return WORKER_PATH.read_bytes()
    except OSError:
        raise ImageBuildError(f"The sandbox worker {WORKER_PATH} is missing; reinstall llmos.") from None


def worker_digest() -> str:
    return hashlib.sha256(worker_source()).hexdigest()[:16]


def docker_host_of(config: Config) -> str | None:
    """The engine the sandbox uses: the config's docker_host, else $DOCKER_HOST, else the CLI default."""
    return config.sandbox.docker_host or os.environ.get("DOCKER_HOST") or None


def image_labels(config: Config) -> dict[str, str] | None:
    """Labels of the configured image, or None when the engine does not have it."""
    done = subprocess.run(
        [
            *docker_command(docker_host_of(config)),
            "image",
            "inspect",
            "--format",
            '{{range $k, $v := .Config.Labels}}{{$k}}={{$v}}{{"\\n"}}{{end}}',
            config.sandbox.image,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if done.returncode != 0:
        return None
    pairs = (line.partition("=") for line in done.stdout.splitlines() if "=" in line)
    return {key: value for key, _, value in pairs}


@dataclass
class _Rootfs:
    """What goes into the offline image: host files, symlinks, directories and generated files."""

    files: dict[str, Path] = field(default_factory=dict)
    symlinks: dict[str, str] = field(default_factory=dict)
    dirs: dict[str, int] = field(default_factory=dict)
    generated: dict[str, tuple[bytes, int]] = field(default_factory=dict)

    def add_host_path(self, path: str, depth: int = 0) -> None:
        """Add a host file under the same path, reproducing every symlink on the way (/lib -> usr/lib)."""
        if depth > 16:
            raise ImageBuildError(f"Too many symlinks while resolving {path}.")
        parts = Path(os.path.normpath(path)).parts
        current = Path("/")
        for index, part in enumerate(parts[1:], start=1):
            current = current / part
            if current.is_symlink():
                target = os.readlink(current)
                self.symlinks[str(current)] = target
                rest = parts[index + 1 :]
                self.add_host_path(os.path.join(current.parent, target, *rest), depth + 1)
                return
        if current.is_file():
            self.files[str(current)] = current

    def digest(self, extra: Iterable[str]) -> str:
        sha = hashlib.sha256(_LAYOUT_VERSION.encode())
        for item in extra:
            sha.update(item.encode() + b"\0")
        for arcname, host in sorted(self.files.items()):
            stat = host.stat()
            sha.update(f"f {arcname} {stat.st_size} {stat.st_mtime_ns}\0".encode())
        for arcname, target in sorted(self.symlinks.items()):
            sha.update(f"l {arcname} {target}\0".encode())
        for arcname, (data, mode) in sorted(self.generated.items()):
            sha.update(f"g {arcname} {mode}\0".encode() + hashlib.sha256(data).digest())
        return sha.hexdigest()[:24]


def _stdlib_dir() -> Path:
    done = subprocess.run(
        [str(HOST_PYTHON), "-c", "import sysconfig; print(sysconfig.get_paths()['stdlib'])"],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise ImageBuildError(
            f"Building the sandbox image offline needs the system Python {HOST_PYTHON}; "
            "install it with `apt-get install python3`."
        )
    return Path(done.stdout.strip())


def _stdlib_files(stdlib: Path) -> list[Path]:
    found: list[Path] = []
    for root, dirs, names in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in _SKIPPED_STDLIB and not d.startswith("config-"))
        for name in sorted(names):
            if name in _SKIPPED_STDLIB or (root.endswith("lib-dynload") and _SKIPPED_EXTENSIONS.match(name)):
                continue
            found.append(Path(root, name))
    return found


def _shared_libraries(binaries: list[Path]) -> set[str]:
    """The `ldd` closure of the binaries (ldd already follows dependencies of dependencies)."""
    done = subprocess.run(["ldd", *map(str, binaries)], capture_output=True, text=True, check=False)
    libraries = set()
    for line in done.stdout.splitlines():
        match = _LDD_PATH.search(line)
        if match and not line.startswith("/"):
            libraries.add(match.group(1))
    return libraries


def _passwd(uid: int) -> tuple[bytes, bytes]:
    user, group = ("nobody", "nogroup") if uid == 65534 else ("sandbox", "sandbox")
    passwd = (
        f"root:x:0:0:root:/root:/sbin/nologin\n{user}:x:{uid}:{uid}:llmos sandbox:/workspace:/sbin/nologin\n"
    )
    groups = f"root:x:0:\n{group}:x:{uid}:\n"
    return passwd.encode(), groups.encode()


def _plan(config: Config) -> _Rootfs:
    if not HOST_PYTHON.exists():
        raise ImageBuildError(
            f"Building the sandbox image offline needs {HOST_PYTHON}; "
            "install it with `apt-get install python3`."
        )
    rootfs = _Rootfs()
    stdlib = _stdlib_dir()
    stdlib_files = _stdlib_files(stdlib)
    rootfs.add_host_path(str(HOST_PYTHON))
    for path in stdlib_files:
        rootfs.add_host_path(str(path))
    extensions = [path for path in stdlib_files if path.suffix == ".so"]
    for library in _shared_libraries([HOST_PYTHON.resolve(), *extensions]):
        rootfs.add_host_path(library)
    uid = config.sandbox.uid
    passwd, group = _passwd(uid)
    rootfs.generated.update(
        {
            "/etc/passwd": (passwd, 0o644),
            "/etc/group": (group, 0o644),
            # Mount points docker fills in; they must exist because the root file system is read-only.
            "/etc/hosts": (b"", 0o644),
            "/etc/hostname": (b"", 0o644),
            "/etc/resolv.conf": (b"", 0o644),
            WORKER_IN_IMAGE: (worker_source(), 0o644),
        }
    )
    rootfs.dirs.update({"/tmp": 0o1777, "/workspace": 0o755, "/proc": 0o555, "/sys": 0o555, "/dev": 0o755})
    rootfs.dirs["/root"] = 0o700
    return rootfs


def _compile_bytecode(rootfs: _Rootfs, into: Path) -> dict[str, Path]:
    """Compile the image's .py files with the image's own interpreter; return arcname -> .pyc path."""
    sources = [arcname for arcname in rootfs.files if arcname.endswith(".py")]
    subprocess.run(
        [
            str(HOST_PYTHON),
            "-X",
            f"pycache_prefix={into}",
            "-m",
            "compileall",
            "-q",
            "-j",
            "0",
            # The hash is checked against nothing at import: the read-only image never changes.
            "--invalidation-mode",
            "unchecked-hash",
            "-i",
            "-",
        ],
        input="\n".join(str(rootfs.files[arcname]) for arcname in sources),
        capture_output=True,
        text=True,
        check=False,
    )
    compiled: dict[str, Path] = {}
    for arcname in sources:
        source = rootfs.files[arcname]
        # With a pycache prefix the .pyc sits at prefix/<source dir>/<name>.cpython-311.pyc; in the
        # image it goes to the usual <dir>/__pycache__/ of the path the source has there.
        pyc_name = f"{source.stem}.{sys.implementation.cache_tag}.pyc"
        host_pyc = into / str(source.parent).lstrip("/") / pyc_name
        if host_pyc.exists():
            compiled[str(Path(arcname).parent / "__pycache__" / pyc_name)] = host_pyc
    return compiled


def _write_tar(rootfs: _Rootfs, bytecode: dict[str, Path], out: io.BufferedIOBase) -> None:
    def info(arcname: str, kind: bytes, mode: int, size: int = 0, mtime: float = 0) -> tarfile.TarInfo:
        entry = tarfile.TarInfo(arcname.lstrip("/"))
        entry.type, entry.mode, entry.size, entry.mtime = kind, mode, size, mtime
        entry.uid = entry.gid = 0
        entry.uname = entry.gname = "root"
        return entry

    files = {**rootfs.files, **bytecode}
    wanted_dirs = set(rootfs.dirs)
    for arcname in [*files, *rootfs.symlinks, *rootfs.generated]:
        wanted_dirs.update(str(parent) for parent in Path(arcname).parents if str(parent) != "/")
    now = time.time()
    with tarfile.open(fileobj=out, mode="w|") as tar:
        for arcname in sorted(wanted_dirs - set(rootfs.symlinks)):
            tar.addfile(info(arcname, tarfile.DIRTYPE, rootfs.dirs.get(arcname, 0o755), mtime=now))
        for arcname, target in sorted(rootfs.symlinks.items()):
            entry = info(arcname, tarfile.SYMTYPE, 0o777, mtime=now)
            entry.linkname = target
            tar.addfile(entry)
        for arcname, host in sorted(files.items()):
            stat = host.stat()
            with host.open("rb") as data:
                tar.addfile(
                    info(arcname, tarfile.REGTYPE, stat.st_mode & 0o7777, stat.st_size, stat.st_mtime), data
                )
        for arcname, (content, mode) in sorted(rootfs.generated.items()):
            tar.addfile(info(arcname, tarfile.REGTYPE, mode, len(content), now), io.BytesIO(content))


def _image_changes(config: Config, digest: str) -> list[str]:
    changes = [
        "ENV PATH=/usr/local/bin:/usr/bin:/bin",
        "ENV LANG=C.UTF-8",
        "ENV PYTHONDONTWRITEBYTECODE=1",
        f"USER {config.sandbox.uid}",
        "WORKDIR /workspace",
        f"LABEL {CONTENT_LABEL}={digest}",
        f"LABEL {WORKER_LABEL}={worker_digest()}",
        f'CMD ["python3", "{WORKER_IN_IMAGE}"]',
    ]
    return [arg for change in changes for arg in ("--change", change)]


def _try_pull(config: Config, digest: str, say: Callable[[str], None]) -> bool:
    """Pull the official slim Python image and add the worker to it; False when no registry answers."""
    docker = docker_command(docker_host_of(config))
    say(f"pulling {PULL_IMAGE} (gives up after {PULL_TIMEOUT_S:.0f} s) ...")
    try:
        pulled = subprocess.run(
            [*docker, "pull", "-q", PULL_IMAGE],
            capture_output=True,
            text=True,
            timeout=PULL_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        say("  no registry answered in time")
        return False
    if pulled.returncode != 0:
        reason = (pulled.stderr.strip().splitlines() or ["unknown error"])[-1]
        say(f"  pull failed: {reason[:160]}")
        return False
    extend_image(
        config,
        PULL_IMAGE,
        config.sandbox.image,
        generated={WORKER_IN_IMAGE: worker_source()},
        dirs={"/workspace": 0o755},
        changes=_image_changes(config, digest),
    )
    return True


def extend_image(
    config: Config,
    base: str,
    target: str,
    *,
    host_paths: Iterable[str] = (),
    generated: dict[str, bytes] | None = None,
    symlinks: dict[str, str] | None = None,
    dirs: dict[str, int] | None = None,
    changes: list[str] | None = None,
) -> None:
    """Make `target` from `base` plus host files (with their shared libraries) and generated files.

    No build: `docker create` + `docker cp` of a tar + `docker commit`, which works offline.
    """
    docker = docker_command(docker_host_of(config))
    rootfs = _Rootfs()
    paths = list(host_paths)
    for path in paths:
        rootfs.add_host_path(path)
    for library in _shared_libraries([Path(path).resolve() for path in paths]):
        rootfs.add_host_path(library)
    rootfs.generated.update({arcname: (data, 0o644) for arcname, data in (generated or {}).items()})
    rootfs.symlinks.update(symlinks or {})
    rootfs.dirs.update(dirs or {})
    created = subprocess.run([*docker, "create", base], capture_output=True, text=True, check=False)
    if created.returncode != 0:
        raise ImageBuildError(f"docker create {base} failed: {created.stderr.strip()}")
    container = created.stdout.strip()
    try:
        buffer = io.BytesIO()
        _write_tar(rootfs, {}, buffer)
        copy = [*docker, "cp", "-", f"{container}:/"]
        subprocess.run(copy, input=buffer.getvalue(), check=True, capture_output=True)
        commit = [*docker, "commit", *(changes or []), container, target]
        subprocess.run(commit, check=True, capture_output=True)
    finally:
        subprocess.run([*docker, "rm", "-f", container], capture_output=True, check=False)


def _import_offline(config: Config, rootfs: _Rootfs, digest: str, say: Callable[[str], None]) -> None:
    docker = docker_command(docker_host_of(config))
    with tempfile.TemporaryDirectory(prefix="llmos-pyc-") as scratch:
        started = time.monotonic()
        bytecode = _compile_bytecode(rootfs, Path(scratch))
        say(f"compiled {len(bytecode)} bytecode files in {time.monotonic() - started:.1f} s")
        started = time.monotonic()
        importer = subprocess.Popen(
            [*docker, "import", *_image_changes(config, digest), "-", config.sandbox.image],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        assert importer.stdin is not None and importer.stderr is not None
        try:
            _write_tar(rootfs, bytecode, importer.stdin)  # type: ignore[arg-type]
        except BrokenPipeError:
            pass  # docker import failed early; its stderr says why
        finally:
            importer.stdin.close()
        stderr = importer.stderr.read().decode(errors="replace").strip()
        if importer.wait(timeout=300) != 0:
            raise ImageBuildError(f"docker import failed: {stderr}")
        say(f"imported {config.sandbox.image} in {time.monotonic() - started:.1f} s")


def build_image(config: Config, progress: bool = True, *, pull: bool = True) -> str:
    """Make sure the sandbox image exists and is current; return its name.

    Tries `docker pull python:3.11-slim` first (a registry may be reachable; it gives up within a
    few seconds), then builds offline from the host's Python. Nothing is done when the image exists
    with the same content label.
    """

    def say(message: str) -> None:
        if progress:
            print(f"[sandbox image] {message}", file=sys.stderr, flush=True)

    image = config.sandbox.image
    host = docker_host_of(config)
    if not engine_answers(host):
        raise ImageBuildError(
            f"No Docker engine answers at {host or 'the default socket'}; start one with "
            "`python -m llmos.sandbox.dockerd start` and set DOCKER_HOST (or sandbox.docker_host)."
        )
    started = time.monotonic()
    try:
        rootfs = _plan(config)
        digest = rootfs.digest([str(config.sandbox.uid), image])
        labels = image_labels(config)
        if labels is not None and labels.get(CONTENT_LABEL) == digest:
            say(f"{image} is up to date")
            return image
        if not (pull and _try_pull(config, digest, say)):
            size = sum(path.stat().st_size for path in rootfs.files.values())
            say(f"building offline from {HOST_PYTHON}: {len(rootfs.files)} files, {size / 1e6:.0f} MB")
            _import_offline(config, rootfs, digest, say)
    except (subprocess.CalledProcessError, OSError, DockerdError) as exc:
        raise ImageBuildError(f"Building the sandbox image {image} failed: {exc}") from None
    say(f"{image} ready in {time.monotonic() - started:.1f} s")
    return image
