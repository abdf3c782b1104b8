"""File tools confined to the process's workspace (`ToolContext.workspace`).

What is guaranteed: a file tool reads, writes, lists and deletes only what lies beneath the
workspace, and never blocks on what it finds there, even while sandboxed code (which shares the
folder, and may be renaming folders and symlinks in a loop) races it. Why:

- A path from the model is relative: absolute paths, `..` components and NUL bytes are refused.
- A path is looked up once, by the kernel, beneath a handle on the workspace folder: openat2(2)
  with RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV. A symlink that stays inside
  the workspace is followed; one that leads out (absolute, or `..` past the top) is refused.
  Everything after that goes through the descriptor it returned (fstat, read, write, truncate),
  and a delete unlinks a name inside a folder opened the same way, so there is no second lookup
  by name for a swapped folder or link to redirect. Where openat2 is missing (Linux before 5.6)
  or filtered, the path is walked one component at a time with O_NOFOLLOW and no symlink at all
  is followed. Listing walks folders by descriptor too and never follows a link.
- Only regular files are read or written and only folders listed. Files are opened with
  O_NONBLOCK and O_NOCTTY, and a FIFO, socket or device node is refused at once (a FIFO with no
  writer cannot hold a thread). Deleting one is allowed: unlinking does not open it.
- When llmos runs as root, the work is done with the filesystem rights of the workspace's owner
  (the sandbox uid): setfsuid/setfsgid on the thread doing it (per thread on Linux), restored
  after. So a file the tools create belongs to that uid without a chown, and even a lookup bug
  could not read or change a file the sandbox uid may not (root's supplementary groups stay,
  so a file readable by group root still is).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat
import sys
from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import Any

from llmos.kernel.devices import Risk, ToolContext, ToolResult
from llmos.kernel.workspace import ENTRY_BYTES
from llmos.tools.registry import Tool, ToolError, tool

MAX_READ_CHARS = 100_000
MAX_LIST_ENTRIES = 1_000
MAX_DEPTH = 100  # folders below this many levels are not listed or counted: one descriptor per level

_O_PATH = getattr(os, "O_PATH", os.O_RDONLY)  # a handle for lookups only: nothing is opened for reading
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_FOLDER = _O_PATH | os.O_DIRECTORY
_LISTED_FOLDER = os.O_RDONLY | os.O_DIRECTORY | os.O_NONBLOCK

_SYS_OPENAT2 = 437  # the same number on every Linux architecture
_RESOLVE_NO_XDEV, _RESOLVE_NO_MAGICLINKS, _RESOLVE_BENEATH = 0x01, 0x02, 0x08
_RESOLVE = _RESOLVE_BENEATH | _RESOLVE_NO_MAGICLINKS | _RESOLVE_NO_XDEV
_LOOKUP_TRIES = 8  # openat2 says EAGAIN when a rename raced a `..` in a symlink: look up again

_libc = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


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


def _openat2(dir_fd: int, path: str, flags: int, mode: int) -> int:
    """openat2(2) beneath `dir_fd`; OSError(ENOSYS) where the kernel (or libc) has none."""
    if _libc is None:
        raise OSError(errno.ENOSYS, "openat2 is Linux only", path)
    how = _OpenHow(flags, mode if flags & os.O_CREAT else 0, _RESOLVE)
    fd: int = _libc.syscall(
        ctypes.c_long(_SYS_OPENAT2),
        ctypes.c_int(dir_fd),
        ctypes.c_char_p(os.fsencode(path)),
        ctypes.byref(how),
        ctypes.c_size_t(ctypes.sizeof(how)),
    )
    if fd < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), path)
    return fd


def _open_walking(root_fd: int, relative: PurePosixPath, flags: int, mode: int) -> int:
    """Without openat2: one component at a time, each relative to the folder before, no symlinks."""
    folder = root_fd
    parts = relative.parts or (".",)
    try:
        for depth, name in enumerate(parts, start=1):
            last = depth == len(parts)
            try:
                opened = os.open(
                    name, (flags if last else _FOLDER) | os.O_NOFOLLOW | _O_CLOEXEC, mode, dir_fd=folder
                )
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR) and _is_symlink(name, folder):
                    raise ToolError(
                        f"'{relative}' goes through the symlink '{name}'; without openat2 (Linux 5.6) "
                        "no symlink in the workspace is followed, so give the real path."
                    ) from exc
                raise
            if folder != root_fd:
                os.close(folder)
            folder = opened
        return folder
    except BaseException:
        if folder != root_fd:
            os.close(folder)
        raise


def _is_symlink(name: str, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _has_openat2(folder: int) -> bool:
    """Whether openat2 works here: it is missing before Linux 5.6, and a seccomp filter may refuse it."""
    try:
        os.close(_openat2(folder, ".", _FOLDER | _O_CLOEXEC, 0))
    except OSError as exc:
        if exc.errno in (errno.ENOSYS, errno.EPERM):
            return False
        raise
    return True


class _Workspace:
    """A handle on the workspace folder; every path is looked up beneath it."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.has_openat2 = _has_openat2(fd)

    def open(self, relative: PurePosixPath, flags: int, mode: int = 0o644) -> int:
        """A descriptor for `relative`, looked up once beneath the workspace; ToolError if it leads out."""
        flags |= _O_CLOEXEC if flags & _O_PATH else _O_CLOEXEC | os.O_NOCTTY  # openat2 allows O_PATH alone
        if not self.has_openat2:
            return _open_walking(self.fd, relative, flags, mode)
        for _ in range(_LOOKUP_TRIES):
            try:
                return _openat2(self.fd, relative.as_posix(), flags, mode)
            except OSError as exc:
                if exc.errno == errno.EAGAIN:
                    continue
                if exc.errno == errno.EXDEV:
                    raise ToolError(
                        f"Path '{relative}' leads outside the workspace (through a symlink); "
                        "it is not allowed."
                    ) from exc
                if exc.errno == errno.ELOOP:
                    raise ToolError(
                        f"Path '{relative}' goes through too many symlinks; they are not followed."
                    ) from exc
                raise
        raise ToolError(f"The workspace kept changing while '{relative}' was looked up; try again.")

    def make_folders(self, folder: PurePosixPath) -> None:
        """Create the missing folders of `folder`, each in a parent looked up beneath the workspace."""
        with contextlib.suppress(FileNotFoundError):
            os.close(self.open(folder, _FOLDER))
            return
        for depth in range(1, len(folder.parts) + 1):
            here = PurePosixPath(*folder.parts[:depth])
            with contextlib.suppress(FileNotFoundError):
                os.close(self.open(here, _FOLDER))
                continue
            parent = self.open(here.parent, _FOLDER)
            try:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(here.name, dir_fd=parent)
            finally:
                os.close(parent)

    def disk_use(self, stop_above: int) -> int:
        """Bytes allocated in the workspace plus ENTRY_BYTES per entry, as the sandbox counts them."""
        total = 0
        top = self.open(PurePosixPath("."), _LISTED_FOLDER)
        try:
            for _, info in _walk(top, "", recursive=True):
                total += info.st_blocks * 512 + ENTRY_BYTES
                if total > stop_above:
                    break
        finally:
            os.close(top)
        return total


@contextlib.contextmanager
def _workspace(ctx: ToolContext) -> Iterator[_Workspace]:
    """The workspace's handle, with its owner's filesystem rights on this thread while it is open."""
    ctx.workspace.mkdir(parents=True, exist_ok=True)
    fd = os.open(ctx.workspace, _FOLDER | _O_CLOEXEC)
    try:
        owner = os.fstat(fd)
        with _filesystem_rights_of(owner.st_uid, owner.st_gid):
            yield _Workspace(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _filesystem_rights_of(uid: int, gid: int) -> Iterator[None]:
    """Running as root: this thread's file access checks use `uid`/`gid` until the block ends.

    setfsuid and setfsgid change only the calling thread on Linux (glibc passes them straight to
    the kernel, unlike setuid), so the rest of the process keeps root's rights meanwhile. Nothing
    in the block may start a thread: a new thread would inherit these rights.
    """
    if _libc is None or os.geteuid() != 0 or uid == 0:
        yield
        return
    old_gid = _libc.setfsgid(gid)
    old_uid = _libc.setfsuid(uid)
    try:
        if _libc.setfsuid(uid) != uid or _libc.setfsgid(gid) != gid:  # a second call returns the current id
            raise PermissionError(f"could not take the workspace owner's rights (uid {uid}, gid {gid})")
        yield
    finally:
        _libc.setfsuid(old_uid)  # fsuid 0 again also gives back root's file capabilities
        _libc.setfsgid(old_gid)


def _walk(top: int, prefix: str, recursive: bool) -> Iterator[tuple[str, os.stat_result]]:
    """(path, lstat) of every entry below the folder `top`, depth first like os.walk.

    Each sub-folder is opened relative to its parent with O_NOFOLLOW, so a folder swapped for a
    symlink meanwhile is skipped, not followed. One descriptor is held per level (MAX_DEPTH at most).
    """
    frames: list[tuple[int, list[tuple[str, str]]]] = [(top, [])]  # (folder, sub-folders left to visit)
    folder, path = top, prefix
    try:
        while True:
            children = frames[-1][1]
            for name, info in _entries(folder):
                full = f"{path}/{name}" if path else name
                yield full, info
                if recursive and stat.S_ISDIR(info.st_mode) and len(frames) < MAX_DEPTH:
                    children.append((name, full))
            children.reverse()
            folder = -1
            while folder < 0 and frames:
                parent, left = frames[-1]
                if not left:
                    frames.pop()
                    if parent != top:
                        os.close(parent)
                    continue
                name, path = left.pop()
                with contextlib.suppress(OSError):  # gone, or now a link: not followed
                    folder = os.open(name, _LISTED_FOLDER | os.O_NOFOLLOW | _O_CLOEXEC, dir_fd=parent)
            if folder < 0:
                return
            frames.append((folder, []))
    finally:
        for opened, _ in frames:
            if opened != top:
                os.close(opened)


def _entries(folder: int) -> list[tuple[str, os.stat_result]]:
    """The folder's entries with their lstat, sub-folders first, each group by name."""
    found = []
    with os.scandir(folder) as listing:
        for entry in listing:
            with contextlib.suppress(OSError):  # removed meanwhile
                found.append((entry.name, entry.stat(follow_symlinks=False)))
    return sorted(found, key=lambda item: (not stat.S_ISDIR(item[1].st_mode), item[0]))


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode):
        return "character device"
    if stat.S_ISBLK(mode):
        return "block device"
    return "special file"


def _special(path: str, kind: str, verb: str) -> ToolError:
    return ToolError(f"'{path}' is a {kind}, not a regular file; only regular files can be {verb}.")


# A file written by a process that had read untrusted data carries this mark, so whoever reads it
# later gets its text as untrusted data too. As root it is a trusted.* attribute, which sandboxed
# code (any uid without CAP_SYS_ADMIN) can neither set nor remove; otherwise a user.* one.
UNTRUSTED_XATTR = "trusted.llmos.untrusted" if os.geteuid() == 0 else "user.llmos.untrusted"


def _marked_untrusted(fd: int) -> bool:
    try:
        return os.getxattr(fd, UNTRUSTED_XATTR) == b"1"
    except OSError:  # no mark (ENODATA), or a file system without extended attributes
        return False


def _mark_trust(fd: int, untrusted: bool) -> None:
    with contextlib.suppress(OSError):  # a file system without extended attributes carries no mark
        if untrusted:
            os.setxattr(fd, UNTRUSTED_XATTR, b"1")
        else:
            os.removexattr(fd, UNTRUSTED_XATTR)


@tool
def read_file(path: str, ctx: ToolContext, max_chars: int = MAX_READ_CHARS) -> ToolResult:
    """Read a text file from the workspace.

    Args:
        path: file path relative to the workspace, e.g. "notes/todo.txt".
        max_chars: return at most this many characters.
    """
    relative = relative_path(path)
    with _workspace(ctx) as workspace:
        try:
            fd = workspace.open(relative, os.O_RDONLY | os.O_NONBLOCK)
        except (FileNotFoundError, NotADirectoryError):
            raise ToolError(
                f"There is no file '{path}' in the workspace; call list_files to see what exists."
            ) from None
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # a socket
                raise _special(path, "socket", "read") from None
            raise
        try:
            info = os.fstat(fd)
            if stat.S_ISDIR(info.st_mode):
                raise ToolError(f"'{path}' is a directory; call list_files to see its contents.")
            if not stat.S_ISREG(info.st_mode):
                raise _special(path, _kind(info.st_mode), "read")
            with os.fdopen(fd, "rb", closefd=False) as handle:
                data = handle.read(max(0, max_chars) * 4 + 4)
            untrusted = _marked_untrusted(fd)
        finally:
            os.close(fd)
    if b"\x00" in data[:8192]:
        raise ToolError(f"'{path}' is a binary file; only text files can be read.")
    text = data.decode("utf-8", errors="replace")
    truncated = len(text) > max_chars or len(data) < info.st_size
    content = {"path": relative.as_posix(), "content": text[:max_chars], "truncated": truncated}
    return ToolResult(ok=True, content=content, untrusted=untrusted)


@tool(risk=Risk.WRITE)
def write_file(path: str, content: str, ctx: ToolContext, append: bool = False) -> dict[str, Any]:
    """Write a text file in the workspace (parent folders are created).

    Args:
        path: file path relative to the workspace, e.g. "out/report.md".
        content: the text to write.
        append: add to the end of the file instead of replacing it.
    """
    relative = relative_path(path)
    if not relative.name:
        raise ToolError(f"'{path}' is a directory; give a file name inside it.")
    data = content.encode("utf-8")
    flags = os.O_WRONLY | os.O_NONBLOCK | (os.O_APPEND if append else 0)
    with _workspace(ctx) as workspace:
        workspace.make_folders(relative.parent)
        try:
            try:
                fd = workspace.open(relative, flags)
            except FileNotFoundError:
                _check_room(ctx, workspace, len(data), replaced=0)
                fd = workspace.open(relative, flags | os.O_CREAT)
        except IsADirectoryError:
            raise ToolError(f"'{path}' is a directory; give a file name inside it.") from None
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # a FIFO nobody reads, or a socket
                raise _special(path, "named pipe (FIFO) or socket", "written") from None
            raise
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise _special(path, _kind(info.st_mode), "written")
            _check_room(ctx, workspace, len(data), replaced=0 if append else info.st_blocks * 512)
            if not append:
                os.ftruncate(fd, 0)
            with os.fdopen(fd, "wb", closefd=False) as handle:
                handle.write(data)
            # A tainted writer marks the file; a whole new text from an untainted one clears it.
            if ctx.untrusted or not append:
                _mark_trust(fd, ctx.untrusted)
        finally:
            os.close(fd)
    return {"path": relative.as_posix(), "bytes_written": len(data), "appended": append}


def _check_room(ctx: ToolContext, workspace: _Workspace, size: int, replaced: int) -> None:
    """The sandbox's cap on the workspace (`sandbox.limits.workspace_mb`) holds for writes here too."""
    limit = ctx.workspace_limit_bytes
    if limit is None:
        return
    used = workspace.disk_use(stop_above=limit + replaced)
    if used - replaced + size > limit:
        raise ToolError(
            f"Writing {size} bytes would take the workspace past its limit of "
            f"{limit // (1024 * 1024)} MB (sandbox.limits.workspace_mb); delete files that are not needed."
        )


@tool
def list_files(ctx: ToolContext, path: str = ".", recursive: bool = False) -> list[dict[str, Any]]:
    """List files and folders in the workspace.

    Args:
        path: folder relative to the workspace; "." is the workspace itself.
        recursive: also list the contents of sub-folders.
    """
    relative = relative_path(path)
    entries: list[dict[str, Any]] = []
    with _workspace(ctx) as workspace:
        try:
            folder = workspace.open(relative, _LISTED_FOLDER)
        except (FileNotFoundError, NotADirectoryError):
            raise ToolError(
                f"'{path}' is not a folder in the workspace; call list_files with path '.'."
            ) from None
        try:
            prefix = "" if relative == PurePosixPath(".") else relative.as_posix()
            for full, info in _walk(folder, prefix, recursive):
                entry: dict[str, Any] = {"path": full, "type": _entry_type(info.st_mode)}
                if stat.S_ISREG(info.st_mode):
                    entry["size"] = info.st_size
                entries.append(entry)
                if len(entries) >= MAX_LIST_ENTRIES:
                    entries.append({"truncated": f"more than {MAX_LIST_ENTRIES} entries; list a sub-folder"})
                    break
        finally:
            os.close(folder)
    return entries


def _entry_type(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "link"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISREG(mode):
        return "file"
    return "other"  # a FIFO, socket or device: the file tools refuse to open it


@tool(risk=Risk.IRREVERSIBLE)
def delete_file(path: str, ctx: ToolContext) -> dict[str, Any]:
    """Delete a file from the workspace (folders are not deleted).

    Args:
        path: file path relative to the workspace.
    """
    relative = relative_path(path)
    if not relative.name:
        raise ToolError("Give the path of a file to delete, not the workspace itself.")
    missing = ToolError(f"There is no file '{path}' in the workspace; call list_files to see what exists.")
    with _workspace(ctx) as workspace:
        try:
            folder = workspace.open(relative.parent, _FOLDER)
        except (FileNotFoundError, NotADirectoryError):
            raise missing from None
        try:
            # the name is looked at and unlinked inside that folder: a symlink is removed, never followed
            try:
                info = os.stat(relative.name, dir_fd=folder, follow_symlinks=False)
            except FileNotFoundError:
                raise missing from None
            if stat.S_ISDIR(info.st_mode):
                raise ToolError(f"'{path}' is a folder; only files can be deleted.")
            try:
                os.unlink(relative.name, dir_fd=folder)
            except FileNotFoundError:
                raise missing from None
            except IsADirectoryError:  # swapped for a folder since the look
                raise ToolError(f"'{path}' is a folder; only files can be deleted.") from None
        finally:
            os.close(folder)
    return {"deleted": relative.as_posix()}


def file_tools() -> list[Tool]:
    """The workspace file tools: read_file, write_file, list_files, delete_file."""
    return [read_file, write_file, list_files, delete_file]
