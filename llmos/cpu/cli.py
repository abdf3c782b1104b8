"""`llmos models`: list, pull, inspect and remove the models in the cache."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from llmos.config import load_config
from llmos.models import ModelError, ModelManager

app = typer.Typer(help="Manage models", no_args_is_help=True)
_out = Console()
_err = Console(stderr=True, soft_wrap=True)  # an error sentence is never broken into lines


def _manager() -> ModelManager:
    return ModelManager(load_config().models_dir)


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def _fail(exc: ModelError) -> typer.Exit:
    _err.print(Text.assemble(("error:", "red"), " ", str(exc)))
    return typer.Exit(1)


@app.command("list")
def list_models() -> None:
    """Show the catalog and what is in the cache."""
    manager = _manager()
    table = Table(title=Text(f"Models ({manager.cache_dir})"))
    for column in ("name", "kind", "size", "cached", "licence"):
        table.add_column(column)
    for status in manager.list():
        entry = status.entry
        cached = Text("yes", style="green") if status.cached else Text("no")
        table.add_row(
            Text(entry.name), entry.kind, _human(entry.size), cached, Text(entry.licence.split(" ")[0])
        )
    _out.print(table)


@app.command()
def pull(names: Annotated[list[str], typer.Argument(help="catalog model names")]) -> None:
    """Fetch models into the cache (verifies a cached copy instead of downloading it again)."""
    manager = _manager()
    for name in names:
        try:
            path = manager.pull(name, progress=True)
        except ModelError as exc:
            raise _fail(exc) from None
        _out.print(Text(f"{name}: {path}"))


@app.command()
def info(name: str) -> None:
    """Show a model's details, sources and where it is cached."""
    try:
        status = _manager().info(name)
    except ModelError as exc:
        raise _fail(exc) from None
    entry = status.entry
    table = Table(show_header=False, box=None)
    rows = [
        ("name", entry.name),
        ("kind", entry.kind),
        ("description", entry.description),
        ("licence", entry.licence),
        ("upstream", f"https://huggingface.co/{entry.upstream}" if entry.upstream else "-"),
        ("chat format", entry.chat_format or "-"),
        ("context length", str(entry.context_length or "-")),
        ("size", _human(entry.size)),
        ("cached", f"yes: {status.path}" if status.cached else "no"),
    ]
    for file in entry.files:
        sources = [" + ".join(f"pypi:{p.requirement}[{p.member}]" for p in file.pypi)]
        if file.hf is not None:
            sources.insert(0, f"hf:{file.hf.repo_id}/{file.hf.filename}")
        rows.append((file.filename, f"{file.size:,} bytes, sha256 {file.sha256}\n" + "\n".join(sources)))
    for key, value in rows:
        table.add_row(Text(key, style="bold"), Text(value))
    _out.print(table, highlight=False)


@app.command()
def rm(name: str) -> None:
    """Delete a model from the cache."""
    try:
        removed = _manager().rm(name)
    except ModelError as exc:
        raise _fail(exc) from None
    _out.print(Text(f"{name}: removed" if removed else f"{name}: was not cached"))
