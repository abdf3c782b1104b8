"""The agent loop's control flow, driven by a scripted fake LLM (named so: no model quality here)."""

from __future__ import annotations

from typing import Any

from llmos import Kernel
from llmos.agents.agent import AgentSpec, run_agent
from llmos.config import load_config
from llmos.cpu.scripted import ScriptedLLM
from llmos.kernel import Budget, State
from llmos.kernel.devices import ChatResult, ToolCall
from llmos.tools.registry import tool


@tool
def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: first number.
        b: second number.
    """
    return a + b


def call(name: str, **arguments: Any) -> ChatResult:
    return ChatResult(tool_calls=[ToolCall(id=f"call-{name}", name=name, arguments=arguments)])


def spec(**overrides: Any) -> dict[str, Any]:
    return AgentSpec(tools=["add"], **overrides).model_dump()


async def test_the_agent_calls_a_tool_then_answers() -> None:
    llm = ScriptedLLM([call("add", a=2, b=40), call("final_answer", answer="42")])
    events: list[dict[str, Any]] = []
    async with Kernel(load_config(), llm=llm) as kernel:
        kernel.tools.register(add)
        kernel.listeners.append(lambda kind, data: events.append(data) if kind == "agent" else None)
        info = await kernel.run(run_agent, args={"spec": spec(), "task": "What is 2 + 40?"})
    assert info.state == State.DONE and info.result == "42"
    assert [e["event"] for e in events] == ["step", "tool_call", "tool_result", "step", "answer"]
    assert events[2]["result"] == "42"
    # The model saw the tool's result before answering.
    seen = llm.requests[1].messages[-1]
    assert seen.role == "tool" and seen.content.startswith("42\n")
    assert [t.name for t in llm.requests[0].tools] == ["add", "final_answer"]
    assert llm.requests[0].tool_choice == "required"


async def test_garbage_from_the_model_goes_back_as_observations_until_the_step_limit() -> None:
    garbage = [
        "I think the answer might be... {not json",  # not a tool call at all
        call("nonexistent_tool", x=1),  # unknown tool
        call("add", a="two", b=None),  # wrong types
        call("add", a=1),  # missing argument
        call("add", a=1, b=2, c=3),  # extra argument
        call("final_answer"),  # an answer without the answer
    ]
    llm = ScriptedLLM(garbage)
    async with Kernel(load_config(), llm=llm) as kernel:
        kernel.tools.register(add)
        info = await kernel.run(run_agent, args={"spec": spec(max_steps=6), "task": "Add 1 and 2."})
    assert info.state == State.FAILED
    assert info.error == "AgentStopped: no answer after 6 steps; raise max_steps or give a simpler task"
    observations = [m.content for m in llm.requests[-1].messages if m.role in ("tool", "user")][1:]
    assert "held no action" in observations[0]
    assert "nonexistent_tool" in observations[1] and "add" in observations[1]
    assert all("error" in text for text in observations[2:5])


async def test_a_token_budget_ends_the_run_with_a_clear_error() -> None:
    llm = ScriptedLLM([call("add", a=1, b=1)] * 10)
    async with Kernel(load_config(), llm=llm) as kernel:
        kernel.tools.register(add)
        info = await kernel.run(
            run_agent, args={"spec": spec(), "task": "Keep adding forever."}, budget=Budget(tokens=30)
        )
    assert info.state == State.FAILED
    assert info.error is not None and "token budget of 30 used up" in info.error


async def test_code_actions_run_in_the_sandbox_and_end_on_a_final_answer() -> None:
    from llmos.tools.python import python

    llm = ScriptedLLM(
        [
            "I will compute it.\n```python\nanswer = 6 * 7\nprint(answer)\n```",
            "Thinking about what to do...",  # no action: told how to act
            "```python\nanswer + 1\n```",  # variables persist; the final expression's value is shown
            "Final answer: 42",
        ]
    )
    config = load_config(env={"LLMOS_SANDBOX__BACKEND": "namespace"})
    async with Kernel(config, llm=llm) as kernel:
        kernel.tools.register(python)
        code_spec = AgentSpec(tools=["python"], style="code").model_dump()
        info = await kernel.run(run_agent, args={"spec": code_spec, "task": "What is 6 times 7?"})
    assert info.state == State.DONE and info.result == "42"
    assert llm.requests[0].tools == [] and "```python" in llm.requests[0].messages[0].content
    assert "The code printed:\n42\n" in llm.requests[1].messages[-1].content
    assert "held no action" in llm.requests[2].messages[-1].content
    assert "value: 43" in llm.requests[3].messages[-1].content
    assert info.usage.tool_calls == 2


async def test_a_long_run_with_memory_stays_within_the_context_window() -> None:
    """60 steps through a 512-token window: every prompt fits; old turns are summarised and archived."""
    from llmos.kernel.devices import ChatRequest

    steps = 60

    def reply(request: ChatRequest) -> str | ChatResult:
        if request.messages[0].content.startswith("Summarise"):
            return "Earlier the agent added numbers with the add tool."
        done = sum(1 for m in request.messages if m.role == "tool")
        return call("final_answer", answer="done") if done >= steps else call("add", a=done, b=1)

    llm = ScriptedLLM([reply] * 200, context_length=512)
    async with Kernel(load_config(), llm=llm) as kernel:
        kernel.tools.register(add)
        memory_spec = spec(memory=True, max_steps=steps + 5, max_tokens_per_step=64)
        info = await kernel.run(run_agent, args={"spec": memory_spec, "task": "Count to sixty with add."})
        archived = (await kernel.memory()).count()
    assert info.state == State.FAILED or info.result == "done"
    prompts = [r for r in llm.requests if not r.messages[0].content.startswith("Summarise")]
    sizes = [sum(llm.count_tokens(m.content) + 6 for m in r.messages) for r in prompts]
    assert max(sizes) <= 512 - 64
    summaries = len(llm.requests) - len(prompts)
    assert summaries >= 1 and archived > 0
    assert info.usage.syscalls >= steps  # the summaries went through the kernel too: charged and journaled


async def test_a_model_that_reruns_the_same_code_gets_its_printed_line_as_the_answer() -> None:
    from llmos.tools.python import python

    block = "```python\nprint(sum(range(10)))\n```"
    llm = ScriptedLLM([block, block, block])
    async with Kernel(load_config(env={"LLMOS_SANDBOX__BACKEND": "namespace"}), llm=llm) as kernel:
        kernel.tools.register(python)
        code_spec = AgentSpec(tools=["python"], style="code").model_dump()
        info = await kernel.run(run_agent, args={"spec": code_spec, "task": "Sum 0..9."})
    assert info.result == "45" and info.usage.tool_calls == 1 and len(llm.requests) == 2


async def test_kill_cancels_a_run_in_the_middle_of_a_tool_call() -> None:
    import asyncio
    import time

    from llmos.tools.python import python

    llm = ScriptedLLM(["```python\nimport time\nwhile True:\n    time.sleep(0.1)\n```"])
    env = {"LLMOS_SANDBOX__BACKEND": "namespace", "LLMOS_SANDBOX__LIMITS__WALL_TIME_S": "120"}
    config = load_config(env=env)
    async with Kernel(config, llm=llm) as kernel:
        kernel.tools.register(python)
        code_spec = AgentSpec(tools=["python"], style="code").model_dump()
        pid = await kernel.spawn(run_agent, args={"spec": code_spec, "task": "Loop forever."})
        while not any(e.name == "tool.call" and e.kind == "call" for e in kernel.log(pid)):
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # the code is running in the sandbox now
        started = time.monotonic()
        await kernel.kill(pid)
        assert time.monotonic() - started < 5
        assert kernel.process(pid).state == State.KILLED
        sandbox = await kernel.sandbox()
        result = await sandbox.exec(str(pid + 100), "1 + 1")  # the sandbox still serves others
        assert result.value == "2"
