"""`llmos run` and `llmos resume`: run an agent as a process, streaming its steps."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from llmos.agents.agent import run_agent
from llmos.agents.catalog import AGENTS, agent_spec, default_tools
from llmos.agents.render import EventPrinter
from llmos.config import load_config
from llmos.cpu.base import LLMError
from llmos.kernel import Kernel, KernelError, ProcessInfo, State

out = Console()
err = Console(stderr=True)


async def _load_model(kernel: Kernel, model: str | None) -> None:
    name = model or kernel.config.llm.model
    out.print(f"[dim]loading model {name}...[/]")
    await kernel.llm(model)


async def _follow(kernel: Kernel, pid: int) -> ProcessInfo:
    kernel.listeners.append(EventPrinter(out, pids={pid}))
    try:
        return await kernel.wait(pid)
    except asyncio.CancelledError:
        err.print(f"\ninterrupted: continue with `llmos resume {pid}`")
        raise


def _finish(info: ProcessInfo, workspace: Path) -> None:
    usage = info.usage
    out.print(
        f"[dim]process {info.pid} {info.state.value}: {usage.tokens} tokens "
        f"({usage.reused_prompt_tokens} reused), {usage.tool_calls} tool calls, {usage.wall_time_s:.1f}s[/]"
    )
    made = sum(1 for path in workspace.rglob("*") if path.is_file()) if workspace.is_dir() else 0
    if made:
        out.print(f"[dim]its files ({made}): {workspace}[/]", highlight=False, soft_wrap=True)
    if info.state != State.DONE:
        err.print(f"[red]error:[/] {info.error or info.state.value}")
        raise typer.Exit(1)
    out.print(str(info.result))


def run(
    task: Annotated[str, typer.Argument(help="What the agent should do.")],
    agent: Annotated[str, typer.Option(help=f"One of: {', '.join(AGENTS)}.")] = "coder",
    model: Annotated[str | None, typer.Option(help="Catalog name, .gguf path or openai:NAME.")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many steps.")] = None,
) -> None:
    """Run an agent on a task, streaming its steps; exits non-zero if it fails."""
    config = load_config()
    try:
        spec = agent_spec(agent)
    except KeyError as exc:
        err.print(f"[red]error:[/] {exc.args[0]}")
        raise typer.Exit(2) from None
    spec = spec.model_copy(update={"model": model or spec.model, "max_steps": max_steps or spec.max_steps})

    async def main() -> ProcessInfo:
        async with Kernel(config) as kernel:
            kernel.tools.register(*default_tools())
            await _load_model(kernel, spec.model)
            pid = await kernel.spawn(
                run_agent, name=spec.name, args={"spec": spec.model_dump(), "task": task}
            )
            out.print(
                f"[dim]process {pid} started; if it is interrupted, `llmos resume {pid}` continues it[/]"
            )
            return await _follow(kernel, pid)

    info = _run_async(main)
    _finish(info, config.workspace(info.pid))


def resume(pid: Annotated[int, typer.Argument(help="An interrupted process, from `llmos ps`.")]) -> None:
    """Continue an interrupted process: finished steps are replayed from the journal, not re-run."""
    config = load_config()

    async def main() -> ProcessInfo:
        async with Kernel(config) as kernel:
            kernel.tools.register(*default_tools())
            info = kernel.process(pid)
            await _load_model(kernel, info.args.get("spec", {}).get("model"))
            await kernel.resume(pid)
            out.print(f"[dim]process {pid} resumed[/]")
            return await _follow(kernel, pid)

    _finish(_run_async(main), config.workspace(pid))


def _run_async(main: Callable[[], Coroutine[Any, Any, ProcessInfo]]) -> ProcessInfo:
    try:
        return asyncio.run(main())
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except (KernelError, LLMError) as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from None
