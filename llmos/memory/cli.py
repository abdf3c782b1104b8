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

from llmos.config import ConfigError, load_config
from llmos.cpu.models import ModelError
from llmos.memory.store import MemoryStore, MemoryStoreError

app = typer.Typer(help="Search and export long-term memory", no_args_is_help=True)
_out = Console()
_err = Console(stderr=True)


@contextmanager
def _store() -> Iterator[MemoryStore]:
    try:
        store = MemoryStore.open(load_config())
    except (MemoryStoreError, ConfigError, ModelError) as exc:
        _err.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(1) from None
    try:
        yield store
    finally:
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
        namespaces = namespace or store.namespaces()
        hits = store.search(query, namespaces=namespaces, k=k)
    if not hits:
        _out.print("no matching memories")
        return
    table = Table()
    for column in ("score", "namespace", "trust", "source", "pid", "id", "text"):
        table.add_column(column, overflow="fold")
    for hit in hits:
        p = hit.provenance
        text = hit.text if len(hit.text) <= 200 else hit.text[:200] + "..."
        table.add_row(
            f"{hit.score:.3f}", hit.namespace, p.trust, p.source, str(p.pid or ""), hit.id, text
        )  # fmt: skip
    _out.print(table)


@app.command()
def stats() -> None:
    """How many records, per namespace, and where they live."""
    with _store() as store:
        s = store.stats()
    _out.print(f"backend: {s.backend} ({s.location})", highlight=False)
    _out.print(f"embedding model: {s.embedding_model}")
    _out.print(f"records: {s.records}")
    if s.pending_intents:
        _out.print(f"pending page-outs: {s.pending_intents}")
    table = Table()
    table.add_column("namespace")
    table.add_column("records", justify="right")
    for name, n in s.namespaces.items():
        table.add_row(name, str(n))
    _out.print(table)


@app.command()
def export(
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="write JSONL here instead of stdout")
    ] = None,
    namespace: Annotated[str | None, typer.Option("--namespace", "-n", help="only this namespace")] = None,
) -> None:
    """Every record as JSON lines (id, text, namespace, provenance, metadata)."""
    with _store() as store:
        sink = out.open("w", encoding="utf-8") if out else sys.stdout
        try:
            n = 0
            for record in store.export(namespace):
                sink.write(record.model_dump_json() + "\n")
                n += 1
        finally:
            if out:
                sink.close()
    if out:
        _err.print(f"exported {n} records to {out}", highlight=False)
