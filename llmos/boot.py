"""Boot: build a kernel's devices from the config and hand them to the kernel.

    async with Kernel() as kernel:   # llmos.Kernel: the kernel with the standard devices
        ...

The standard devices: the configured model (llama.cpp in this process, or an OpenAI-compatible
server), the configured sandbox backend, long-term memory (embedded chromadb or a Chroma server),
and the built-in tools (python, the workspace file tools, remember and recall). The model, the
sandbox and memory are opened on first use, so a kernel that never chats never loads a model.
Any of them can be given instead (a scripted model in tests, a sandbox of the app's own).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from llmos import kernel
from llmos.config import Config, load_config
from llmos.kernel.devices import Devices, LLMBackend, Memory, Sandbox
from llmos.tools import ToolRegistry, builtin_tools


def standard_devices(
    config: Config,
    *,
    llm: LLMBackend | None = None,
    tools: ToolRegistry | None = None,
    sandbox: Sandbox | None = None,
    memory: Memory | None = None,
) -> Devices:
    """The devices the config names; `llm` (the default model), `sandbox` and `memory` replace theirs."""

    async def open_llm(model: str | None) -> LLMBackend:
        if model is None and llm is not None:
            return llm
        from llmos.cpu import open_backend

        return await asyncio.to_thread(open_backend, config, model)

    async def open_sandbox() -> Sandbox:
        if sandbox is not None:
            return sandbox
        from llmos.sandbox import open_sandbox

        opened = await asyncio.to_thread(open_sandbox, config)
        await opened.warm_up()  # start pooled workers now, so the first session is warm
        return opened

    async def open_memory() -> Memory:
        if memory is not None:
            return memory
        from llmos.memory.store import MemoryStore  # chromadb: only when memory is used

        return await asyncio.to_thread(MemoryStore.open, config)

    registry = tools if tools is not None else ToolRegistry(builtin_tools())
    return Devices(tools=registry, llm=open_llm, sandbox=open_sandbox, memory=open_memory)


class Kernel(kernel.Kernel):
    """The kernel booted with the standard devices of its config (see the module docstring).

    `llm` replaces the default model (a `ScriptedLLM` in tests), `tools` the built-in tools,
    `sandbox` and `memory` their devices; `secrets` are injected into the tools that declare them.
    """

    def __init__(
        self,
        config: Config | None = None,
        *,
        llm: LLMBackend | None = None,
        tools: ToolRegistry | None = None,
        sandbox: Sandbox | None = None,
        memory: Memory | None = None,
        secrets: Mapping[str, str] | None = None,
    ) -> None:
        config = config or load_config()
        self.registry = tools if tools is not None else ToolRegistry(builtin_tools())
        devices = standard_devices(config, llm=llm, tools=self.registry, sandbox=sandbox, memory=memory)
        super().__init__(config, devices=devices, secrets=secrets)

    @property
    def tools(self) -> ToolRegistry:
        """The tools its processes may call; `kernel.tools.register(...)` adds the app's own."""
        return self.registry
