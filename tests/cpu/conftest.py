"""Fixtures shared by the CPU tests (model manager, OpenAI backend, local backend)."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmos.config import load_config
from llmos.models import ModelManager


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The real SmolLM2 135M GGUF from the shared model cache (pulled on first use)."""
    return ModelManager(load_config().models_dir).ensure("smollm2-135m-instruct")
