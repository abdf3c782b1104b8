"""The in-sandbox worker: a long-lived interpreter that runs code cells like a notebook.

Stdlib only, and self-contained: the host runs it as `python3 -I -c <this source> ARGS` inside the
sandbox (bubblewrap, a container, or a plain subprocess), so it must not import llmos.

Protocol. The worker's stdin carries requests and its stdout carries replies; each message is a
4-byte big-endian length followed by that many bytes of UTF-8 JSON. At start the worker moves
the two channels to private descriptors, points fd 0 at /dev/null and fds 1/2 at in-memory files,
so neither the code nor its child processes can read requests by reading stdin, and everything
they print is captured. The first message is `{"ready": true, ...}`; then, for each request
`{"code": str, "limits": {...}}`, one reply (see `_run_cell`).

The channels are not secret from the code (it runs in this process and can write to them): a
cell can only lie about its own result, and the host bounds and validates every reply.
"""

from __future__ import annotations

import ast
import io
import json
import os
import resource
import signal
import struct
import sys
import time

# Cold start matters (one interpreter per session): no typing, argparse or traceback at import.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

MAX_REQUEST_BYTES = 64 * 1024 * 1024
MAX_SCAN_ENTRIES = 10_000
HEADER = struct.Struct(">I")


def read_message(fd: int) -> dict[str, Any] | None:
    """One length-prefixed JSON message from `fd`, or None at end of input."""
    header = _read_exact(fd, HEADER.size)
    if header is None:
        return None
    (size,) = HEADER.unpack(header)
    if size > MAX_REQUEST_BYTES:
        raise ValueError(f"message of {size} bytes is too large")
    body = _read_exact(fd, size)
    if body is None:
        return None
    message: dict[str, Any] = json.loads(body.decode("utf-8"))
    return message


def write_message(fd: int, message: dict[str, Any]) -> None:
    # "replace": a lone surrogate in a traceback must not make the reply invalid UTF-8.
    body = json.dumps(message, ensure_ascii=False).encode("utf-8", "replace")
    data = HEADER.pack(len(body)) + body
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _read_exact(fd: int, size: int) -> bytes | None:
    chunks: list[bytes] = []
    remaining = size
    while remaining:
        chunk = os.read(fd, min(remaining, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


class CappedStream(io.TextIOBase):
    """sys.stdout/sys.stderr for a cell: writes to the fd-level capture file until the cap, then drops.

    Printing in a loop must not fill the disk or memory, and must not make the cell fail either:
    past the cap the text is counted and dropped, and the reply says `truncated`.
    """

    def __init__(self, fd: int) -> None:
        super().__init__()
        self._fd = fd
        self.budget = 0
        self.dropped = False

    def reset(self, budget: int) -> None:
        self.budget = budget
        self.dropped = False

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        data = text.encode("utf-8", "backslashreplace")
        if len(data) > self.budget:
            data = data[: self.budget]
            self.dropped = True
        if data:
            try:
                os.write(self._fd, data)
            except OSError:
                # The fd-level file hit RLIMIT_FSIZE (child processes wrote a lot): drop the rest.
                self.dropped = True
            self.budget -= len(data)
        return len(text)

    def fileno(self) -> int:
        return self._fd

    def isatty(self) -> bool:
        return False


class Worker:
    def __init__(self, workspace: str) -> None:
        self.workspace = workspace
        self.namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": __builtins__}
        self.cells = 0
        self.pid = os.getpid()
        # The host talks over private, non-inheritable copies of fds 0 and 1.
        self.requests = os.dup(0)
        self.replies = os.dup(1)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        # Everything a cell or its child processes print lands in two in-memory files.
        self.out_file = _capture_file("stdout")
        self.err_file = _capture_file("stderr")
        os.dup2(self.out_file, 1)
        os.dup2(self.err_file, 2)
        self.stdout = CappedStream(1)
        self.stderr = CappedStream(2)
        sys.stdout = self.stdout
        sys.stderr = self.stderr
        sys.stdin = io.StringIO("")

    def serve(self) -> None:
        write_message(self.replies, {"ready": True, "pid": os.getpid(), "python": sys.version.split()[0]})
        while True:
            request = read_message(self.requests)
            if request is None:
                return
            write_message(self.replies, self._run_cell(request))

    def _run_cell(self, request: dict[str, Any]) -> dict[str, Any]:
        code = str(request.get("code", ""))
        limits = request.get("limits") or {}
        output_bytes = int(limits.get("output_bytes", 1_000_000))
        self._rewind_captures()
        self.stdout.reset(output_bytes)
        self.stderr.reset(output_bytes)
        _set_cpu_limit(float(limits.get("cpu_s", 0)))
        before = _scan(self.workspace)
        started_wall = time.monotonic()
        started_cpu = _cpu_time()
        value: str | None = None
        error: str | None = None
        self.cells += 1
        try:
            value = self._execute(code, f"<cell {self.cells}>")
        except BaseException as exc:  # SystemExit and KeyboardInterrupt are cell errors too
            error = _format_error(exc)
        if os.getpid() != self.pid:
            # A process the cell forked fell through to here: it must not answer the host.
            os._exit(0)
        cpu_s = _cpu_time() - started_cpu
        wall_s = time.monotonic() - started_wall
        _set_cpu_limit(0)
        stdout, out_cut = _read_capture(self.out_file, output_bytes)
        stderr, err_cut = _read_capture(self.err_file, output_bytes)
        truncated = out_cut or err_cut or self.stdout.dropped or self.stderr.dropped
        if value is not None and len(value) > output_bytes:
            value, truncated = value[:output_bytes], True
        if error is not None and len(error) > output_bytes:
            error, truncated = error[-output_bytes:], True
        return {
            "stdout": stdout,
            "stderr": stderr,
            "value": value,
            "error": error,
            "exit_status": 0 if error is None else 1,
            "files": _changed(before, _scan(self.workspace)),
            "cpu_s": round(cpu_s, 6),
            "wall_s": round(wall_s, 6),
            "memory_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "truncated": truncated,
        }

    def _execute(self, code: str, filename: str) -> str | None:
        """Run a cell; a final bare expression is evaluated separately and its repr returned."""
        import linecache

        linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
        tree = ast.parse(code, filename, "exec")
        last: ast.expr | None = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            last = tree.body[-1].value
            tree.body.pop()
        exec(compile(tree, filename, "exec"), self.namespace)
        if last is None:
            return None
        result = eval(compile(ast.Expression(last), filename, "eval"), self.namespace)
        if result is None:
            return None
        self.namespace["_"] = result
        return repr(result)

    def _rewind_captures(self) -> None:
        for fd in (self.out_file, self.err_file):
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)


def _capture_file(name: str) -> int:
    try:
        return os.memfd_create(f"llmos-{name}", os.MFD_CLOEXEC)
    except (AttributeError, OSError):
        import tempfile

        return os.dup(tempfile.TemporaryFile().fileno())


def _read_capture(fd: int, limit: int) -> tuple[str, bool]:
    size = os.fstat(fd).st_size
    os.lseek(fd, 0, os.SEEK_SET)
    data = b""
    while len(data) < min(size, limit):
        chunk = os.read(fd, min(size, limit) - len(data))
        if not chunk:
            break
        data += chunk
    return data.decode("utf-8", "replace"), size > limit


def _format_error(exc: BaseException) -> str:
    import traceback

    # Drop the worker's own frames: the model should see only its code.
    tb = exc.__traceback__
    while tb is not None and not tb.tb_frame.f_code.co_filename.startswith("<cell"):
        tb = tb.tb_next
    if isinstance(exc, SyntaxError):
        tb = None
    return "".join(traceback.format_exception(type(exc), exc, tb))


def _cpu_time() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _set_cpu_limit(seconds: float) -> None:
    """Per-cell CPU limit: the soft RLIMIT_CPU is cumulative, so it is moved to `used + seconds`.

    The hard limit (set at start) bounds the whole session; a cell that ignores SIGXCPU is still
    stopped by the host's wall-clock timeout.
    """
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    if seconds <= 0:
        soft = hard
    else:
        own = resource.getrusage(resource.RUSAGE_SELF)
        soft = int(own.ru_utime + own.ru_stime + seconds) + 1
        if hard != resource.RLIM_INFINITY:
            soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


def _scan(root: str) -> dict[str, tuple[int, int]]:
    """Path -> (mtime_ns, size) of files under the workspace (bounded, symlinks not followed)."""
    found: dict[str, tuple[int, int]] = {}
    for directory, dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(directory, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            found[os.path.relpath(path, root)] = (st.st_mtime_ns, st.st_size)
            if len(found) >= MAX_SCAN_ENTRIES:
                return found
        dirs.sort()
    return found


def _changed(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> list[str]:
    return sorted(path for path, stat in after.items() if before.get(path) != stat)


def _apply_rlimits(args: dict[str, int]) -> None:
    mb = 1024 * 1024
    memory = args.get("memory-mb")
    file_size = args.get("file-size-mb")
    wanted = {
        resource.RLIMIT_CPU: args.get("cpu-s"),
        resource.RLIMIT_DATA: memory * mb if memory else None,
        # Address space is a backstop only: threads and malloc arenas reserve far more than they use.
        resource.RLIMIT_AS: (memory + 1024) * mb if memory else None,
        resource.RLIMIT_FSIZE: file_size * mb if file_size else None,
        resource.RLIMIT_NPROC: args.get("nproc"),
        resource.RLIMIT_NOFILE: args.get("nofile", 256),
        resource.RLIMIT_CORE: 0,
    }
    for which, value in wanted.items():
        if value is None:
            continue
        _, hard = resource.getrlimit(which)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(which, (value, value))


def _drop_privileges(uid: int | None, gid: int | None) -> None:
    """Become the sandbox uid when started as root (namespace backend: bwrap runs as root)."""
    if uid is None or os.getuid() != 0:
        return
    group = uid if gid is None else gid
    os.setgroups([])
    os.setresgid(group, group, group)
    os.setresuid(uid, uid, uid)
    if os.getuid() == 0 or os.geteuid() == 0:
        raise SystemExit("could not drop root privileges")


OPTIONS = ("uid", "gid", "cpu-s", "memory-mb", "file-size-mb", "nproc", "nofile")


def parse_args(argv: list[str]) -> tuple[str, dict[str, int]]:
    """`--workspace PATH` and the integer options above, each as `--name VALUE`."""
    if len(argv) % 2:
        raise SystemExit(f"llmos-worker: options come in pairs: {argv}")
    workspace = None
    numbers: dict[str, int] = {}
    for flag, value in zip(argv[::2], argv[1::2], strict=True):
        name = flag[2:]
        if name == "workspace":
            workspace = value
        elif flag.startswith("--") and name in OPTIONS:
            numbers[name] = int(value)
        else:
            raise SystemExit(f"llmos-worker: unknown option {flag}")
    if workspace is None:
        raise SystemExit("llmos-worker: --workspace is required")
    return workspace, numbers


def main(argv: list[str] | None = None) -> None:
    workspace, options = parse_args(sys.argv[1:] if argv is None else argv)
    workspace = os.path.abspath(workspace)
    _drop_privileges(options.get("uid"), options.get("gid"))
    _apply_rlimits(options)
    # Writes past RLIMIT_FSIZE fail with EFBIG instead of killing the worker.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    os.chdir(workspace)
    sys.path.insert(0, workspace)
    Worker(workspace).serve()


if __name__ == "__main__":
    main()
