"""The `python` tool: run code in the process's sandbox session (variables live on between calls)."""

from __future__ import annotations

from typing import Any

from llmos.kernel.devices import ExecResult, Risk, ToolContext, ToolResult
from llmos.tools.registry import tool

MAX_OBSERVATION_CHARS = 4000


def observation(result: ExecResult) -> dict[str, Any]:
    """What the model sees of a sandbox run: output, value, error, and whether it was cut or timed out."""
    seen: dict[str, Any] = {}
    for key in ("stdout", "stderr", "value", "error"):
        text = getattr(result, key)
        if text:
            seen[key] = (
                text if len(text) <= MAX_OBSERVATION_CHARS else text[:MAX_OBSERVATION_CHARS] + " [...cut]"
            )
    if result.files:
        seen["files"] = result.files
    if result.timed_out:
        seen["timed_out"] = True
    if result.restarted:
        seen["note"] = "the session was restarted: earlier variables are gone"
    if not result.sandboxed:
        seen["sandboxed"] = False
    if not seen:
        seen["stdout"] = "(no output: print() what you want to see)"
    return seen


@tool(name="python", risk=Risk.EXECUTE, uses=["sandbox"])
async def python(code: str, ctx: ToolContext) -> ToolResult:
    """Run Python code in a sandbox and see its output. Variables persist between calls. print() what
    you want to see; the value of a final bare expression is shown too.

    Args:
        code: the Python code to run.
    """
    reply = await ctx.process.syscall("sandbox.exec", code=code)
    if reply.error is not None:
        return ToolResult.failure(reply.error.message)
    result: ExecResult = reply.value
    # The sandbox's CPU time is charged by sandbox.exec itself, not again for this call.
    return ToolResult(ok=result.ok, content=observation(result), error=result.error)
