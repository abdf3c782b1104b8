"""Escape attempts against every backend.

docker and namespace must block each one; the subprocess backend is not a boundary, so for the
escapes proper its tests only check that every result is labelled unsandboxed (running a real
fork bomb or a kill against the host there would hurt the host). Resource limits (loops, memory,
output floods) hold on every backend. After each attempt the session answers again, and the
`sandbox` fixture checks that the host kept no stray process, cgroup or workspace.
The host's file tools are raced on every backend too (the subprocess backend included: what is
counted there is what the host's tools touch): sandboxed code swaps a workspace folder for a
symlink to the host in a loop while the tools work in that folder.
"""

from __future__ import annotations

import ast
import asyncio
import os
import socket
import stat
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from llmos import Kernel
from llmos.config import SandboxLimits, load_config
from llmos.kernel.devices import ExecResult, Sandbox, ToolContext
from llmos.kernel.process import Process, detached
from llmos.tools.files import delete_file, file_tools, list_files, read_file, write_file
from llmos.tools.python import python
from llmos.tools.registry import ToolError

ESCAPED = "ESCAPED"


async def still_usable(sandbox: Sandbox, session: str = "s") -> None:
    result = await sandbox.exec(session, "6 * 7")
    assert result.value == "42", result


async def escape_attempt(
    sandbox: Sandbox, code: str, session: str = "s", limits: SandboxLimits | None = None
) -> ExecResult | None:
    """Run `code` in a sandboxing backend; on the subprocess backend only check the labelling."""
    if not sandbox.sandboxed:
        result = await sandbox.exec(session, "1")
        assert result.sandboxed is False
        assert "UNSANDBOXED" in result.stderr
        return None
    result = await sandbox.exec(session, code, limits)
    assert result.sandboxed is True
    assert ESCAPED not in result.stdout, result
    return result


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A host process with a secret in its environment and command line."""
    secret = f"llmos-secret-{uuid.uuid4().hex}"
    proc = subprocess.Popen(
        ["sleep", "300"], env={"PATH": "/usr/bin:/bin", "LLMOS_SECRET": secret, "SECRET_ARG": secret}
    )
    proc.secret = secret  # type: ignore[attr-defined]
    yield proc
    proc.kill()
    proc.wait()


async def test_read_etc_shadow(sandbox: Sandbox) -> None:
    code = """
for path in ("/etc/shadow", "/etc/gshadow", "/root/.bashrc"):
    try:
        data = open(path, "rb").read()
    except OSError as exc:
        print("blocked", path, type(exc).__name__)
    else:
        if data:
            print("ESCAPED", path)
"""
    result = await escape_attempt(sandbox, code)
    if result is not None:
        assert result.stdout.count("blocked") == 3, result
        await still_usable(sandbox)


async def test_code_runs_unprivileged(sandbox: Sandbox) -> None:
    code = """
import os
wanted = ("CapPrm", "CapEff", "NoNewPrivs", "Seccomp")
status = dict(line.split(":\\t") for line in open("/proc/self/status").read().splitlines() if ":\\t" in line)
[os.getuid(), os.geteuid(), os.getgroups(), [status[key].strip() for key in wanted]]
"""
    result = await escape_attempt(sandbox, code)
    if result is not None:
        uid, euid, groups, flags = ast.literal_eval(result.value or "None")
        assert uid != 0 and euid != 0 and 0 not in groups, result
        assert flags == ["0000000000000000", "0000000000000000", "1", "2"], result  # no caps, filtered


async def test_write_outside_workspace(sandbox: Sandbox, tmp_path: Path) -> None:
    name = f"llmos-escape-{uuid.uuid4().hex}"
    targets = [
        tmp_path / name,
        Path("/usr") / name,
        Path("/etc") / name,
        Path("/") / name,
        Path("/tmp") / name,
    ]
    code = f"""
import os
for path in {[str(t) for t in targets]!r} + ["../{name}", "/workspace/../{name}"]:
    try:
        with open(path, "w") as handle:
            handle.write("x")
        print("wrote", path)
    except OSError as exc:
        print("blocked", path, type(exc).__name__)
"""
    result = await escape_attempt(sandbox, code)
    if result is not None:
        # Only the sandbox's private /tmp may take a file; the host sees none of them.
        for target in targets:
            assert not target.exists(), target
        assert not (sandbox.workspace("s").parent / name).exists()
        await still_usable(sandbox)


async def test_fork_bomb(sandbox: Sandbox, limits: SandboxLimits) -> None:
    code = """
import os
while True:
    try:
        os.fork()
    except OSError:
        pass
"""
    result = await escape_attempt(sandbox, code, limits=limits.model_copy(update={"wall_time_s": 2.0}))
    if result is not None:
        assert result.timed_out and result.restarted, result
        await still_usable(sandbox)


async def test_fork_stops_at_pids_limit(sandbox: Sandbox, limits: SandboxLimits) -> None:
    code = """
import os, time
children = 0
try:
    for _ in range(10_000):
        if os.fork() == 0:
            time.sleep(60)
            os._exit(0)
        children += 1
except OSError as exc:
    print("stopped", children, type(exc).__name__)
"""
    result = await escape_attempt(sandbox, code)
    if result is not None:
        assert result.stdout.startswith("stopped"), result
        assert int(result.stdout.split()[1]) < limits.pids, result  # the worker counts too


async def test_memory_bomb_in_process(sandbox: Sandbox) -> None:
    # A resource limit, so it holds on every backend (RLIMIT_DATA turns it into a MemoryError).
    result = await sandbox.exec("s", "blob = bytearray(2 * 1024**3)")
    assert result.error is not None and "MemoryError" in result.error, result
    await still_usable(sandbox)


async def test_memory_bomb_across_processes(sandbox: Sandbox, limits: SandboxLimits) -> None:
    # Each child stays under RLIMIT_DATA; together they exceed the session's memory cgroup.
    code = """
import os
pids = []
for _ in range(4):
    pid = os.fork()
    if pid == 0:
        try:
            blob = bytearray(100 * 1024**2)
            for i in range(0, len(blob), 4096):
                blob[i] = 1
        except MemoryError:
            os._exit(3)
        os._exit(0)
    pids.append(pid)
print(sorted(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids))
"""
    result = await escape_attempt(sandbox, code)
    if result is not None:
        # Either children were OOM-killed / refused memory, or the worker itself was killed.
        assert result.restarted or result.stdout.strip() != "[0, 0, 0, 0]", result
        if result.memory_peak_mb is not None:
            assert result.memory_peak_mb <= limits.memory_mb + 64, result
        await still_usable(sandbox)


async def test_infinite_loop_times_out(sandbox: Sandbox, limits: SandboxLimits) -> None:
    short = limits.model_copy(update={"wall_time_s": 2.0})
    result = await sandbox.exec("s", "x = 1\nwhile True:\n    pass", short)
    assert result.timed_out and result.restarted and result.error, result
    after = await sandbox.exec("s", "'x' in globals()")
    assert after.value == "False"  # a restarted session has lost its variables


async def test_stdout_flood_is_truncated(sandbox: Sandbox, limits: SandboxLimits) -> None:
    code = """
import os, sys
for _ in range(20_000):
    print("x" * 1000)
try:
    for _ in range(64):
        os.write(1, b"y" * (1 << 20))
except OSError as exc:
    print("fd write stopped:", exc, file=sys.stderr)
"""
    result = await sandbox.exec("s", code)
    assert result.truncated, result.model_dump(exclude={"stdout", "stderr"})
    assert len(result.stdout.encode()) <= limits.output_bytes
    await still_usable(sandbox)


DISK_BOMB = """
import os
chunk = b"x" * (1 << 20)
for i in range(400):  # 1.6 GB in 4 MB files, each under the per-file limit
    with open(f"fill-{i}.bin", "wb") as f:
        for _ in range(4):
            f.write(chunk)
print("wrote everything")
"""


async def test_disk_bomb_stops_at_the_workspace_limit(sandbox: Sandbox, limits: SandboxLimits) -> None:
    capped = limits.model_copy(update={"workspace_mb": 32, "wall_time_s": 30.0, "cpu_s": 30.0})
    result = await sandbox.exec("s", DISK_BOMB, capped)
    assert "wrote everything" not in result.stdout, result
    assert result.error and "past its limit of 32 MB (sandbox.limits.workspace_mb)" in result.error, result
    used = sum(f.stat().st_size for f in sandbox.workspace("s").iterdir())
    # Stopped within a check or two (10 ms each) of crossing the limit, far from the 1.6 GB it asked for.
    assert used < 200 * 1024 * 1024, used
    await still_usable(sandbox)


async def test_a_flood_of_empty_files_counts_too(sandbox: Sandbox, limits: SandboxLimits) -> None:
    capped = limits.model_copy(update={"workspace_mb": 4, "wall_time_s": 30.0, "cpu_s": 30.0})
    code = "for i in range(1_000_000):\n    open(f'empty-{i}', 'w').close()\nprint('all created')"
    result = await sandbox.exec("s", code, capped)
    assert "all created" not in result.stdout, result
    assert result.error and "past its limit of 4 MB" in result.error, result
    assert len(list(sandbox.workspace("s").iterdir())) < 100_000
    await still_usable(sandbox)


async def test_an_overfull_workspace_may_shrink_but_not_grow(sandbox: Sandbox, limits: SandboxLimits) -> None:
    capped = limits.model_copy(update={"workspace_mb": 4})
    workspace = sandbox.workspace("s")
    for i in range(3):  # 6 MB, put there from outside (e.g. by the files tool)
        (workspace / f"big-{i}.bin").write_bytes(b"x" * (2 << 20))
    grow = await sandbox.exec("s", "open('more.bin', 'wb').write(b'y' * (1 << 20))", capped)
    assert grow.error and "may remove files but not add any" in grow.error, grow
    shrink = await sandbox.exec("s", "import os\nfor n in os.listdir('.'): os.remove(n)", capped)
    assert shrink.ok, shrink
    assert not list(workspace.iterdir())
    small = await sandbox.exec("s", "open('ok.bin', 'wb').write(b'z' * (1 << 20))", capped)
    assert small.ok and small.value == str(1 << 20), small


@pytest.mark.parametrize("family", ["tcp", "udp", "unix"])
async def test_network_connections_blocked(sandbox: Sandbox, tmp_path: Path, family: str) -> None:
    if family == "tcp":
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        address: object = listener.getsockname()
        attempt = f"s = socket.create_connection({address!r}, timeout=2); s.sendall(b'hi')"
    elif family == "udp":
        listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        listener.bind(("127.0.0.1", 0))
        address = listener.getsockname()
        attempt = f"s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.sendto(b'hi', {address!r})"
    else:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        path = str(tmp_path / "host.sock")
        listener.bind(path)
        listener.listen(8)
        attempt = f"s = socket.socket(socket.AF_UNIX); s.connect({path!r}); s.sendall(b'hi')"
    listener.setblocking(False)
    # A UDP datagram "sent" inside an isolated network namespace goes nowhere: for UDP the proof is
    # that the host listener received nothing; TCP and Unix connects must fail outright.
    success = "sent" if family == "udp" else "ESCAPED"
    code = f"""
import socket
try:
    {attempt}
    print({success!r})
except OSError as exc:
    print("blocked", type(exc).__name__, exc)
"""
    try:
        result = await escape_attempt(sandbox, code)
        if result is not None:
            assert family == "udp" or result.stdout.startswith("blocked"), result
            await asyncio.sleep(0.05)
            with pytest.raises(BlockingIOError):
                if family == "udp":
                    listener.recvfrom(16)
                else:
                    listener.accept()
            await still_usable(sandbox)
    finally:
        listener.close()


async def test_kill_host_process(sandbox: Sandbox, sleeper: subprocess.Popen[bytes]) -> None:
    code = f"""
import os, signal
try:
    os.kill({sleeper.pid}, signal.SIGKILL)
    print("ESCAPED")
except OSError as exc:
    print("blocked", type(exc).__name__)
os.kill(-1, signal.SIGKILL)  # everything this uid may signal: must stay inside the sandbox
"""
    await escape_attempt(sandbox, code)
    await asyncio.sleep(0.05)
    assert sleeper.poll() is None, "the host process was killed"
    if sandbox.sandboxed:
        await still_usable(sandbox)


async def test_read_host_process_environ(sandbox: Sandbox, sleeper: subprocess.Popen[bytes]) -> None:
    code = f"""
for name in ("environ", "cmdline"):
    try:
        print(open("/proc/{sleeper.pid}/" + name, "rb").read())
    except OSError as exc:
        print("blocked", name, type(exc).__name__)
import os
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        print(open(f"/proc/{{pid}}/environ", "rb").read())
    except OSError:
        pass
"""
    result = await escape_attempt(sandbox, code)
    if result is not None:
        assert sleeper.secret not in result.stdout, result  # type: ignore[attr-defined]
        assert result.stdout.count("blocked") == 2, result
        await still_usable(sandbox)


async def test_daemon_does_not_survive_the_session(
    sandbox: Sandbox, find_processes: Callable[[str], list[int]]
) -> None:
    marker = f"llmos-daemon-{uuid.uuid4().hex}"
    code = f"""
import os, sys
pid = os.fork()
if pid == 0:
    os.setsid()
    if os.fork() == 0:
        os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(300)", {marker!r}])
    os._exit(0)
os.waitpid(pid, 0)
print("daemon started")
"""
    if not sandbox.sandboxed:
        await escape_attempt(sandbox, code)
        return
    result = await sandbox.exec("s", code)
    assert result.stdout.strip() == "daemon started", result
    await still_usable(sandbox)
    await sandbox.close_session("s")
    for _ in range(50):
        if not find_processes(marker):
            break
        await asyncio.sleep(0.02)
    assert find_processes(marker) == [], "a daemon outlived its sandbox session"
    # A closed session starts afresh on the next call.
    await still_usable(sandbox)


async def test_results_say_whether_sandboxed(sandbox: Sandbox, backend: str) -> None:
    result = await sandbox.exec("s", "1 + 1")
    assert result.backend == backend
    assert result.sandboxed is (backend != "subprocess")
    assert sandbox.sandboxed is result.sandboxed


async def test_host_environment_does_not_leak(sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every backend (subprocess too) starts the worker with a clean environment.
    monkeypatch.setenv("LLMOS_TEST_HOST_SECRET", "hunter2")
    result = await sandbox.exec("s", "import os\nsorted(os.environ)")
    assert result.value is not None and "LLMOS_TEST_HOST_SECRET" not in result.value
    assert "LLMOS_HOME" not in result.value


# The file tools run in the host process, as root here, on the workspace that sandboxed code
# shares. The code below swaps a folder `d` of the workspace with a symlink `l` to a host folder
# (renameat2 with RENAME_EXCHANGE, in a loop) while the host calls every file tool on paths under
# `d/`; the host folder holds root-only files with the same names as those in `d`.
RACE_CALLS = 1_500
RACE_LIMITS = SandboxLimits(wall_time_s=60.0, cpu_s=60.0, memory_mb=128, pids=32, output_bytes=64_000)
OUTSIDE_TEXT = b"root-only, outside the workspace"
OUTSIDE_ONLY = "outside-only.txt"  # a name only the host folder has, to spot it in a listing

RACE_SETUP = """
import os
os.mkdir("d")
for name in ("x", "y"):
    with open(os.path.join("d", name), "w") as handle:
        handle.write("inside")
os.symlink({outside!r}, "l")
"""

SWAPPER = """
import ctypes, os, time
libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD, RENAME_EXCHANGE = -100, 2
exchanges = 0
deadline = time.monotonic() + {seconds}
while time.monotonic() < deadline and not os.path.exists("stop"):
    for _ in range(100):
        if libc.renameat2(AT_FDCWD, b"d", AT_FDCWD, b"l", RENAME_EXCHANGE) == 0:
            exchanges += 1
print("exchanges", exchanges)
"""


class OutsideFolder:
    """A host folder of root-owned 0600 files, put back as it was after anything touched it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir()
        self.lay()
        self.expected = self.snapshot()

    def lay(self) -> None:
        for entry in os.listdir(self.path):
            if entry not in ("x", "y", OUTSIDE_ONLY):
                os.unlink(self.path / entry)
        for name in ("x", "y", OUTSIDE_ONLY):
            fd = os.open(self.path / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            os.write(fd, OUTSIDE_TEXT)
            os.fchown(fd, 0, 0)
            os.fchmod(fd, 0o600)
            os.close(fd)

    def snapshot(self) -> dict[str, tuple[int, int, int, bytes]]:
        found = {}
        for name in sorted(os.listdir(self.path)):
            info = os.lstat(self.path / name)
            data = (self.path / name).read_bytes() if stat.S_ISREG(info.st_mode) else b""
            found[name] = (info.st_uid, info.st_gid, info.st_mode, data)
        return found

    def touched(self) -> bool:
        """Whether anything here changed (created, written, deleted, chowned); if so it is laid again."""
        if self.snapshot() == self.expected:
            return False
        self.lay()
        return True


@dataclass
class Tally:
    calls: int = 0
    escaped: int = 0  # the call read, listed, changed or deleted something in the host folder
    refused: int = 0  # the call saw the link and said no

    def __str__(self) -> str:
        return f"{self.escaped} of {self.calls} escaped, {self.refused} refused"


def race_the_file_tools(ctx: ToolContext, outside: OutsideFolder, real_d: int) -> dict[str, Tally]:
    """Each file tool RACE_CALLS times on `d/`, counting the calls that touched the host folder."""
    tallies = {name: Tally() for name in ("read_file", "write_file", "delete_file", "list_files")}

    def attempt(name: str, call: Callable[[], Any], leaked: Callable[[Any], bool]) -> None:
        tally = tallies[name]
        tally.calls += 1
        try:
            result = call()
        except ToolError:
            result = None
            tally.refused += 1
        except OSError:
            result = None
        if outside.touched() or (result is not None and leaked(result)):
            tally.escaped += 1

    for _ in range(RACE_CALLS):
        attempt(
            "read_file",
            lambda: read_file(path="d/x", ctx=ctx),
            lambda result: result.content["content"].encode() == OUTSIDE_TEXT,
        )
    for _ in range(RACE_CALLS):
        attempt("write_file", lambda: write_file(path="d/x", content="host", ctx=ctx), lambda _: False)
    for _ in range(RACE_CALLS):
        # put d/y back through a handle on the real folder, wherever its name is now
        os.close(os.open("y", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=real_d))
        attempt("delete_file", lambda: delete_file(path="d/y", ctx=ctx), lambda _: False)
    for _ in range(RACE_CALLS):
        attempt(
            "list_files",
            lambda: list_files(path="d", ctx=ctx),
            lambda result: any(entry["path"].endswith(OUTSIDE_ONLY) for entry in result),
        )
    return tallies


async def wait_until_swapping(workspace: Path, swapper: asyncio.Task[ExecResult]) -> None:
    for _ in range(1_000):
        if (workspace / "d").is_symlink():
            return
        assert not swapper.done(), swapper.result()
        await asyncio.sleep(0.01)
    raise AssertionError("the swapper never swapped d and l")


async def test_file_tools_are_not_turned_against_the_host(sandbox: Sandbox, tmp_path: Path) -> None:
    outside = OutsideFolder(tmp_path / "outside")
    setup = await sandbox.exec("s", RACE_SETUP.format(outside=str(outside.path)), RACE_LIMITS)
    assert setup.ok, setup
    workspace = sandbox.workspace("s")
    ctx = ToolContext(process=detached(1), workspace=workspace)
    real_d = os.open(workspace / "d", os.O_RDONLY | os.O_DIRECTORY)
    swapper = asyncio.create_task(sandbox.exec("s", SWAPPER.format(seconds=50), RACE_LIMITS))
    try:
        await wait_until_swapping(workspace, swapper)
        tallies = await asyncio.to_thread(race_the_file_tools, ctx, outside, real_d)
    finally:
        (workspace / "stop").touch()
        swapped = await swapper
        os.close(real_d)
    report = "; ".join(f"{name}: {tally}" for name, tally in tallies.items())
    print(report)
    assert swapped.ok and int(swapped.stdout.split()[-1]) > 0, swapped
    assert all(tally.escaped == 0 for tally in tallies.values()), report
    # the race was real: every tool met the symlink and refused it some of the time
    assert all(tally.refused > 0 for tally in tallies.values()), report
    assert outside.snapshot() == outside.expected


KERNEL_SWAPPER = """
import ctypes, os, threading, time
os.mkdir("d")
with open(os.path.join("d", "x"), "w") as handle:
    handle.write("inside")
os.symlink({outside!r}, "l")
exchanges = 0

def swap():
    global exchanges
    libc = ctypes.CDLL(None, use_errno=True)
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline and not os.path.exists("stop"):
        for _ in range(100):
            if libc.renameat2(-100, b"d", -100, b"l", 2) == 0:
                exchanges += 1

swapper = threading.Thread(target=swap, daemon=True)
swapper.start()
while not os.path.islink("d"):
    time.sleep(0.001)
"""


async def write_while_swapped(proc: Process, outside: str, writes: int) -> dict[str, Any]:
    """A program that starts the swapper in its own sandbox session, then calls write_file on d/x."""

    async def call(name: str, **arguments: Any) -> Any:
        return await proc.syscall("tool.call", name=name, arguments=arguments)

    folder = OutsideFolder(Path(outside))
    started = (await call("python", code=KERNEL_SWAPPER.format(outside=outside))).unwrap()
    landed = refused = 0
    for _ in range(writes):
        reply = (await call("write_file", path="d/x", content="host")).unwrap()
        refused += not reply.ok
        landed += folder.touched()
    (await call("write_file", path="stop", content="")).unwrap()
    done = (await call("python", code="swapper.join(10)\nexchanges")).unwrap()
    return {"started": started, "landed": landed, "refused": refused, "exchanges": done}


async def test_write_file_through_the_kernel_is_not_turned_against_the_host(tmp_path: Path) -> None:
    config = load_config(env={"LLMOS_HOME": str(tmp_path / "home"), "LLMOS_SANDBOX__BACKEND": "namespace"})
    async with Kernel(config) as kernel:  # the default policy: writes are allowed without asking
        kernel.tools.register(python, *file_tools())
        info = await kernel.run(
            write_while_swapped,
            args={"outside": str(tmp_path / "outside"), "writes": 800},
            capabilities=["tool:*"],
        )
    assert info.error is None, info.error
    outcome = info.result
    assert outcome["started"]["ok"] and int(outcome["exchanges"]["content"]["value"]) > 0, outcome
    assert outcome["landed"] == 0, outcome
    assert outcome["refused"] > 0, outcome  # the writes did meet the symlink
