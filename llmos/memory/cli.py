"""`llmos memory`: search, count and export long-term memory."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from llmos.config import ConfigError, load_config
from llmos.memory.store import MemoryStore, MemoryStoreError
from llmos.models import ModelError

app = typer.Typer(help="Search and export long-term memory", no_args_is_help=True)
_out = Console()
_err = Console(stderr=True, soft_wrap=True)  # an error sentence is never broken into lines


def _fail(message: str) -> typer.Exit:
    _err.print(Text.assemble(("error:", "red"), " ", message))
    return typer.Exit(1)


@contextmanager
def _store() -> Iterator[MemoryStore | None]:
    """The store, or None when no memory was ever written here: looking creates nothing."""
    try:
        config = load_config()
        embedded_never_used = not config.memory.chroma_url and not (config.home / "memory").exists()
        store = None if embedded_never_used else MemoryStore.open(config)
    except (MemoryStoreError, ConfigError, ModelError) as exc:
        raise _fail(str(exc)) from None
    try:
        yield store
    finally:
        if store is not None:
            store.close()


@app.command()
def search(
    query: Annotated[str, typer.Argument(help="what to look for, in plain words")],
    namespace: Annotated[
        list[str] | None,
        typer.Option("--namespace", "-n", help="namespace to search (repeatable); default all"),
    ] = None,
    k: Annotated[int, typer.Option("-k", min=1, max=100, help="how many results")] = 5,
) -> None:
    """Records nearest in meaning to QUERY, best first."""
    with _store() as store:
        hits = [] if store is None else store.search(query, namespaces=namespace or store.namespaces(), k=k)
    if not hits:
        _out.print("no matching memories")
        return
    table = Table()
    for column in ("score", "namespace", "trust", "source", "pid", "id", "text"):
        table.add_column(column, overflow="fold")
    for hit in hits:
        p = hit.provenance
        text = hit.text if len(hit.text) <= 200 else hit.text[:200] + "..."
        cells = (hit.namespace, p.trust, p.source, str(p.pid or ""), hit.id, text)
        table.add_row(f"{hit.score:.3f}", *(Text(cell) for cell in cells))
    _out.print(table)


@app.command()
def stats() -> None:
    """How many records, per namespace, and where they live."""
    with _store() as store:
        s = None if store is None else store.stats()
    if s is None:
        _out.print("records: 0 (no memory has been written here yet)")
        return
    _out.print(Text(f"backend: {s.backend} ({s.location})"))
    _out.print(Text(f"embedding model: {s.embedding_model}"))
    _out.print(f"records: {s.records}")
    table = Table()
    table.add_column("namespace")
    table.add_column("records", justify="right")
    for name, n in s.namespaces.items():
        table.add_row(Text(name), str(n))
    _out.print(table)


@app.command()
def export(
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="write JSONL here instead of stdout")
    ] = None,
    namespace: Annotated[str | None, typer.Option("--namespace", "-n", help="only this namespace")] = None,
) -> None:
    """Every record as JSON lines (id, text, namespace, provenance, metadata)."""
    if out is not None and not out.parent.is_dir():
        raise _fail(f"Cannot write {out}: the folder {out.parent} does not exist; create it first.")
    if out is not None and out.is_dir():
        raise _fail(f"Cannot write {out}: it is a folder; give a file name, e.g. {out / 'memory.jsonl'}.")
    with _store() as store:
        try:
            sink = out.open("w", encoding="utf-8") if out else sys.stdout
        except OSError as exc:
            raise _fail(f"Cannot write {out}: {exc.strerror}.") from None
        try:
            n = 0
            for record in [] if store is None else store.export(namespace):
                sink.write(record.model_dump_json() + "\n")
                n += 1
        finally:
            if out:
                sink.close()
    if out:
        _err.print(Text(f"exported {n} records to {out}"))
