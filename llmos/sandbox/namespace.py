"""The namespace backend: the worker inside bubblewrap, without Docker.

Isolation, outermost first:
- cgroup v1 memory + pids limits per session (when /sys/fs/cgroup is writable; else rlimits only);
- bubblewrap: new pid, net, ipc, uts and cgroup namespaces, a mount namespace whose root is a
  read-only tmpfs holding read-only /usr (+ /lib, /bin links), a tailored /etc (no shadow, no
  secrets), a private /tmp, a fresh /proc and minimal /dev, the session workspace at /workspace;
  no /run, no host /tmp, no /sys, no sockets of the host; --die-with-parent and --new-session;
- a seccomp filter (libseccomp): no socket() at all (socketpair stays), no ptrace, mount, bpf,
  keyctl, kexec, modules, unshare/setns or namespace-creating clone, io_uring, perf, userfaultfd,
  process_vm_*, personality; other architectures' syscalls kill the process;
- a non-root uid (config.sandbox.uid). Started as root, bwrap keeps only CAP_SETUID/CAP_SETGID and
  the worker drops to that uid before it reads any code (so root-owned files like /etc/shadow are
  closed to it even if they were visible); started as a normal user, a user namespace maps it;
- rlimits (CPU, DATA, AS, FSIZE, NPROC, NOFILE, CORE) set by the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import functools
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from llmos.sandbox.base import Limits, SandboxUnavailable, worker_args, worker_source
from llmos.sandbox.frame import WorkerSandbox
from llmos.sandbox.session import WorkerSession

if TYPE_CHECKING:
    from llmos.config import Config

SANDBOX_PYTHON = "/usr/bin/python3"
CGROUP_ROOT = Path("/sys/fs/cgroup")
# Processes bubblewrap itself keeps in the session cgroup (monitor + pid-1 init); `limits.pids`
# counts the worker and everything it starts.
BWRAP_PIDS = 2

DENIED_SYSCALLS = (
    "socket",
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "move_mount",
    "open_tree",
    "fsopen",
    "fsmount",
    "fsconfig",
    "fspick",
    "mount_setattr",
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "bpf",
    "keyctl",
    "add_key",
    "request_key",
    "unshare",
    "setns",
    "personality",
    "perf_event_open",
    "userfaultfd",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "open_by_handle_at",
    "name_to_handle_at",
    "reboot",
    "swapon",
    "swapoff",
    "syslog",
    "acct",
    "quotactl",
    "iopl",
    "ioperm",
    "lookup_dcookie",
    "fanotify_init",
    "vhangup",
    "kcmp",
    "pidfd_getfd",
)
NAMESPACE_FLAGS = (
    0x00020000,  # CLONE_NEWNS
    0x02000000,  # CLONE_NEWCGROUP
    0x04000000,  # CLONE_NEWUTS
    0x08000000,  # CLONE_NEWIPC
    0x10000000,  # CLONE_NEWUSER
    0x20000000,  # CLONE_NEWPID
    0x40000000,  # CLONE_NEWNET
)
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_MASKED_EQ = 7


def _scmp_errno(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


class _ScmpArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


@functools.cache
def seccomp_program() -> bytes | None:
    """The classic-BPF seccomp filter bwrap installs, built with libseccomp; None without it."""
    name = ctypes.util.find_library("seccomp")
    if name is None:
        return None
    lib = ctypes.CDLL(name, use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(_ScmpArgCmp),
    ]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
    if not ctx:
        return None
    try:

        def deny(syscall: str, action: int, *cmps: _ScmpArgCmp) -> None:
            number = lib.seccomp_syscall_resolve_name(syscall.encode())
            if number < 0:
                return  # not a syscall on this architecture
            array = (_ScmpArgCmp * max(1, len(cmps)))(*cmps)
            if lib.seccomp_rule_add_array(ctx, action, number, len(cmps), array) != 0:
                raise OSError(f"seccomp_rule_add({syscall}) failed")

        for syscall in DENIED_SYSCALLS:
            deny(syscall, _scmp_errno(errno.EPERM))
        for flag in NAMESPACE_FLAGS:
            deny("clone", _scmp_errno(errno.EPERM), _ScmpArgCmp(0, SCMP_CMP_MASKED_EQ, flag, flag))
        # clone3 passes its flags in memory a filter cannot read: ENOSYS makes libc fall back to clone.
        deny("clone3", _scmp_errno(errno.ENOSYS))
        fd = os.memfd_create("llmos-seccomp")
        try:
            if lib.seccomp_export_bpf(ctx, fd) != 0:
                return None
            os.lseek(fd, 0, os.SEEK_SET)
            return os.read(fd, 1 << 20)
        finally:
            os.close(fd)
    finally:
        lib.seccomp_release(ctx)


def _program_fd(program: bytes) -> int:
    fd = os.memfd_create("llmos-seccomp", 0)
    os.write(fd, program)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


class Cgroup:
    """One session's cgroup v1 memory + pids directories; removed (processes killed) on close."""

    def __init__(self, name: str) -> None:
        self.memory = CGROUP_ROOT / "memory" / "llmos" / name
        self.pids = CGROUP_ROOT / "pids" / "llmos" / name

    @staticmethod
    def available() -> str | None:
        """None when per-session cgroups can be made here, else why not."""
        if os.geteuid() != 0:
            return "cgroup limits need root"
        for controller in ("memory", "pids"):
            base = CGROUP_ROOT / controller
            if not (base / "cgroup.procs").exists():
                return f"no cgroup v1 {controller} controller at {base}"
            try:
                (base / "llmos").mkdir(exist_ok=True)
            except OSError as exc:
                return f"cannot create cgroups under {base} ({exc.strerror})"
        return None

    @staticmethod
    def remove_stale(min_age_s: float = 60.0) -> None:
        """Remove empty session cgroups a killed llmos left behind (live ones are never empty long)."""
        now = time.time()
        for controller in ("memory", "pids"):
            base = CGROUP_ROOT / controller / "llmos"
            with contextlib.suppress(OSError):
                for path in base.iterdir():
                    with contextlib.suppress(OSError, ValueError):
                        stale = path.is_dir() and now - path.stat().st_mtime > min_age_s
                        if stale and not (path / "cgroup.procs").read_text():
                            path.rmdir()

    def create(self, limits: Limits) -> None:
        self.memory.mkdir(parents=True, exist_ok=True)
        self.pids.mkdir(parents=True, exist_ok=True)
        memory = str(limits.memory_mb * 1024 * 1024 + 16 * 1024 * 1024)  # + bwrap and the interpreter
        (self.memory / "memory.limit_in_bytes").write_text(memory)
        memsw = self.memory / "memory.memsw.limit_in_bytes"
        if memsw.exists():  # no swapping around the limit
            memsw.write_text(memory)
        (self.pids / "pids.max").write_text(str(limits.pids + BWRAP_PIDS))

    @property
    def procs_files(self) -> tuple[str, str]:
        return str(self.memory / "cgroup.procs"), str(self.pids / "cgroup.procs")

    def peak_mb(self) -> float | None:
        with contextlib.suppress(OSError, ValueError):
            return int((self.memory / "memory.max_usage_in_bytes").read_text()) / (1024 * 1024)
        return None

    def pids_in(self) -> list[int]:
        found: set[int] = set()
        for directory in (self.memory, self.pids):
            with contextlib.suppress(OSError):
                found.update(int(line) for line in (directory / "cgroup.procs").read_text().split())
        return sorted(found)

    async def remove(self) -> None:
        """Kill every process left in the cgroup, then remove it."""
        deadline = time.monotonic() + 5.0
        while True:
            pids = self.pids_in()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            removed = True
            for directory in (self.memory, self.pids):
                try:
                    directory.rmdir()
                except FileNotFoundError:
                    pass
                except OSError:
                    removed = False
            if removed or time.monotonic() > deadline:
                return
            await asyncio.sleep(0.01)


def _root_layout() -> list[str]:
    """Read-only /usr and what the host python needs next to it (merged-/usr links or real dirs)."""
    args = ["--ro-bind", "/usr", "/usr"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = Path("/") / name
        if path.is_symlink():
            args += ["--symlink", os.readlink(path), f"/{name}"]
        elif path.is_dir():
            args += ["--ro-bind", str(path), f"/{name}"]
    return args


def _make_etc(directory: Path, uid: int) -> None:
    """A minimal /etc: users, hosts and the loader cache; nothing secret from the host."""
    directory.mkdir(parents=True, exist_ok=True)
    files = {
        "passwd": (
            "root:x:0:0:root:/root:/usr/sbin/nologin\n"
            f"sandbox:x:{uid}:{uid}:sandbox:/workspace:/usr/sbin/nologin\n"
        ),
        "group": f"root:x:0:\nsandbox:x:{uid}:\n",
        "hosts": "127.0.0.1 localhost sandbox\n::1 localhost\n",
        "hostname": "sandbox\n",
        "nsswitch.conf": "passwd: files\ngroup: files\nhosts: files\n",
    }
    for name, text in files.items():
        (directory / name).write_text(text)
    for name in ("ld.so.cache", "localtime"):
        source = Path("/etc") / name
        if source.exists():
            shutil.copyfile(source, directory / name)
    for path in [directory, *directory.iterdir()]:
        path.chmod(0o755 if path.is_dir() else 0o644)


def bwrap_command(
    *, etc: Path, workspace: Path, seccomp_fd: int | None, uid: int, as_root: bool
) -> list[str]:
    """The bubblewrap command line up to (not including) the program to run."""
    args = [
        shutil.which("bwrap") or "bwrap",
        "--unshare-ipc",
        "--unshare-pid",
        "--unshare-net",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--die-with-parent",
        "--new-session",
        "--hostname",
        "sandbox",
        *_root_layout(),
        "--ro-bind",
        str(etc),
        "/etc",
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        # Private, world-writable scratch (sticky); multiprocessing needs /dev/shm.
        "--perms",
        "1777",
        "--tmpfs",
        "/tmp",
        "--perms",
        "1777",
        "--tmpfs",
        "/dev/shm",
        "--bind",
        str(workspace),
        "/workspace",
        # No --chdir: bwrap holds no capabilities by then and the workspace is the sandbox uid's.
        "--remount-ro",
        "/",
        "--clearenv",
        "--setenv",
        "PATH",
        "/usr/bin:/bin",
        "--setenv",
        "HOME",
        "/workspace",
        "--setenv",
        "LANG",
        "C.UTF-8",
        "--cap-drop",
        "ALL",
    ]
    if as_root:
        # No user namespace: the worker is a real unprivileged uid to the kernel after it drops root.
        args += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        args += ["--unshare-user", "--uid", str(uid), "--gid", str(uid)]
    if seccomp_fd is not None:
        args += ["--seccomp", str(seccomp_fd)]
    return args


@functools.cache
def _probe(bwrap: str, as_root: bool) -> str | None:
    etc = Path("/nonexistent")
    with contextlib.suppress(OSError):
        import tempfile

        etc = Path(tempfile.mkdtemp(prefix="llmos-probe-"))
        _make_etc(etc, 65534)
    try:
        command = bwrap_command(etc=etc, workspace=etc, seccomp_fd=None, uid=65534, as_root=as_root)
        done = subprocess.run(
            [*command, SANDBOX_PYTHON, "-I", "-c", "print(6*7)"],
            capture_output=True,
            timeout=20,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"bubblewrap failed to start ({exc})"
    finally:
        shutil.rmtree(etc, ignore_errors=True)
    if done.stdout.strip() != b"42":
        detail = (done.stderr or done.stdout).decode(errors="replace").strip().splitlines()
        return f"bubblewrap cannot create namespaces here ({detail[-1] if detail else done.returncode})"
    return None


def namespace_available(config: Config) -> str | None:
    """None when the namespace backend works here, else why not (with the fix)."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return "bubblewrap is not installed (`apt-get install bubblewrap`)"
    if not Path(SANDBOX_PYTHON).exists():
        return f"no system interpreter at {SANDBOX_PYTHON} (`apt-get install python3`)"
    if seccomp_program() is None:
        return "libseccomp is missing, so no syscall filter (`apt-get install libseccomp2`)"
    return _probe(bwrap, os.geteuid() == 0)


class NamespaceWorker(WorkerSession):
    """The worker inside bubblewrap, in its own cgroups when the host lets us make them."""

    backend = "namespace"
    sandboxed = True

    def __init__(self, sandbox: NamespaceSandbox, workspace: Path, cgroup: Cgroup | None) -> None:
        super().__init__(workspace, max_calls=sandbox.config.sandbox.max_calls_per_session)
        self._sandbox = sandbox
        self._cgroup = cgroup

    async def _spawn(self, limits: Limits) -> asyncio.subprocess.Process:
        sandbox, cgroup = self._sandbox, self._cgroup
        workspace = sandbox.ready_workspace(self.workspace)
        seccomp_fd = _program_fd(sandbox.seccomp)
        try:
            command = bwrap_command(
                etc=sandbox.etc,
                workspace=workspace,
                seccomp_fd=seccomp_fd,
                uid=sandbox.uid,
                as_root=sandbox.as_root,
            )
            # With per-session pid limits the uid-wide RLIMIT_NPROC is only a backstop.
            nproc = 4096 if cgroup is not None else limits.pids
            program = [
                SANDBOX_PYTHON,
                "-I",
                "-c",
                worker_source(),
                *worker_args("/workspace", limits, uid=sandbox.uid if sandbox.as_root else None, nproc=nproc),
            ]
            launcher: list[str] = []
            if cgroup is not None:
                cgroup.create(limits)
                # Join the cgroups before bwrap forks, so every sandboxed process is born inside.
                launcher = [
                    "/bin/sh",
                    "-c",
                    'echo $$ > "$1" && echo $$ > "$2" && shift 2 && exec "$@"',
                    "llmos-sandbox",
                    *cgroup.procs_files,
                ]
            return await asyncio.create_subprocess_exec(
                *launcher,
                *command,
                "--",
                *program,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                pass_fds=(seccomp_fd,),
                env={"PATH": "/usr/bin:/bin"},
                start_new_session=True,
            )
        finally:
            os.close(seccomp_fd)

    async def _teardown(self) -> None:
        if self._cgroup is not None:
            await self._cgroup.remove()

    def _peak_memory(self) -> float | None:
        # The session's peak (worker and children) since it started: resetting the v1 counter
        # every call costs ~2 ms per round trip (it drains the per-cpu charge caches).
        return self._cgroup.peak_mb() if self._cgroup is not None else None


class NamespaceSandbox(WorkerSandbox[NamespaceWorker]):
    name = "namespace"
    sandboxed = True
    pooled = True

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        program = seccomp_program()
        if program is None:
            raise SandboxUnavailable("libseccomp is missing; install it with `apt-get install libseccomp2`.")
        self.seccomp = program
        self.uid = config.sandbox.uid
        self.as_root = os.geteuid() == 0
        self.instance_id = uuid.uuid4().hex[:8]  # names its cgroups: two kernels never share one
        self.etc = self.root / f"etc-{self.instance_id}"
        _make_etc(self.etc, self.uid)
        self.cgroups_reason = Cgroup.available()
        if self.cgroups_reason is None:
            Cgroup.remove_stale()

    def _prepare_workspace(self, path: Path) -> None:
        if self.as_root:
            os.chown(path, self.uid, self.uid)
        path.chmod(0o700)

    def _worker(self, workspace: Path) -> NamespaceWorker:
        # Named after the session (its workspace's name), or the spare directory of a warm worker,
        # whose cgroup keeps that name in the session that takes it.
        label = workspace.name.lstrip(".")
        cgroup = Cgroup(f"{self.instance_id}-{label}") if self.cgroups_reason is None else None
        return NamespaceWorker(self, workspace, cgroup)

    async def aclose(self) -> None:
        await super().aclose()
        shutil.rmtree(self.etc, ignore_errors=True)
