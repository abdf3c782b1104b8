"""Fixtures of the AutoGen adapter tests: the small local model, and a scripted LLM that can hang."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from pathlib import Path

import pytest

from llmos.config import Config, load_config
from llmos.cpu.scripted import ScriptedLLM, ScriptedReply
from llmos.kernel.devices import ChatRequest, ChatResult, TextCallback
from llmos.models import ModelManager

SMALL_MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def small_model() -> str:
    """The catalog name of the small real model, pulled into the shared cache on first use."""
    ModelManager(load_config().models_dir).ensure(SMALL_MODEL)
    return SMALL_MODEL


@pytest.fixture
def config(llmos_home: Path) -> Config:
    return load_config(env={"LLMOS_HOME": str(llmos_home)})


class HangingScriptedLLM(ScriptedLLM):
    """A scripted fake LLM (control flow only): it answers its replies, then every further call
    hangs until cancelled, so a test can act on a team while a model call is in flight."""

    def __init__(self, replies: Iterable[ScriptedReply] = ()) -> None:
        super().__init__(replies)
        self.hanging = asyncio.Event()
        self.cancelled = asyncio.Event()  # the hanging call was abandoned

    async def chat(self, request: ChatRequest, on_text: TextCallback | None = None) -> ChatResult:
        if self.replies:
            return await super().chat(request, on_text)
        self.requests.append(request)
        self.hanging.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        raise AssertionError("unreachable")


@pytest.fixture
def hanging_llm() -> HangingScriptedLLM:
    """Answers the coder once, then hangs on the next call (the reviewer's)."""
    return HangingScriptedLLM(["def add(a, b): return a + b"])
