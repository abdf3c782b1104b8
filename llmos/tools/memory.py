"""Long-term memory tools for agents: `remember` a fact, `recall` what is stored, with its source."""

from __future__ import annotations

import asyncio
from typing import Any

from llmos.tools.registry import Risk, Tool, ToolContext, ToolError, ToolResult, tool


def _agent_namespace(ctx: ToolContext) -> str:
    if ctx.process is None:
        raise ToolError("memory tools run only inside a kernel process")
    # Imported here: memory loads chromadb, which `import llmos` should not wait for.
    from llmos.memory.store import namespace_for_agent

    return namespace_for_agent(ctx.process.info.name)


@tool(risk=Risk.WRITE)
async def remember(text: str, ctx: ToolContext) -> dict[str, Any]:
    """Store a fact in long-term memory, to recall it later (also in later runs).

    Args:
        text: the fact, self-contained (say who or what it is about).
    """
    namespace = _agent_namespace(ctx)
    store = await ctx.process.kernel.memory()
    source = f"process {ctx.pid}"
    record_id = await asyncio.to_thread(
        store.add, text, namespace=namespace, source=source, trust="model", pid=ctx.pid
    )
    return {"stored": record_id}


@tool
async def recall(query: str, ctx: ToolContext, k: int = 3) -> ToolResult:
    """Search long-term memory (your own and the shared one) for what matches the query in meaning.

    Args:
        query: what to look for, in words.
        k: how many records to return.
    """
    from llmos.memory.store import SHARED

    namespaces = [_agent_namespace(ctx), SHARED]
    store = await ctx.process.kernel.memory()
    hits = await asyncio.to_thread(store.search, query, namespaces=namespaces, k=max(1, min(k, 10)))
    found = [{"text": h.text, "source": h.provenance.source, "score": round(h.score, 3)} for h in hits]
    # What came from tools or the web is data to read, not instructions to follow.
    untrusted = any(h.provenance.trust in ("tool", "web") for h in hits)
    return ToolResult(ok=True, content=found or "nothing found", untrusted=untrusted)


def memory_tools() -> list[Tool]:
    return [remember, recall]
