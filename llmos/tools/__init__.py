"""Peripherals: tools a process can call through the kernel (`tool.call`)."""

from llmos.tools.registry import (
    FunctionTool,
    Risk,
    Tool,
    ToolContext,
    ToolError,
    ToolRegistry,
    ToolResult,
    UnknownTool,
    tool,
)

__all__ = [
    "FunctionTool",
    "Risk",
    "Tool",
    "ToolContext",
    "ToolError",
    "ToolRegistry",
    "ToolResult",
    "UnknownTool",
    "tool",
]
