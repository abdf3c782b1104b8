"""`llmos memory search | stats | export` on a real store."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from llmos.config import Config
from llmos.memory.cli import app
from llmos.memory.embeddings import OnnxEmbeddingFunction
from llmos.memory.store import MemoryStore

runner = CliRunner()


def _fill(config: Config, embedder: OnnxEmbeddingFunction) -> None:
    with MemoryStore.open(config, embedder=embedder) as store:
        store.add(
            "The backup tapes are stored offsite in Leeds.",
            namespace="agent:ops",
            source="chat",
            trust="user",
            pid=4,
        )
        store.add("Lunch is served at noon.", namespace="shared", source="chat", trust="user", pid=None)


def test_search_stats_and_export(config: Config, embedder: OnnxEmbeddingFunction, tmp_path: Path) -> None:
    _fill(config, embedder)
    found = runner.invoke(app, ["search", "where are the archive cassettes kept", "-k", "1"])
    assert found.exit_code == 0, found.output
    assert "Leeds" in found.output and "agent:ops" in found.output and "Lunch" not in found.output
    scoped = runner.invoke(app, ["search", "backup tapes", "--namespace", "shared", "-k", "1"])
    assert scoped.exit_code == 0 and "Leeds" not in scoped.output and "Lunch" in scoped.output

    stats = runner.invoke(app, ["stats"])
    assert stats.exit_code == 0 and "records: 2" in stats.output and "agent:ops" in stats.output

    out = tmp_path / "memory.jsonl"
    exported = runner.invoke(app, ["export", "--out", str(out)])
    assert exported.exit_code == 0, exported.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["namespace"] for r in rows) == ["agent:ops", "shared"]
    assert {r["provenance"]["pid"] for r in rows} == {4, None}
    to_stdout = runner.invoke(app, ["export", "--namespace", "shared"])
    assert [json.loads(line)["text"] for line in to_stdout.stdout.splitlines()] == [
        "Lunch is served at noon."
    ]


def test_cli_while_another_owner_holds_the_store(config: Config, embedder: OnnxEmbeddingFunction) -> None:
    with MemoryStore.open(config, embedder=embedder):
        busy = runner.invoke(app, ["stats"])
    assert busy.exit_code == 1
    assert "in use by process" in busy.output and "memory.chroma_url" in busy.output


def test_empty_store_and_bad_k(config: Config) -> None:
    empty = runner.invoke(app, ["search", "anything"])
    assert empty.exit_code == 0 and "no matching memories" in empty.output
    assert runner.invoke(app, ["search", "x", "-k", "0"]).exit_code == 2


def test_search_prints_records_verbatim(config: Config, embedder: OnnxEmbeddingFunction) -> None:
    tricky = ["def f(x: list[str]) -> dict[str, int]", "see [link] and [red]", "a[/b]"]
    with MemoryStore.open(config, embedder=embedder) as store:
        for text in tricky:
            store.add(text, namespace="shared", source="[chat]", trust="user", pid=None)
    found = runner.invoke(app, ["search", "code and links", "-k", "3"], env={"COLUMNS": "300"})
    assert found.exit_code == 0, found.output
    rows = found.output.splitlines()
    for text in tricky:
        assert any(f"│ {text} " in row and "│ [chat] " in row for row in rows), found.output
