"""Offline sentence embeddings for chromadb: all-MiniLM-L6-v2 as ONNX, run with onnxruntime.

chromadb's default embedding function downloads its model on first use and fails offline; this
one reads a model directory (`model.onnx` + `tokenizer.json`) that `ModelManager` has pulled.
It is registered with chromadb, so a persisted collection that names it reopens once this
module is imported (llmos.memory imports it).

Embeddings are the attention-masked mean of the last hidden state, L2-normalised (what
sentence-transformers does for this model). A batch is padded to its longest text, not to a
fixed length: padding to 256 tokens makes short texts ~30x slower.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
from chromadb.api.types import Documents, EmbeddingFunction, Embeddings, Space
from chromadb.utils.embedding_functions import register_embedding_function
from tokenizers import Tokenizer

MAX_TOKENS = 256
BATCH_SIZE = 32
DIMENSIONS = 384


class EmbeddingModelError(Exception):
    """The embedding model directory is missing or incomplete; the message says how to fetch it."""


class _Model:
    """An ONNX session and its tokenizer; shared by every embedding function on the same path."""

    def __init__(self, model_dir: Path, max_tokens: int) -> None:
        import onnxruntime as ort

        onnx_path, tokenizer_path = model_dir / "model.onnx", model_dir / "tokenizer.json"
        for path in (onnx_path, tokenizer_path):
            if not path.is_file():
                raise EmbeddingModelError(
                    f"Embedding model file {path} is missing; run `llmos models pull all-minilm-l6-v2`."
                )
        options = ort.SessionOptions()
        # The machine is shared with the LLM: two threads at most, and no spin-waiting, which
        # doubles the latency of a busy machine's embeddings.
        options.intra_op_num_threads = min(2, os.cpu_count() or 1)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        self.input_names = {i.name for i in self.session.get_inputs()}
        self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        # The shipped tokenizer pads to a fixed 128 and truncates at 128: pad to the batch's
        # longest instead, and allow the model's full 256 positions.
        self.tokenizer.enable_truncation(max_length=max_tokens)
        self.tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
        # onnxruntime sessions are thread-safe for run(); the tokenizer's padding state is not
        # shared mutable state after this point, but keep encode+run serial to bound memory.
        self.lock = threading.Lock()

    def embed(self, texts: list[str]) -> np.ndarray:
        with self.lock:
            encodings = self.tokenizer.encode_batch(texts)
            ids = np.array([e.ids for e in encodings], dtype=np.int64)
            mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
            feeds = {"input_ids": ids, "attention_mask": mask}
            if "token_type_ids" in self.input_names:
                feeds["token_type_ids"] = np.zeros_like(ids)
            hidden = self.session.run(None, feeds)[0]
        weights = mask[:, :, None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        normalised: np.ndarray = (pooled / np.clip(norms, 1e-12, None)).astype(np.float32)
        return normalised


_models: dict[tuple[str, int], _Model] = {}
_models_lock = threading.Lock()


def _load(model_dir: Path, max_tokens: int) -> _Model:
    key = (str(model_dir.resolve()), max_tokens)
    with _models_lock:
        model = _models.get(key)
        if model is None:
            model = _models[key] = _Model(model_dir, max_tokens)
        return model


@register_embedding_function
class OnnxEmbeddingFunction(EmbeddingFunction[Documents]):
    """chromadb embedding function over a local ONNX sentence-embedding model."""

    def __init__(
        self, model_dir: str | Path, max_tokens: int = MAX_TOKENS, batch_size: int = BATCH_SIZE
    ) -> None:
        self.model_dir = Path(model_dir).expanduser()
        self.max_tokens = max_tokens
        self.batch_size = batch_size
        # Fail at construction, with the fix, rather than at the first add.
        self._model = _load(self.model_dir, max_tokens)

    def __call__(self, input: Documents) -> Embeddings:
        return list(self.embed(list(input)))

    def embed(self, texts: list[str]) -> np.ndarray:
        """Embeddings of `texts` as one float32 array (len(texts) x 384)."""
        if not texts:
            return np.zeros((0, DIMENSIONS), dtype=np.float32)
        # Sorting by length keeps each padded batch tight; the order is restored at the end.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.empty((len(texts), DIMENSIONS), dtype=np.float32)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            out[chunk] = self._model.embed([texts[i] for i in chunk])
        return out

    @staticmethod
    def name() -> str:
        return "llmos-onnx"

    def default_space(self) -> Space:
        return "cosine"

    def supported_spaces(self) -> list[Space]:
        return ["cosine", "ip", "l2"]

    def get_config(self) -> dict[str, Any]:
        return {
            "model_dir": str(self.model_dir),
            "max_tokens": self.max_tokens,
            "batch_size": self.batch_size,
        }

    @staticmethod
    def build_from_config(config: dict[str, Any]) -> OnnxEmbeddingFunction:
        return OnnxEmbeddingFunction(
            config["model_dir"],
            max_tokens=int(config.get("max_tokens", MAX_TOKENS)),
            batch_size=int(config.get("batch_size", BATCH_SIZE)),
        )

    def validate_config_update(self, old_config: dict[str, Any], new_config: dict[str, Any]) -> None:
        # The model directory may move (another cache dir, another machine); the model may not change.
        return None


__all__ = ["DIMENSIONS", "MAX_TOKENS", "EmbeddingModelError", "OnnxEmbeddingFunction"]
