from __future__ import annotations

import asyncio
import errno
import os
import socket
import stat
import subprocess
import sys
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from llmos.tools import Risk, ToolContext, ToolRegistry, ToolResult, files
from llmos.tools.files import delete_file, file_tools, list_files, read_file, write_file


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    secret = tmp_path / "outside" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text("top secret")
    return secret


def test_risks_and_registry() -> None:
    registry = ToolRegistry(file_tools())
    assert registry.names() == ["read_file", "write_file", "list_files", "delete_file"]
    assert read_file.risk is Risk.READ and list_files.risk is Risk.READ
    assert write_file.risk is Risk.WRITE
    assert delete_file.risk is Risk.IRREVERSIBLE
    for spec in registry.specs():
        assert "ctx" not in spec.parameters["properties"]
        assert spec.description


async def test_write_read_list_delete(ctx: ToolContext, workspace: Path) -> None:
    written = await write_file.invoke({"path": "notes/todo.txt", "content": "milk\n"}, ctx)
    assert written.ok and written.content == {"path": "notes/todo.txt", "bytes_written": 5, "appended": False}
    await write_file.invoke({"path": "notes/todo.txt", "content": "eggs\n", "append": True}, ctx)
    assert (workspace / "notes" / "todo.txt").read_text() == "milk\neggs\n"
    read = await read_file.invoke('{"path": "notes/todo.txt"}', ctx)
    assert read.content == {"path": "notes/todo.txt", "content": "milk\neggs\n", "truncated": False}
    short = await read_file.invoke({"path": "./notes//todo.txt", "max_chars": 3}, ctx)
    assert short.content == {"path": "notes/todo.txt", "content": "mil", "truncated": True}
    top = await list_files.invoke({}, ctx)
    assert top.content == [{"path": "notes", "type": "dir"}]
    deep = await list_files.invoke({"recursive": True}, ctx)
    assert deep.content == [
        {"path": "notes", "type": "dir"},
        {"path": "notes/todo.txt", "type": "file", "size": 10},
    ]
    deleted = await delete_file.invoke({"path": "notes/todo.txt"}, ctx)
    assert deleted.content == {"deleted": "notes/todo.txt"}
    assert not (workspace / "notes" / "todo.txt").exists()


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/etc/passwd", "is absolute"),
        ("../outside/secret.txt", "contains '..'"),
        ("notes/../../outside/secret.txt", "contains '..'"),
        ("..", "contains '..'"),
        ("..\\outside\\secret.txt", "contains '..'"),
        ("C:\\Windows\\win.ini", "is absolute"),
        ("a\x00b", "NUL byte"),
    ],
)
async def test_hostile_paths_are_refused_by_every_tool(
    ctx: ToolContext, outside: Path, path: str, message: str
) -> None:
    for call in (
        read_file.invoke({"path": path}, ctx),
        write_file.invoke({"path": path, "content": "pwned"}, ctx),
        list_files.invoke({"path": path}, ctx),
        delete_file.invoke({"path": path}, ctx),
    ):
        result = await call
        assert not result.ok and message in (result.error or "")
    assert outside.read_text() == "top secret"


async def test_symlinks_that_escape_are_refused(ctx: ToolContext, workspace: Path, outside: Path) -> None:
    (workspace / "link.txt").symlink_to(outside)
    (workspace / "linkdir").symlink_to(outside.parent, target_is_directory=True)
    for path in ("link.txt", "linkdir/secret.txt"):
        read = await read_file.invoke({"path": path}, ctx)
        assert not read.ok and "leads outside the workspace" in (read.error or "")
        write = await write_file.invoke({"path": path, "content": "pwned"}, ctx)
        assert not write.ok
    new = await write_file.invoke({"path": "linkdir/new.txt", "content": "pwned"}, ctx)
    assert not new.ok and not (outside.parent / "new.txt").exists()
    listed = await list_files.invoke({"path": "linkdir"}, ctx)
    assert not listed.ok
    everything = await list_files.invoke({"recursive": True}, ctx)
    assert {e["path"]: e["type"] for e in everything.content} == {"link.txt": "link", "linkdir": "link"}
    # deleting a link removes the link, never what it points to
    assert (await delete_file.invoke({"path": "link.txt"}, ctx)).ok
    assert not (workspace / "link.txt").is_symlink() and outside.read_text() == "top secret"
    refused = await delete_file.invoke({"path": "linkdir/secret.txt"}, ctx)
    assert not refused.ok and outside.exists()


async def test_symlinks_inside_the_workspace_are_fine(ctx: ToolContext, workspace: Path) -> None:
    (workspace / "real.txt").write_text("hello")
    (workspace / "alias.txt").symlink_to("real.txt")
    assert (await read_file.invoke({"path": "alias.txt"}, ctx)).content["content"] == "hello"


async def test_model_mistakes_get_helpful_errors(ctx: ToolContext, workspace: Path) -> None:
    missing = await read_file.invoke({"path": "nope.txt"}, ctx)
    assert (
        missing.error == "There is no file 'nope.txt' in the workspace; call list_files to see what exists."
    )
    (workspace / "dir").mkdir()
    assert "is a directory" in ((await read_file.invoke({"path": "dir"}, ctx)).error or "")
    assert "is a directory" in ((await write_file.invoke({"path": "dir", "content": ""}, ctx)).error or "")
    assert "only files" in ((await delete_file.invoke({"path": "dir"}, ctx)).error or "")
    assert "not the workspace" in ((await delete_file.invoke({"path": "."}, ctx)).error or "")
    assert "not a folder" in ((await list_files.invoke({"path": "nope"}, ctx)).error or "")
    (workspace / "blob.bin").write_bytes(b"\x00\x01\x02")
    assert "binary file" in ((await read_file.invoke({"path": "blob.bin"}, ctx)).error or "")
    wrong = await write_file.invoke({"path": "a.txt"}, ctx)
    assert "argument 'content' is required" in (wrong.error or "")


async def test_os_errors_become_results(ctx: ToolContext, workspace: Path) -> None:
    (workspace / "plain.txt").write_text("x")
    result = await write_file.invoke({"path": "plain.txt/inner.txt", "content": "x"}, ctx)
    assert not result.ok and "tool 'write_file' failed" in (result.error or "")


@pytest.fixture(params=["openat2", "walk"])
def lookup(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways a path is looked up: openat2, and the walk used where the kernel has no openat2."""
    if request.param == "walk":

        def no_openat2(*args: object) -> int:
            raise OSError(errno.ENOSYS, "Function not implemented")

        monkeypatch.setattr(files, "_openat2", no_openat2)
    name: str = request.param
    return name


def special_files(workspace: Path) -> list[str]:
    """A FIFO nobody writes to, a listening Unix socket and a character device like /dev/null."""
    os.mkfifo(workspace / "fifo")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(workspace / "socket"))
    listener.listen()
    os.mknod(workspace / "device", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.chmod(workspace / "device", 0o666)
    return ["fifo", "socket", "device"]


async def without_blocking(call: Awaitable[ToolResult], fifo: Path) -> ToolResult:
    """The call's result; fails the test if it hung on the FIFO (as a plain open() does, forever)."""
    task = asyncio.ensure_future(call)
    done, _ = await asyncio.wait({task}, timeout=30)
    if not done:
        os.close(os.open(fifo, os.O_RDWR | os.O_NONBLOCK))  # frees the blocked thread
        await task
        pytest.fail("a file tool blocked on a FIFO nobody writes to")
    return task.result()


async def test_fifos_sockets_and_devices_are_refused_at_once(
    ctx: ToolContext, workspace: Path, lookup: str
) -> None:
    kinds = {"fifo": "named pipe (FIFO)", "socket": "socket", "device": "character device"}
    fifo = workspace / "fifo"
    for name in special_files(workspace):
        read = await without_blocking(read_file.invoke({"path": name}, ctx), fifo)
        assert (
            read.error == f"'{name}' is a {kinds[name]}, not a regular file; only regular files can be read."
        )
        write = await without_blocking(write_file.invoke({"path": name, "content": "x"}, ctx), fifo)
        assert not write.ok and "not a regular file; only regular files can be written." in (
            write.error or ""
        )
    listed = await list_files.invoke({}, ctx)
    assert listed.content == [{"path": name, "type": "other"} for name in ("device", "fifo", "socket")]
    # unlinking opens nothing, so these may be deleted
    for name in kinds:
        assert (await delete_file.invoke({"path": name}, ctx)).ok
    assert list(workspace.iterdir()) == []


async def test_the_basics_work_with_either_lookup(ctx: ToolContext, workspace: Path, lookup: str) -> None:
    await test_write_read_list_delete(ctx, workspace)
    assert not (await read_file.invoke({"path": "../x"}, ctx)).ok


async def test_a_symlinked_folder_is_followed_only_inside(
    ctx: ToolContext, workspace: Path, outside: Path, lookup: str
) -> None:
    (workspace / "real").mkdir()
    (workspace / "real" / "a.txt").write_text("inside")
    (workspace / "alias").symlink_to("real")
    (workspace / "out").symlink_to(outside.parent)
    inside = await read_file.invoke({"path": "alias/a.txt"}, ctx)
    if lookup == "openat2":  # the kernel keeps the lookup beneath the workspace, links and all
        assert inside.content == {"path": "alias/a.txt", "content": "inside", "truncated": False}
    else:  # without openat2 no symlink is followed
        assert inside.error is not None and "goes through the symlink 'alias'" in inside.error
    for call in (
        read_file.invoke({"path": "out/secret.txt"}, ctx),
        write_file.invoke({"path": "out/secret.txt", "content": "pwned"}, ctx),
        write_file.invoke({"path": "out/new/new.txt", "content": "pwned"}, ctx),
        list_files.invoke({"path": "out"}, ctx),
        delete_file.invoke({"path": "out/secret.txt"}, ctx),
    ):
        result = await call
        assert not result.ok and "symlink" in (result.error or ""), result
    assert outside.read_text() == "top secret" and sorted(os.listdir(outside.parent)) == ["secret.txt"]


SWAPPER = """
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
deadline = time.monotonic() + 60
while time.monotonic() < deadline and not os.path.exists("stop"):
    for _ in range(100):
        libc.renameat2(-100, b"d", -100, b"l", 2)  # AT_FDCWD, RENAME_EXCHANGE
"""


async def test_a_folder_swapped_for_a_link_never_leads_outside(
    ctx: ToolContext, workspace: Path, outside: Path, lookup: str
) -> None:
    # A process swaps the folder d with a link to the outside folder while every tool works on d/.
    os.chmod(outside, 0o600)
    (workspace / "d").mkdir()
    (workspace / "d" / "secret.txt").write_text("inside")
    (workspace / "l").symlink_to(outside.parent)
    real_d = os.open(workspace / "d", os.O_RDONLY | os.O_DIRECTORY)
    swapper = subprocess.Popen([sys.executable, "-c", SWAPPER], cwd=workspace)
    refused = 0
    try:
        for _ in range(500):
            os.close(os.open("secret.txt", os.O_WRONLY | os.O_CREAT, dir_fd=real_d))
            for call in (
                read_file.invoke({"path": "d/secret.txt"}, ctx),
                write_file.invoke({"path": "d/secret.txt", "content": "host"}, ctx),
                write_file.invoke({"path": "d/new.txt", "content": "host"}, ctx),
                list_files.invoke({"path": "d"}, ctx),
                delete_file.invoke({"path": "d/secret.txt"}, ctx),
            ):
                result = await call
                assert result.content is None or "top secret" not in str(result.content), result
                refused += not result.ok
    finally:
        (workspace / "stop").touch()
        swapper.wait(timeout=60)
        os.close(real_d)
    assert outside.read_text() == "top secret" and sorted(os.listdir(outside.parent)) == ["secret.txt"]
    assert refused > 0  # the tools did meet the link


@pytest.fixture
def sandbox_owned(workspace: Path) -> Path:
    """The workspace as the kernel makes it when it runs as root: the sandbox uid's, mode 0700."""
    if os.geteuid() != 0:
        pytest.skip("needs root: the tools take the workspace owner's rights only when llmos runs as root")
    os.chown(workspace, 65534, 65534)
    workspace.chmod(0o700)
    return workspace


async def test_as_root_the_tools_work_with_the_workspace_owners_rights(
    ctx: ToolContext, sandbox_owned: Path, outside: Path
) -> None:
    assert (await write_file.invoke({"path": "made/new.txt", "content": "x"}, ctx)).ok
    for made in (sandbox_owned / "made", sandbox_owned / "made" / "new.txt"):
        assert (made.stat().st_uid, made.stat().st_gid) == (65534, 65534)  # no chown needed
    # a root-only file that got into the workspace (a hard link here) stays out of reach
    outside.chmod(0o600)
    os.link(outside, sandbox_owned / "linked.txt")
    read = await read_file.invoke({"path": "linked.txt"}, ctx)
    assert not read.ok and "Permission denied" in (read.error or "")
    assert not (await write_file.invoke({"path": "linked.txt", "content": "pwned"}, ctx)).ok
    assert outside.read_text() == "top secret"


def fsuid() -> int:
    status = Path("/proc/thread-self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[4])


async def test_the_owners_rights_are_this_threads_only_and_given_back(
    ctx: ToolContext, sandbox_owned: Path
) -> None:
    with ThreadPoolExecutor(1) as other:
        other.submit(fsuid).result()  # started before: a thread started inside would inherit the rights
        with files._filesystem_rights_of(65534, 65534):
            assert fsuid() == 65534
            # setfsuid is per thread: every other thread of llmos keeps root's rights meanwhile
            assert other.submit(fsuid).result() == 0
    assert fsuid() == 0
    # the worker thread that ran a tool is root again afterwards, also after a refusal
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(1) as worker:
        loop.set_default_executor(worker)
        assert (await write_file.invoke({"path": "a.txt", "content": "x"}, ctx)).ok
        assert not (await read_file.invoke({"path": "missing.txt"}, ctx)).ok
        assert await asyncio.to_thread(fsuid) == 0
