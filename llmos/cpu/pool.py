"""Several OpenAI-compatible servers behind one backend: requests go to the healthy server with the
fewest requests in flight; a server that fails is set aside and checked again later.

Config: `llm.base_url = "http://a:8000/v1, http://b:8000/v1"` (comma-separated) spreads the calls.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

from llmos.cpu.openai import OpenAIBackend
from llmos.kernel.devices import ChatRequest, ChatResult, LLMError, ModelInfo, TextCallback

RECHECK_AFTER_S = 10.0  # how long a failed server is left out before it is tried again
HEALTH_TIMEOUT_S = 2.0


@dataclass
class Server:
    backend: OpenAIBackend
    in_flight: int = 0
    down_until: float = 0.0  # monotonic time; 0 = healthy
    served: int = 0

    @property
    def healthy(self) -> bool:
        return time.monotonic() >= self.down_until


class ServerPool:
    def __init__(self, backends: Sequence[OpenAIBackend]) -> None:
        if not backends:
            raise LLMError("The server pool is empty; give llm.base_url one or more URLs.")
        self.servers = [Server(backend) for backend in backends]
        self.name = f"pool:{backends[0].model}"

    @property
    def info(self) -> ModelInfo:
        return self.servers[0].backend.info

    def count_tokens(self, text: str) -> int:
        return self.servers[0].backend.count_tokens(text)

    async def _pick(self, tried: set[int]) -> Server | None:
        candidates = [s for i, s in enumerate(self.servers) if i not in tried]
        for server in sorted(candidates, key=lambda s: (not s.healthy, s.in_flight)):
            if server.healthy or await server.backend.answers(HEALTH_TIMEOUT_S):
                server.down_until = 0.0
                return server
            server.down_until = time.monotonic() + RECHECK_AFTER_S
        return None

    async def chat(self, request: ChatRequest, on_text: TextCallback | None = None) -> ChatResult:
        tried: set[int] = set()
        errors = []
        while (server := await self._pick(tried)) is not None:
            tried.add(self.servers.index(server))
            server.in_flight += 1
            streamed = False

            def forward(text: str) -> None:
                nonlocal streamed
                streamed = True
                if on_text is not None:
                    on_text(text)

            try:
                result = await server.backend.chat(request, forward)
            except LLMError as exc:
                if streamed:  # text already reached the caller: another server would repeat it
                    raise
                server.down_until = time.monotonic() + RECHECK_AFTER_S
                errors.append(str(exc))
                continue
            finally:
                server.in_flight -= 1
            server.served += 1
            return result
        urls = ", ".join(s.backend.base_url for s in self.servers)
        raise LLMError(f"No server of the pool ({urls}) answered; start one or fix llm.base_url. {errors}")

    async def aclose(self) -> None:
        await asyncio.gather(*(s.backend.aclose() for s in self.servers))
