"""AutoGen teams on the kernel.

Tests named `scripted` use a scripted fake LLM: they check control flow (process tree, charging,
kill), never model quality. Tests named `real` run the small local model (smollm2-135m).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from autogen_core.models import (
    AssistantMessage,
    CreateResult,
    FunctionExecutionResult,
    FunctionExecutionResultMessage,
    SystemMessage,
    UserMessage,
)
from pydantic import ValidationError

from llmos import Kernel
from llmos.agents.autogen import (
    KernelChatClient,
    LLMCallFailed,
    MemberSpec,
    ProcessStopped,
    TeamSpec,
    run_team,
    spawn_team,
    to_autogen_tool,
)
from llmos.config import Config
from llmos.cpu.scripted import ScriptedLLM
from llmos.kernel import Budget, Process, State
from llmos.kernel.devices import ChatRequest, ChatResult, ToolCall
from llmos.tools.registry import tool


@tool
def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: first number.
        b: second number.
    """
    return a + b


def pair(**team: Any) -> TeamSpec:
    members = [
        MemberSpec(name="coder", system_message="You write Python code.", description="writes code"),
        MemberSpec(name="reviewer", system_message="You review code in one line.", description="reviews"),
    ]
    return TeamSpec(members=members, **team)


def team_tokens(kernel: Kernel, team_pid: int) -> int:
    """The team's tokens as the journal has them: its own LLM syscalls plus its members'."""
    pids = [team_pid] + [info.pid for info in kernel.journal.children(team_pid)]
    return sum(usage.tokens for usage in kernel.journal.usage_by_pid(pids).values())


def llm_calls(kernel: Kernel, pid: int) -> int:
    return sum(1 for e in kernel.log(pid) if e.kind == "result" and e.name == "llm.chat")


def selector_or(answer: str, name: str) -> Any:
    """A scripted reply: `name` when AutoGen's selector asks who speaks next, else `answer`."""

    def reply(request: ChatRequest) -> str:
        return name if "select the next role" in request.messages[-1].content else answer

    return reply


# --- the model client ---------------------------------------------------------------------------


async def test_scripted_client_calls_are_syscalls_of_its_process(config: Config) -> None:
    llm = ScriptedLLM(["one two three", "four five"])

    async def program(proc: Process) -> dict[str, Any]:
        client = await KernelChatClient.open(proc, max_tokens=50)
        first = await client.create(
            [SystemMessage(content="be brief"), UserMessage(content="hi", source="u")]
        )
        chunks = [c async for c in client.create_stream([UserMessage(content="more", source="u")])]
        return {
            "first": first.model_dump(mode="json"),
            "chunks": [c if isinstance(c, str) else "RESULT" for c in chunks],
            "final": chunks[-1].model_dump(mode="json") if isinstance(chunks[-1], CreateResult) else None,
            "total": [client.total_usage().prompt_tokens, client.total_usage().completion_tokens],
            "actual": [client.actual_usage().prompt_tokens, client.actual_usage().completion_tokens],
            "info": dict(client.model_info),
            "count": client.count_tokens([UserMessage(content="a b c", source="u")]),
        }

    async with Kernel(config, llm=llm) as kernel:
        info = await kernel.run(program)
        assert info.state == State.DONE, info.error
        result = info.result
        assert result["first"]["content"] == "one two three" and result["first"]["finish_reason"] == "stop"
        assert "".join(result["chunks"][:-1]) == "four five " and result["chunks"][-1] == "RESULT"
        assert result["final"]["content"] == "four five"
        # Each call was one journaled llm.chat syscall of this process, and AutoGen's usage agrees.
        assert llm_calls(kernel, info.pid) == 2
        assert result["total"] == [info.usage.prompt_tokens, info.usage.completion_tokens] == [4, 5]
        assert result["actual"] == [1, 2]
        assert result["info"]["family"] == "scripted" and result["info"]["function_calling"] is True
        assert result["info"]["vision"] is False and result["info"]["structured_output"] is True
        # AutoGen counts synchronously, a syscall cannot: an estimate (characters / 4) plus the role overhead.
        assert result["count"] == len("a b c") // 4 + 1 + 4
        assert llm.requests[0].max_tokens == 50 and llm.requests[0].messages[0].role == "system"


async def test_scripted_client_maps_tool_calls_both_ways(config: Config) -> None:
    llm = ScriptedLLM(
        [ChatResult(text="", tool_calls=[ToolCall(id="c1", name="add", arguments={"a": 2, "b": 3})]), "5"]
    )

    async def program(proc: Process) -> list[Any]:
        client = KernelChatClient(proc)
        autogen_add = to_autogen_tool(add, proc)
        ask = [UserMessage(content="2+3?", source="user")]
        first = await client.create(ask, tools=[autogen_add], tool_choice=autogen_add)
        assert isinstance(first.content, list)
        call = first.content[0]
        value = await autogen_add.run_json(json.loads(call.arguments), None)  # type: ignore[arg-type]
        history = [
            *ask,
            AssistantMessage(content=[call], source="coder"),
            FunctionExecutionResultMessage(
                content=[FunctionExecutionResult(content=value, name="add", call_id=call.id)]
            ),
        ]
        second = await client.create(history)
        return [first.finish_reason, call.name, call.arguments, value, second.content]

    async with Kernel(config, llm=llm) as kernel:
        kernel.tools.register(add)
        info = await kernel.run(program)
        assert info.state == State.DONE, info.error
        assert info.result == ["function_calls", "add", '{"a": 2, "b": 3}', "5", "5"]
        first, second = llm.requests
        assert first.tool_choice == "add" and first.tools[0].name == "add"
        assert "a" in first.tools[0].parameters["properties"]
        assistant, tool_message = second.messages[1], second.messages[2]
        assert assistant.tool_calls == [ToolCall(id="c1", name="add", arguments={"a": 2, "b": 3})]
        assert (tool_message.role, tool_message.tool_call_id, tool_message.content) == ("tool", "c1", "5")
        assert info.usage.tool_calls == 1  # the tool ran as a tool.call syscall of this process


async def test_scripted_client_errors_are_clear(config: Config) -> None:
    async def program(proc: Process) -> list[str]:
        client = KernelChatClient(proc)
        errors = []
        with pytest.raises(ValueError, match="not supported") as bad_arg:
            await client.create([UserMessage(content="hi", source="u")], extra_create_args={"foo": 1})
        errors.append(str(bad_arg.value))
        await client.create([UserMessage(content="hi", source="u")])
        with pytest.raises(LLMCallFailed, match="token budget") as budget:
            await client.create([UserMessage(content="again", source="u")])
        errors.append(str(budget.value))
        client.stop("test over")
        with pytest.raises(ProcessStopped, match="test over"):
            await client.create([UserMessage(content="hi", source="u")])
        bad_tool = to_autogen_tool(add, proc)
        with pytest.raises(RuntimeError, match="argument 'b'"):
            await bad_tool.run_json({"a": 1}, None)  # type: ignore[arg-type]
        return errors

    async with Kernel(config, llm=ScriptedLLM(["lots of words here"] * 3)) as kernel:
        kernel.tools.register(add)
        info = await kernel.run(program, budget=Budget(tokens=3))
        assert info.state == State.DONE, info.error


# --- teams as process trees ---------------------------------------------------------------------


async def test_scripted_round_robin_team_is_a_process_tree_charged_per_member(config: Config) -> None:
    llm = ScriptedLLM(["def add(a, b): return a + b", "Fine. APPROVE"])
    messages: list[dict[str, Any]] = []
    async with Kernel(config, llm=llm) as kernel:
        kernel.listeners.append(lambda kind, data: messages.append(data) if kind == "team.message" else None)
        info = await run_team(kernel, pair(max_turns=4, termination_text="APPROVE"), "Write add(a, b).")
        assert info.state == State.DONE, info.error
        result = info.result
        assert "APPROVE" in result["stop_reason"]
        assert [m["source"] for m in result["messages"]] == ["user", "coder", "reviewer"]
        assert [m["source"] for m in messages] == ["user", "coder", "reviewer"]
        tree = {p.pid: p for p in kernel.ps()}
        coder, reviewer = result["members"]["coder"], result["members"]["reviewer"]
        assert tree[coder].ppid == tree[reviewer].ppid == info.pid
        assert tree[coder].name == "coder" and all(p.state == State.DONE for p in tree.values())
        # Each member's call is charged to its own process; the team made no LLM call itself.
        assert llm_calls(kernel, coder) == llm_calls(kernel, reviewer) == 1
        assert llm_calls(kernel, info.pid) == 0
        total = result["client_usage"]["prompt_tokens"] + result["client_usage"]["completion_tokens"]
        assert (
            team_tokens(kernel, info.pid) == total == tree[coder].usage.tokens + tree[reviewer].usage.tokens
        )
        assert result["message_usage"] == result["client_usage"]


async def test_a_budget_on_the_team_holds_for_all_its_members(config: Config) -> None:
    replies = ["def add(a, b): return a + b", "Fine. APPROVE"]
    async with Kernel(config, llm=ScriptedLLM(replies)) as kernel:
        free = await run_team(kernel, pair(max_turns=4, termination_text="APPROVE"), "Write add(a, b).")
        coder_tokens = kernel.process(free.result["members"]["coder"]).usage.tokens
    # Room for the coder's call and not much more: the members have no budgets of their own.
    async with Kernel(config, llm=ScriptedLLM(replies)) as kernel:
        spec = pair(max_turns=4, termination_text="APPROVE")
        info = await run_team(kernel, spec, "Write add(a, b).", budget=Budget(tokens=coder_tokens + 5))
        assert info.state == State.FAILED
        assert f"token budget of {coder_tokens + 5}" in (info.error or ""), info.error
        assert f"the budget of process {info.pid} (team), which covers" in (info.error or ""), info.error
        assert team_tokens(kernel, info.pid) <= coder_tokens + 5


async def test_scripted_selector_calls_are_charged_to_the_team(config: Config) -> None:
    llm = ScriptedLLM(
        [selector_or("", "coder"), "def add(a, b): return a + b", selector_or("", "reviewer"), "Fine."]
    )
    async with Kernel(config, llm=llm) as kernel:
        info = await run_team(
            kernel, pair(kind="selector", max_turns=2, allow_repeated_speaker=True), "Write add(a, b)."
        )
        assert info.state == State.DONE, info.error
        result = info.result
        assert [m["source"] for m in result["messages"]] == ["user", "coder", "reviewer"]
        assert llm_calls(kernel, info.pid) == 2  # the two speaker selections
        selections = info.usage.tokens
        members = result["message_usage"]["prompt_tokens"] + result["message_usage"]["completion_tokens"]
        assert selections > 0
        assert team_tokens(kernel, info.pid) == selections + members
        client = result["client_usage"]["prompt_tokens"] + result["client_usage"]["completion_tokens"]
        assert client == selections + members


async def test_scripted_swarm_hands_off_through_the_kernel(config: Config) -> None:
    handoff = ChatResult(tool_calls=[ToolCall(id="h1", name="transfer_to_reviewer", arguments={})])
    llm = ScriptedLLM([handoff, "Reviewed. APPROVE"])
    spec = TeamSpec(
        kind="swarm",
        members=[MemberSpec(name="coder", handoffs=["reviewer"]), MemberSpec(name="reviewer")],
        max_turns=4,
        termination_text="APPROVE",
    )
    async with Kernel(config, llm=llm) as kernel:
        info = await run_team(kernel, spec, "Write add(a, b).")
        assert info.state == State.DONE, info.error
        sources = [(m["source"], m["type"]) for m in info.result["messages"]]
        assert ("coder", "HandoffMessage") in sources and sources[-1] == ("reviewer", "TextMessage")
        assert llm.requests[0].tools[0].name == "transfer_to_reviewer"


async def test_scripted_member_tools_run_as_syscalls_of_the_member(config: Config) -> None:
    call = ChatResult(tool_calls=[ToolCall(id="t1", name="add", arguments={"a": 40, "b": 2})])
    llm = ScriptedLLM([call, "The sum is 42."])
    spec = TeamSpec(members=[MemberSpec(name="calc", tools=["add"])], max_turns=2)
    async with Kernel(config, llm=llm) as kernel:
        kernel.tools.register(add)
        info = await run_team(kernel, spec, "What is 40 + 2?")
        assert info.state == State.DONE, info.error
        calc = info.result["members"]["calc"]
        assert kernel.process(calc).usage.tool_calls == 1 and info.usage.tool_calls == 0
        assert any(
            m["type"] == "ToolCallSummaryMessage" and "42" in m["content"] for m in info.result["messages"]
        )


async def test_bad_team_specs_are_refused_with_a_reason(config: Config) -> None:
    with pytest.raises(ValidationError, match="unique"):
        TeamSpec(members=[MemberSpec(name="a"), MemberSpec(name="a")])
    with pytest.raises(ValidationError, match="never stops"):
        TeamSpec(members=[MemberSpec(name="a")], max_turns=None)
    with pytest.raises(ValidationError, match="unknown members"):
        TeamSpec(members=[MemberSpec(name="a", handoffs=["b"])])
    with pytest.raises(ValidationError, match="name"):
        MemberSpec(name="not an identifier")
    async with Kernel(config, llm=ScriptedLLM([])) as kernel:
        spec = TeamSpec(members=[MemberSpec(name="calc", tools=["missing"])])
        info = await run_team(kernel, spec, "hi")
        assert info.state == State.FAILED
        assert "names tool 'missing'" in (info.error or "") and "kernel.tools.register" in (info.error or "")


async def test_scripted_member_budget_stops_the_team_with_the_reason(config: Config) -> None:
    spec = pair(max_turns=4)
    spec.members[1].budget = Budget(tokens=0)
    async with Kernel(config, llm=ScriptedLLM(["some code here", "never said"])) as kernel:
        info = await run_team(kernel, spec, "Write add.")
        assert info.state == State.FAILED
        assert "token budget" in (info.error or "")
        assert all(p.state.finished for p in kernel.ps())  # no member is left behind


# --- kill -----------------------------------------------------------------------------------------


async def wait_until_hanging(kernel: Kernel, llm: Any, team_pid: int) -> None:
    await asyncio.wait_for(llm.hanging.wait(), 60)
    assert kernel.process(team_pid).state == State.RUNNING


async def test_scripted_killing_the_team_kills_every_member_mid_call(
    config: Config, hanging_llm: Any
) -> None:
    llm = hanging_llm  # the reviewer's call hangs
    async with Kernel(config, llm=llm) as kernel:
        pid = await spawn_team(kernel, pair(max_turns=4), "Write add.")
        await wait_until_hanging(kernel, llm, pid)
        await asyncio.wait_for(kernel.kill(pid), 30)
        states = {info.name: info.state for info in kernel.ps()}
        assert states == {"team": State.KILLED, "coder": State.KILLED, "reviewer": State.KILLED}
        # The call in flight was abandoned: its syscall has no result, so nothing was charged for it.
        reviewer = next(p.pid for p in kernel.ps() if p.name == "reviewer")
        assert llm_calls(kernel, reviewer) == 0
        assert llm.cancelled.is_set()  # the model call in flight stopped too
        await asyncio.sleep(0)
        leftovers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]
        assert leftovers == []  # nothing of AutoGen's run is left behind


async def test_scripted_team_out_of_wall_time_takes_its_members_along(
    config: Config, hanging_llm: Any
) -> None:
    async with Kernel(config, llm=hanging_llm) as kernel:
        info = await kernel.wait(
            await spawn_team(kernel, pair(max_turns=4), "Write add.", budget=Budget(wall_time_s=2)), 30
        )
        assert info.state == State.FAILED and "wall-time budget" in (info.error or "")
        assert {p.name: p.state for p in kernel.ps() if p.pid != info.pid} == {
            "coder": State.KILLED, "reviewer": State.KILLED,
        }  # fmt: skip


async def test_scripted_killing_one_member_fails_the_team_clearly(config: Config, hanging_llm: Any) -> None:
    llm = hanging_llm
    async with Kernel(config, llm=llm) as kernel:
        pid = await spawn_team(kernel, pair(max_turns=4), "Write add.")
        await wait_until_hanging(kernel, llm, pid)
        reviewer = next(p.pid for p in kernel.ps() if p.name == "reviewer")
        await kernel.kill(reviewer)
        info = await asyncio.wait_for(kernel.wait(pid), 30)
        assert info.state == State.FAILED
        assert f"Team member reviewer (pid {reviewer}, killed) ended while the team ran" in (info.error or "")
        assert all(p.state.finished for p in kernel.ps())  # the coder was told to stop


# --- the real small model -------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["round_robin", "selector"])
async def test_real_team_finishes_and_its_tokens_match_the_journal(
    config: Config, small_model: str, kind: str
) -> None:
    spec = pair(kind=kind, model=small_model, max_turns=2, max_tokens=16, selector_max_tokens=8)
    async with Kernel(config) as kernel:
        info = await run_team(kernel, spec, "Write a Python function add(a, b).")
        assert info.state == State.DONE, info.error
        result = info.result
        assert result["stop_reason"] and "2" in result["stop_reason"]  # max turns reached, no error
        spoke = [m for m in result["messages"] if m["source"] in ("coder", "reviewer")]
        assert len(spoke) == 2 and all(m["content"].strip() for m in spoke)
        client = result["client_usage"]["prompt_tokens"] + result["client_usage"]["completion_tokens"]
        members = result["message_usage"]["prompt_tokens"] + result["message_usage"]["completion_tokens"]
        assert team_tokens(kernel, info.pid) == client
        if kind == "selector":
            assert llm_calls(kernel, info.pid) >= 1  # speaker selection is charged to the team
            assert client == members + info.usage.tokens
        else:
            assert llm_calls(kernel, info.pid) == 0 and client == members


@pytest.mark.slow
async def test_real_killing_the_team_kills_every_member(config: Config, small_model: str) -> None:
    spec = pair(model=small_model, max_turns=50, max_tokens=64)
    async with Kernel(config) as kernel:
        pid = await spawn_team(kernel, spec, "Write a Python function add(a, b).")

        async def first_model_call() -> None:
            while not any(e.name == "llm.chat" for p in kernel.ps() for e in kernel.log(p.pid)):
                await asyncio.sleep(0.05)

        await asyncio.wait_for(first_model_call(), 120)
        await asyncio.wait_for(kernel.kill(pid), 60)
        assert {info.name: info.state for info in kernel.ps()} == {
            "team": State.KILLED, "coder": State.KILLED, "reviewer": State.KILLED,
        }  # fmt: skip


async def test_scripted_team_resumes_without_repeating_finished_model_calls(
    config: Config, hanging_llm: Any
) -> None:
    async with Kernel(config, llm=hanging_llm) as kernel:
        pid = await spawn_team(kernel, pair(max_turns=2), "Write add.")
        await wait_until_hanging(kernel, hanging_llm, pid)
    # The kernel went away mid-run: the team and its members are interrupted. A new kernel resumes.
    llm = ScriptedLLM(["Fine."])
    async with Kernel(config, llm=llm) as kernel:
        assert {p.state for p in kernel.ps()} == {State.INTERRUPTED}
        await kernel.resume(pid)
        info = await asyncio.wait_for(kernel.wait(pid), 30)
        assert info.state == State.DONE, info.error
        assert [m["content"] for m in info.result["messages"]] == [
            "Write add.", "def add(a, b): return a + b", "Fine.",
        ]  # fmt: skip
        assert len(llm.requests) == 1  # the coder's answer came from the journal, not the model
        assert all(p.state == State.DONE for p in kernel.ps())
