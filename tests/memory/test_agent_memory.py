"""An agent with `memory=True`: its context window's memory reads and writes are its own syscalls,
shown by `llmos log`, and refused without the `memory` capability (scripted fake model)."""

from __future__ import annotations

from typing import Any

from typer.testing import CliRunner

from llmos import Kernel
from llmos.agents.agent import AgentSpec, run_agent
from llmos.cli import app
from llmos.config import load_config
from llmos.cpu.scripted import ScriptedLLM
from llmos.kernel import State
from llmos.kernel.devices import ChatRequest, ChatResult, ToolCall
from llmos.tools.registry import tool

STEPS = 30


@tool
def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: first number.
        b: second number.
    """
    return a + b


def counting_model() -> ScriptedLLM:
    """Adds one per step for STEPS steps, then answers; asked for a summary, says one line. (It
    counts its own steps: the window pages the early ones out of the prompt.)"""
    steps = 0

    def reply(request: ChatRequest) -> str | ChatResult:
        nonlocal steps
        if request.messages[0].content.startswith("Summarise"):
            return "Earlier the agent added numbers with the add tool."
        steps += 1
        if steps > STEPS:
            return ChatResult(
                tool_calls=[ToolCall(id="end", name="final_answer", arguments={"answer": "done"})]
            )
        return ChatResult(
            tool_calls=[ToolCall(id=f"call-{steps}", name="add", arguments={"a": steps, "b": 1})]
        )

    return ScriptedLLM([reply] * 200, context_length=512)


def log_lines(pid: int) -> list[str]:
    result = CliRunner().invoke(app, ["log", str(pid)])
    assert result.exit_code == 0, result.output
    return result.output.splitlines()


def spec(**overrides: Any) -> dict[str, Any]:
    return AgentSpec(
        tools=["add"], memory=True, max_steps=STEPS + 5, max_tokens_per_step=64, **overrides
    ).model_dump()


async def test_an_agents_memory_reads_and_writes_are_in_llmos_log() -> None:
    async with Kernel(load_config(), llm=counting_model()) as kernel:
        kernel.tools.register(add)
        info = await kernel.run(run_agent, args={"spec": spec(), "task": "Count to thirty with add."})
    assert info.state == State.DONE and info.result == "done", info.error
    lines = log_lines(info.pid)
    for call in ("llm.info", "llm.count", "mem.get", "mem.add"):
        assert any(f" {call}(" in line and ") = ok " in line for line in lines), call
    # The page-out archived the turns in one mem.add of records with deterministic ids.
    [archive] = [line for line in lines if " mem.add(" in line and "turn:process-" in line][:1]
    assert f"turn:process-{info.pid}:0" in archive


async def test_the_same_agent_without_the_memory_capability_stops_in_one_sentence() -> None:
    llm = counting_model()
    async with Kernel(load_config(), llm=llm) as kernel:
        kernel.tools.register(add)
        info = await kernel.run(
            run_agent,
            args={"spec": spec(), "task": "Count to thirty with add."},
            capabilities=["llm", "tool:*"],
        )
    assert info.state == State.FAILED and info.error is not None
    assert (
        "lacks the capability 'memory'" in info.error
        and "give the process the 'memory' capability" in info.error
    )
    assert "\n" not in info.error and info.error.count(". ") == 0
    assert llm.requests == []  # it stopped before spending a token
    lines = log_lines(info.pid)
    assert "--- failed (ContextError: The context window of process" in lines[-1]
    denied = [line for line in lines[:-1] if " mem." in line]
    assert denied and all("= error[denied]" in line for line in denied)
