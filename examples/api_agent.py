"""The API agent: answers questions by calling an OpenAPI service, here a small inventory API that
this example starts on 127.0.0.1. The API key is a secret the kernel injects into each request:
the model never sees it.

Run: .venv/bin/python examples/api_agent.py "How many gizmos are in stock?"
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from fastapi import FastAPI, Header, HTTPException
from pydantic import BaseModel
from rich.console import Console

from llmos import Agent, Kernel, load_config
from llmos.agents.render import EventPrinter
from llmos.tools.http import openapi_tools

API_KEY = "inventory-secret-123"
TASK = "How many of the item named gizmo are in stock?"


class Item(BaseModel):
    name: str
    price_eur: float
    in_stock: int


ITEMS = {
    "widget": Item(name="widget", price_eur=2.5, in_stock=140),
    "gizmo": Item(name="gizmo", price_eur=12.0, in_stock=37),
    "sprocket": Item(name="sprocket", price_eur=0.8, in_stock=0),
}

app = FastAPI(title="Inventory", version="1.0")


@app.get("/items", operation_id="list_items", summary="The names of all items.")
def list_items(x_api_key: str = Header()) -> list[str]:
    check(x_api_key)
    return sorted(ITEMS)


@app.get("/items/{name}", operation_id="get_item", summary="Price and stock of one item, by name.")
def get_item(name: str, x_api_key: str = Header()) -> Item:
    check(x_api_key)
    if name.lower() not in ITEMS:
        raise HTTPException(404, f"no item {name!r}; call list_items")
    return ITEMS[name.lower()]


def check(key: str) -> None:
    if key != API_KEY:
        raise HTTPException(401, "bad API key")


@contextmanager
def serve() -> Iterator[str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join()


async def ask(task: str, base_url: str, console: Console) -> int:
    # The spec's header parameter x-api-key is filled from the kernel's secrets, not by the model.
    tools = openapi_tools(
        f"{base_url}/openapi.json", allowed_hosts=["127.0.0.1"], base_url=base_url,
        secrets={"INVENTORY_KEY": "header:x-api-key"},
    )  # fmt: skip
    agent = Agent(
        "inventory",
        "Answer questions about the inventory with the API tools, then call final_answer briefly.",
        tools=tools,
        max_steps=5,
    )
    async with Kernel(load_config(), secrets={"INVENTORY_KEY": API_KEY}) as kernel:
        result = await agent.arun(task, kernel=kernel, on_event=EventPrinter(console, stream_text=False))
    if not result.ok:
        console.print(f"failed: {result.error}", style="red", markup=False)
        return 1
    console.print(result.answer, style="bold green", markup=False)
    return 0


def main(task: str) -> int:
    import asyncio

    console = Console(highlight=False)
    with serve() as base_url:
        console.print(f"[dim]inventory API at {base_url}[/]\n[bold]task:[/] {task}")
        return asyncio.run(ask(task, base_url, console))


if __name__ == "__main__":
    sys.exit(main(" ".join(sys.argv[1:]) or TASK))
