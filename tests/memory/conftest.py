"""Memory fixtures: the real embedding model, the real tokenizer of a GGUF, a real Chroma server,
and kernels whose processes reach a real embedded store under the test's LLMOS_HOME."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import loopback
import pytest

from llmos import Kernel
from llmos.config import Config, load_config
from llmos.kernel.devices import LLMBackend
from llmos.memory.embeddings import OnnxEmbeddingFunction
from llmos.memory.store import MemoryStore
from llmos.models import ModelManager


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


KernelFactory = Callable[[LLMBackend], Kernel]


@pytest.fixture
def kernel_with(config: Config, embedder: OnnxEmbeddingFunction) -> Iterator[KernelFactory]:
    """Makes a kernel (not booted) with this model and the real embedded store of the test's home.
    The kernel closes the store only if a process used it: each new kernel closes the earlier ones'
    stores (their kernels must have ended), and so does the end of the test."""
    stores: list[MemoryStore] = []

    def make(llm: LLMBackend) -> Kernel:
        for earlier in stores:
            earlier.close()
        stores.append(MemoryStore.open(config, embedder=embedder))
        return Kernel(config, llm=llm, memory=stores[-1])

    yield make
    for store in stores:
        store.close()


@pytest.fixture
def store(config: Config, embedder: OnnxEmbeddingFunction) -> Iterator[MemoryStore]:
    memory = MemoryStore.open(config, embedder=embedder)
    yield memory
    memory.close()


@pytest.fixture(scope="module")
def chroma_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `chroma run` on 127.0.0.1; yields its URL."""
    with loopback.chroma_server(tmp_path_factory.mktemp("chroma-server")) as url:
        yield url
