"""Long-term memory tools for agents: `remember` a fact, `recall` what is stored, with its source.

Both act through the process's memory syscalls (`mem.add`, `mem.search`): checked against the
`memory` capability, journaled, and marked by the kernel with who wrote a record and whether that
process had read untrusted data.
"""

from __future__ import annotations

from typing import Any

from llmos.kernel.devices import SHARED, MemoryHit, Risk, ToolContext, ToolResult, namespace_for_agent
from llmos.tools.registry import Tool, ToolError, tool


@tool(risk=Risk.WRITE, uses=["memory"])
async def remember(text: str, ctx: ToolContext) -> dict[str, Any]:
    """Store a fact in long-term memory, to recall it later (also in later runs).

    Args:
        text: the fact, self-contained (say who or what it is about).
    """
    record = {
        "text": text,
        "namespace": namespace_for_agent(ctx.process.name),
        "source": f"process {ctx.pid}",
        "trust": "model",
    }
    reply = await ctx.process.syscall("mem.add", records=[record])
    if reply.error is not None:
        raise ToolError(reply.error.message)
    return {"stored": reply.value[0]}


@tool(uses=["memory"])
async def recall(query: str, ctx: ToolContext, k: int = 3) -> ToolResult:
    """Search long-term memory (your own and the shared one) for what matches the query in meaning.

    Args:
        query: what to look for, in words.
        k: how many records to return.
    """
    namespaces = [namespace_for_agent(ctx.process.name), SHARED]
    reply = await ctx.process.syscall("mem.search", query=query, namespaces=namespaces, k=max(1, min(k, 10)))
    if reply.error is not None:
        raise ToolError(reply.error.message)
    hits: list[MemoryHit] = reply.value
    found = [{"text": h.text, "source": h.provenance.source, "score": round(h.score, 3)} for h in hits]
    # What came from tools, the web or a tainted process is data to read, not instructions to follow.
    return ToolResult(ok=True, content=found or "nothing found", untrusted=reply.untrusted)


def memory_tools() -> list[Tool]:
    return [remember, recall]
