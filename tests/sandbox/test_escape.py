"""Escape attempts against every backend.

docker and namespace must block each one; the subprocess backend is not a boundary, so for the
escapes proper its tests only check that every result is labelled unsandboxed (running a real
fork bomb or a kill against the host there would hurt the host). Resource limits (loops, memory,
output floods) hold on every backend. After each attempt the session answers again, and the
`sandbox` fixture checks that the host kept no stray process, cgroup or workspace.
"""

from __future__ import annotations

import ast
import asyncio
import socket
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from llmos.config import SandboxLimits
from llmos.sandbox.base import ExecResult, Sandbox

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
