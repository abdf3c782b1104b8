"""The catalog's named agents from Python (`Agent("coder")`) on the real default model.

They must work as they do from `llmos run`: with their own tools and their own step limits,
on a kernel the app boots or that `Agent.run` boots for it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from llmos import Agent, Kernel
from llmos.agents.catalog import AGENTS
from llmos.config import Config, SandboxConfig, load_config

pytestmark = pytest.mark.slow


@pytest.fixture
def config(llmos_home: Path) -> Config:
    # The namespace sandbox: no Docker engine is needed for these.
    return load_config(env={"LLMOS_HOME": str(llmos_home)}).model_copy(
        update={"sandbox": SandboxConfig(backend="namespace", pool_size=0)}
    )


def test_a_named_agent_keeps_its_own_step_limit_and_tools() -> None:
    for name, spec in AGENTS.items():
        agent = Agent(name)
        assert agent.spec.max_steps == spec.max_steps
        assert agent.spec.tools == spec.tools
    assert Agent("coder", max_steps=3).spec.max_steps == 3


def test_coder_from_python_on_a_kernel_it_boots(config: Config) -> None:
    run = Agent("coder").run("What is 17*23?", config=config)
    assert run.ok, run.error
    assert "391" in str(run.answer)
    assert run.usage.tool_calls >= 1  # it computed with its python tool


async def test_assistant_and_researcher_on_a_kernel_the_app_boots(config: Config) -> None:
    events: list[dict[str, object]] = []
    async with Kernel(config) as kernel:
        assistant = await Agent("assistant").arun(
            "Use the python tool to compute 17*23.",
            kernel=kernel,
            on_event=lambda kind, data: events.append(data) if kind == "agent" else None,
        )
        assert assistant.ok, assistant.error
        assert "391" in str(assistant.answer)
        tools_used = {data.get("tool") for data in events if data.get("event") == "tool_call"}
        assert "python" in tools_used

        store = await kernel.memory()
        store.add(
            "The Lisbon office opens at 8:30 on weekdays.",
            namespace="shared",
            source="office-hours.md",
            trust="user",
            pid=None,
        )
        researcher = await Agent("researcher").arun("When does the Lisbon office open?", kernel=kernel)
    assert researcher.ok, researcher.error
    assert "office-hours.md" in str(researcher.answer)
    assert researcher.usage.tool_calls >= 1
