"""`Agent`: the embedding API. An agent is a spec plus tools; running it spawns a kernel process.

from llmos import Agent, tool

@tool
def add(a: int, b: int) -> int:
    "Add two integers."
    return a + b

agent = Agent(name="calc", instructions="Use add, then answer.", tools=[add])
result = agent.run("What is 2 + 40?")            # sync; `await agent.arun(...)` in async code
print(result.answer, result.usage.tokens)
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import BaseModel

from llmos.agents.agent import AgentSpec, run_agent
from llmos.agents.catalog import AGENTS
from llmos.boot import Kernel
from llmos.config import Config, load_config
from llmos.kernel import Budget, State
from llmos.kernel.process import Usage
from llmos.tools import Tool, builtin_tools

EventListener = Callable[[str, dict[str, Any]], None]


class AgentRun(BaseModel):
    pid: int
    state: State
    answer: str | None
    error: str | None
    usage: Usage

    @property
    def ok(self) -> bool:
        return self.state == State.DONE


class Agent:
    def __init__(
        self,
        name: str = "agent",
        instructions: str | None = None,
        tools: Sequence[Tool | str] = (),
        *,
        model: str | None = None,
        max_steps: int | None = None,
        capabilities: list[str] | None = None,
        budget: Budget | None = None,
    ) -> None:
        base = AGENTS.get(name, AgentSpec(name=name))
        self.tools = [t for t in tools if isinstance(t, Tool)]
        names = [t if isinstance(t, str) else t.name for t in tools] or base.tools
        self.spec = base.model_copy(
            update={
                "instructions": instructions or base.instructions,
                "tools": names,
                "model": model or base.model,
                "max_steps": max_steps or base.max_steps,
            }
        )
        self.capabilities = capabilities
        self.budget = budget

    async def arun(
        self,
        task: str,
        *,
        kernel: Kernel | None = None,
        on_event: EventListener | None = None,
        config: Config | None = None,
    ) -> AgentRun:
        """Run the task on `kernel` (or on a kernel booted for this run) and wait for the answer."""
        if kernel is None:
            async with Kernel(config or load_config()) as own:
                return await self.arun(task, kernel=own, on_event=on_event)
        # The agent's own tools, then the built-in ones it names (python, files, memory) that the
        # kernel does not offer yet: a named agent works the same on any kernel.
        built_in = {tool.name: tool for tool in builtin_tools()}
        for name in self.spec.tools:
            tool = next((t for t in self.tools if t.name == name), None) or built_in.get(name)
            if tool is not None and name not in kernel.tools:
                kernel.tools.register(tool)
        if on_event is not None:
            kernel.listeners.append(on_event)
        try:
            args = {"spec": self.spec.model_dump(), "task": task}
            info = await kernel.run(
                run_agent, name=self.spec.name, args=args, capabilities=self.capabilities, budget=self.budget
            )
        finally:
            if on_event is not None:
                kernel.listeners.remove(on_event)
        answer = info.result if info.state == State.DONE else None
        return AgentRun(pid=info.pid, state=info.state, answer=answer, error=info.error, usage=info.usage)

    def run(
        self, task: str, *, on_event: EventListener | None = None, config: Config | None = None
    ) -> AgentRun:
        """The same, for code without an event loop."""
        return asyncio.run(self.arun(task, on_event=on_event, config=config))
