"""`llmos run` and `llmos resume`: run an agent as a process, streaming its steps."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.text import Text

from llmos.agents.agent import run_agent
from llmos.agents.catalog import AGENTS, agent_spec
from llmos.agents.render import EventPrinter
from llmos.boot import Kernel
from llmos.config import load_config
from llmos.kernel import KernelError, ProcessInfo, State
from llmos.kernel.devices import LLMError
from llmos.kernel.journal import Journal

out = Console()
err = Console(stderr=True, soft_wrap=True)  # an error sentence is never broken into lines


async def _load_model(kernel: Kernel, model: str | None) -> None:
    name = model or kernel.config.llm.model
    out.print(Text(f"loading model {name}...", style="dim"))
    await kernel.llm(model)


async def _follow(kernel: Kernel, pid: int) -> ProcessInfo:
    kernel.listeners.append(EventPrinter(out, pids={pid}))
    try:
        return await kernel.wait(pid)
    except asyncio.CancelledError:
        err.print(f"\ninterrupted: continue with `llmos resume {pid}`")
        raise


def _error(message: str) -> Text:
    return Text.assemble(("error:", "red"), " ", message)


def _finish(info: ProcessInfo, workspace: Path) -> None:
    usage = info.usage
    out.print(
        Text(
            f"process {info.pid} {info.state.value}: {usage.tokens} tokens ({usage.reused_prompt_tokens} "
            f"reused), {usage.tool_calls} tool calls, {usage.wall_time_s:.1f}s",
            style="dim",
        )
    )
    made = sum(1 for path in workspace.rglob("*") if path.is_file()) if workspace.is_dir() else 0
    if made:
        out.print(Text(f"its files ({made}): {workspace}", style="dim"), soft_wrap=True)
    if info.state != State.DONE:
        err.print(_error(info.error or info.state.value))
        raise typer.Exit(1)
    out.print(Text(str(info.result)), soft_wrap=True)  # the answer as the model wrote it, lines unbroken


def run(
    task: Annotated[str, typer.Argument(help="What the agent should do.")],
    agent: Annotated[str, typer.Option(help=f"One of: {', '.join(AGENTS)}.")] = "coder",
    model: Annotated[str | None, typer.Option(help="Catalog name, .gguf path or openai:NAME.")] = None,
    max_steps: Annotated[int | None, typer.Option(min=1, help="Stop after this many steps.")] = None,
) -> None:
    """Run an agent on a task, streaming its steps; exits non-zero if it fails."""
    config = load_config()
    try:
        spec = agent_spec(agent)
    except KeyError as exc:
        err.print(_error(str(exc.args[0])))
        raise typer.Exit(2) from None
    spec = spec.model_copy(update={"model": model or spec.model, "max_steps": max_steps or spec.max_steps})

    async def main() -> ProcessInfo:
        async with Kernel(config) as kernel:
            await _load_model(kernel, spec.model)
            pid = await kernel.spawn(
                run_agent, name=spec.name, args={"spec": spec.model_dump(), "task": task}
            )
            out.print(
                Text(
                    f"process {pid} started; if it is interrupted, `llmos resume {pid}` continues it",
                    style="dim",
                )
            )
            return await _follow(kernel, pid)

    info = _run_async(main)
    _finish(info, config.workspace(info.pid))


def resume(pid: Annotated[int, typer.Argument(help="An interrupted process, from `llmos ps`.")]) -> None:
    """Continue an interrupted process: finished steps are replayed from the journal, not re-run."""
    config = load_config()
    _check_resumable(config.journal_path, pid)  # before a kernel boots or a model loads

    async def main() -> ProcessInfo:
        async with Kernel(config) as kernel:
            info = kernel.process(pid)
            if info.state != State.INTERRUPTED:  # still running under another kernel
                raise KernelError(_not_resumable(pid, info.state))
            await _load_model(kernel, info.args.get("spec", {}).get("model"))
            await kernel.resume(pid)
            out.print(Text(f"process {pid} resumed", style="dim"))
            return await _follow(kernel, pid)

    _finish(_run_async(main), config.workspace(pid))


def _not_resumable(pid: int, state: State) -> str:
    return f"Process {pid} is {state.value}; only an interrupted process can be resumed."


def _check_resumable(journal_path: Path, pid: int) -> None:
    """Say that `pid` does not exist or has finished, from the journal read as it is."""
    journal = Journal.open_read_only(journal_path)
    info = None if journal is None else journal.process(pid, with_usage=False)
    if journal is not None:
        journal.close()
    if info is None:
        err.print(_error(f"No process {pid}; `llmos ps --all` lists the processes."))
        raise typer.Exit(1)
    if info.state.finished:
        err.print(_error(_not_resumable(pid, info.state)))
        raise typer.Exit(1)


def _run_async(main: Callable[[], Coroutine[Any, Any, ProcessInfo]]) -> ProcessInfo:
    try:
        return asyncio.run(main())
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except (KernelError, LLMError) as exc:
        err.print(_error(str(exc)))
        raise typer.Exit(1) from None
