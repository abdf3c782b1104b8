"""The researcher: ingests a folder of text files into long-term memory, then answers a question
from them, naming its source.

Run: .venv/bin/python examples/researcher.py [FOLDER] ["question"]
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from rich.console import Console

from llmos import Agent, Kernel, load_config
from llmos.agents.render import EventPrinter
from llmos.memory.store import SHARED, NewRecord
from llmos.tools.memory import memory_tools

FOLDER = Path(__file__).with_name("docs")
QUESTION = "In which year was the Skerry Point lighthouse built?"


async def ingest(kernel: Kernel, folder: Path) -> int:
    """One record per paragraph line, with the file name as its source."""
    store = await kernel.memory()
    records = [
        NewRecord(text=line, namespace=SHARED, source=path.name, trust="user", id=f"{path.name}:{number}")
        for path in sorted(folder.glob("*.txt"))
        for number, line in enumerate(path.read_text().splitlines())
        if line.strip()
    ]
    await asyncio.to_thread(store.add_many, records)
    return len(records)


async def main(folder: Path, question: str) -> int:
    console = Console(highlight=False)
    async with Kernel(load_config()) as kernel:
        with console.status("loading the embedding model and ingesting..."):
            count = await ingest(kernel, folder)
        console.print(f"[dim]{count} passages from {folder} in memory[/]\n[bold]question:[/] {question}")
        result = await Agent("researcher", tools=memory_tools()).arun(
            question, kernel=kernel, on_event=EventPrinter(console, stream_text=False)
        )
    if not result.ok:
        console.print(f"failed: {result.error}", style="red", markup=False)
        return 1
    console.print(result.answer, style="bold green", markup=False)
    return 0


if __name__ == "__main__":
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else FOLDER
    sys.exit(asyncio.run(main(folder, " ".join(sys.argv[2:]) or QUESTION)))
