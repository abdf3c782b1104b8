"""File tools confined to the process's workspace (`ToolContext.workspace`).

A path from the model is always relative to the workspace. Absolute paths, `..` components and
NUL bytes are refused outright; then the path is resolved (following symlinks) and must still
lie inside the workspace, so a symlink that points outside cannot be used to read, write or
delete there. The last component is opened with O_NOFOLLOW, so a symlink swapped in after the
check is not followed either.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath
from typing import Any

from llmos.kernel.devices import Risk, ToolContext
from llmos.kernel.workspace import disk_use
from llmos.tools.registry import Tool, ToolError, tool

MAX_READ_CHARS = 100_000
MAX_LIST_ENTRIES = 1_000


def relative_path(path: str) -> PurePosixPath:
    """`path` as a relative path without '..', or ToolError saying why it is refused."""
    if "\x00" in path:
        raise ToolError("The path contains a NUL byte; give a plain relative path.")
    text = path.strip() or "."
    pure = PurePosixPath(text.replace("\\", "/"))
    if pure.is_absolute() or (len(text) > 1 and text[1] == ":"):
        raise ToolError(f"Path '{path}' is absolute; give a path inside the workspace, like 'notes.txt'.")
    if ".." in pure.parts:
        raise ToolError(f"Path '{path}' contains '..'; only paths inside the workspace are allowed.")
    return pure


def resolve_in_workspace(workspace: Path, path: str) -> Path:
    """The real path of `path` inside `workspace`, or ToolError saying why it is refused."""
    root = workspace.resolve()
    target = (root / relative_path(path)).resolve()
    if not target.is_relative_to(root):
        raise ToolError(f"Path '{path}' leads outside the workspace (through a symlink); it is not allowed.")
    return target


def _relative(workspace: Path, target: Path) -> str:
    return target.relative_to(workspace.resolve()).as_posix()


def _open_nofollow(target: Path, flags: int, mode: int = 0o644) -> int:
    try:
        return os.open(target, flags | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), mode)
    except OSError as exc:
        if exc.errno == 40:  # ELOOP: the last component became a symlink after the check
            raise ToolError(f"'{target.name}' is a symlink; it is not followed.") from exc
        raise


@tool
def read_file(path: str, ctx: ToolContext, max_chars: int = MAX_READ_CHARS) -> dict[str, Any]:
    """Read a text file from the workspace.

    Args:
        path: file path relative to the workspace, e.g. "notes/todo.txt".
        max_chars: return at most this many characters.
    """
    target = resolve_in_workspace(ctx.workspace, path)
    if not target.exists():
        raise ToolError(f"There is no file '{path}' in the workspace; call list_files to see what exists.")
    if target.is_dir():
        raise ToolError(f"'{path}' is a directory; call list_files to see its contents.")
    fd = _open_nofollow(target, os.O_RDONLY)
    with os.fdopen(fd, "rb") as handle:
        data = handle.read(max(0, max_chars) * 4 + 4)
    if b"\x00" in data[:8192]:
        raise ToolError(f"'{path}' is a binary file; only text files can be read.")
    text = data.decode("utf-8", errors="replace")
    size = target.stat().st_size
    truncated = len(text) > max_chars or len(data) < size
    return {"path": _relative(ctx.workspace, target), "content": text[:max_chars], "truncated": truncated}


@tool(risk=Risk.WRITE)
def write_file(path: str, content: str, ctx: ToolContext, append: bool = False) -> dict[str, Any]:
    """Write a text file in the workspace (parent folders are created).

    Args:
        path: file path relative to the workspace, e.g. "out/report.md".
        content: the text to write.
        append: add to the end of the file instead of replacing it.
    """
    target = resolve_in_workspace(ctx.workspace, path)
    if target.is_dir():
        raise ToolError(f"'{path}' is a directory; give a file name inside it.")
    target.parent.mkdir(parents=True, exist_ok=True)
    # the parent may have been swapped for a symlink meanwhile: check again after mkdir
    resolve_in_workspace(ctx.workspace, path)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
    data = content.encode("utf-8")
    _check_room(ctx, target, len(data), append)
    with os.fdopen(_open_nofollow(target, flags), "wb") as handle:
        handle.write(data)
    _give_to_workspace_owner(ctx.workspace, target)
    return {"path": _relative(ctx.workspace, target), "bytes_written": len(data), "appended": append}


def _check_room(ctx: ToolContext, target: Path, size: int, append: bool) -> None:
    """The sandbox's cap on the workspace (`sandbox.limits.workspace_mb`) holds for writes here too."""
    limit = ctx.workspace_limit_bytes
    if limit is None:
        return
    replaced = 0 if append or not target.is_file() else target.stat().st_blocks * 512
    used = disk_use(ctx.workspace, stop_above=limit + replaced)
    if used - replaced + size > limit:
        raise ToolError(
            f"Writing {size} bytes would take the workspace past its limit of "
            f"{limit // (1024 * 1024)} MB (sandbox.limits.workspace_mb); delete files that are not needed."
        )


def _give_to_workspace_owner(workspace: Path, target: Path) -> None:
    """Running as root, hand what was written (and the folders made for it) to the workspace's
    owner, the sandbox uid, so sandboxed code can change it as well as read it."""
    if os.geteuid() != 0:
        return
    owner = workspace.stat()
    root = workspace.resolve()
    path = target
    while path != root and path.is_relative_to(root):
        info = path.lstat()
        if (info.st_uid, info.st_gid) != (owner.st_uid, owner.st_gid):
            os.lchown(path, owner.st_uid, owner.st_gid)
        path = path.parent


@tool
def list_files(ctx: ToolContext, path: str = ".", recursive: bool = False) -> list[dict[str, Any]]:
    """List files and folders in the workspace.

    Args:
        path: folder relative to the workspace; "." is the workspace itself.
        recursive: also list the contents of sub-folders.
    """
    folder = resolve_in_workspace(ctx.workspace, path)
    if not folder.is_dir():
        raise ToolError(f"'{path}' is not a folder in the workspace; call list_files with path '.'.")
    root = ctx.workspace.resolve()
    entries: list[dict[str, Any]] = []
    # os.walk does not follow symlinked folders, so a link cannot pull outside files into the list
    for current, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(dirs) + sorted(files):
            full = Path(current) / name
            info = full.lstat()
            kind = "link" if stat.S_ISLNK(info.st_mode) else "dir" if stat.S_ISDIR(info.st_mode) else "file"
            entry: dict[str, Any] = {"path": full.relative_to(root).as_posix(), "type": kind}
            if kind == "file":
                entry["size"] = info.st_size
            entries.append(entry)
            if len(entries) >= MAX_LIST_ENTRIES:
                entries.append({"truncated": f"more than {MAX_LIST_ENTRIES} entries; list a sub-folder"})
                return entries
        if not recursive:
            break
    return entries


@tool(risk=Risk.IRREVERSIBLE)
def delete_file(path: str, ctx: ToolContext) -> dict[str, Any]:
    """Delete a file from the workspace (folders are not deleted).

    Args:
        path: file path relative to the workspace.
    """
    relative = relative_path(path)
    if relative.name in ("", "."):
        raise ToolError("Give the path of a file to delete, not the workspace itself.")
    # resolve the folder, not the file: deleting a symlink removes the link, never its target
    folder = resolve_in_workspace(ctx.workspace, str(relative.parent))
    target = folder / relative.name
    if not target.is_symlink() and not target.exists():
        raise ToolError(f"There is no file '{path}' in the workspace; call list_files to see what exists.")
    if target.is_dir() and not target.is_symlink():
        raise ToolError(f"'{path}' is a folder; only files can be deleted.")
    target.unlink()
    return {"deleted": _relative(ctx.workspace, target)}


def file_tools() -> list[Tool]:
    """The workspace file tools: read_file, write_file, list_files, delete_file."""
    return [read_file, write_file, list_files, delete_file]
