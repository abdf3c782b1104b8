"""Memory fixtures: the real embedding model, the real tokenizer of a GGUF, a real Chroma server."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from llmos.config import Config, load_config
from llmos.cpu.models import ModelManager
from llmos.memory.embeddings import OnnxEmbeddingFunction
from llmos.memory.store import MemoryStore

REPO = Path(__file__).resolve().parents[2]
CHROMA = REPO / ".venv" / "bin" / "chroma"


@pytest.fixture(scope="session")
def models_dir() -> Path:
    return load_config().models_dir


@pytest.fixture(scope="session")
def embedder(models_dir: Path) -> OnnxEmbeddingFunction:
    return OnnxEmbeddingFunction(ModelManager(models_dir).ensure("all-minilm-l6-v2"))


@pytest.fixture(scope="session")
def smollm_path(models_dir: Path) -> Path:
    return ModelManager(models_dir).ensure("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def count_tokens(smollm_path: Path) -> Callable[[str], int]:
    """Token counts from the real tokenizer of SmolLM2 (vocab only: no weights loaded)."""
    from llama_cpp import Llama

    vocab = Llama(str(smollm_path), vocab_only=True, verbose=False)

    def count(text: str) -> int:
        return len(vocab.tokenize(text.encode(), add_bos=False, special=True))

    return count


@pytest.fixture
def config(llmos_home: Path, models_dir: Path) -> Config:
    return load_config()


@pytest.fixture
def store(config: Config, embedder: OnnxEmbeddingFunction) -> Iterator[MemoryStore]:
    memory = MemoryStore.open(config, embedder=embedder)
    yield memory
    memory.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def chroma_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `chroma run` on 127.0.0.1; yields its URL."""
    data = tmp_path_factory.mktemp("chroma-server")
    port = _free_port()
    log = (data / "server.log").open("w")
    proc = subprocess.Popen(
        [str(CHROMA), "run", "--path", str(data / "db"), "--host", "127.0.0.1", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"chroma run exited with {proc.returncode}: {(data / 'server.log').read_text()}"
                )
            try:
                if httpx.get(f"{url}/api/v2/heartbeat", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("chroma run did not answer within 60 s")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
