"""`llmos sandbox`: check the sandbox backends (and, from the docker backend, build its image)."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.text import Text

from llmos.config import load_config
from llmos.sandbox.doctor import auto_choice, diagnose

app = typer.Typer(help="Sandboxed Python backends", no_args_is_help=True)
_out = Console(soft_wrap=True)  # fix commands stay on one line, copyable


@app.callback()
def _group() -> None:
    """Sandboxed Python backends."""


@app.command()
def doctor() -> None:
    """Say which sandbox backends work here, why the others do not, and what "auto" picks."""
    config = load_config()
    statuses = diagnose(config)
    for status in statuses:
        mark = ("works", "green") if status.works else ("does not work", "red")
        _out.print(Text.assemble(f"{status.name}: ", mark, f" - {status.detail}"))
    choice = auto_choice(statuses)
    configured = config.sandbox.backend
    if choice is None:
        _out.print(
            Text.assemble("auto: ", ("no sandbox available", "red"), "; fix docker or namespace above")
        )
    else:
        _out.print(Text(f"auto: would use {choice} (configured: {configured})"))
    chosen = choice if configured == "auto" else configured
    if not any(s.works for s in statuses if s.name == chosen):
        raise typer.Exit(1)


@app.command("build-image")
def build_image_command(
    no_pull: bool = typer.Option(False, "--no-pull", help="Build offline without trying the registry first."),
) -> None:
    """Make the docker sandbox image: pull python:3.11-slim if a registry answers, else build it offline."""
    from llmos.sandbox.dockerd import DockerdError
    from llmos.sandbox.image import ImageBuildError, build_image

    try:
        image = build_image(load_config(), progress=True, pull=not no_pull)
    except (ImageBuildError, DockerdError) as exc:
        Console(stderr=True, soft_wrap=True).print(Text.assemble(("error:", "red"), " ", str(exc)))
        raise typer.Exit(1) from None
    _out.print(Text(image))
