"""`llmos shell`."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text

from llmos.agents.catalog import AGENTS, agent_spec
from llmos.boot import Kernel
from llmos.config import ConfigError, load_config
from llmos.kernel.devices import LLMError
from llmos.shell.repl import Shell


def shell(
    agent: Annotated[str, typer.Option(help=f"One of: {', '.join(AGENTS)}.")] = "coder",
    model: Annotated[str | None, typer.Option(help="Catalog name, .gguf path or openai:NAME.")] = None,
) -> None:
    """An interactive shell: chat with an agent; /ps, /top, /kill, /log, /approve and more."""
    console = Console(highlight=False)
    err = Console(stderr=True, soft_wrap=True)  # an error sentence is never broken into lines
    try:
        config = load_config()
        spec = agent_spec(agent).model_copy(update={"model": model})
    except (ConfigError, KeyError) as exc:
        err.print(Text.assemble(("error:", "red"), " ", str(exc.args[0])))
        raise typer.Exit(2) from None

    async def main() -> None:
        async with Kernel(config) as kernel:
            with console.status(Text(f"loading model {spec.model or config.llm.model}...")):
                await kernel.llm(spec.model)
            await Shell(kernel, console, spec).run()

    try:
        asyncio.run(main())
    except LLMError as exc:
        err.print(Text.assemble(("error:", "red"), " ", str(exc)))
        raise typer.Exit(1) from None
