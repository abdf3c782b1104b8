from __future__ import annotations

from pathlib import Path

import pytest

from llmos.tools import Risk, ToolContext, ToolRegistry
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
