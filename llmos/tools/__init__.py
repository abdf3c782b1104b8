"""Peripherals: tools a process can call through the kernel (`tool.call`)."""

from llmos.kernel.devices import Risk, ToolContext, ToolResult, UnknownTool
from llmos.tools.files import file_tools
from llmos.tools.memory import memory_tools
from llmos.tools.python import python
from llmos.tools.registry import FunctionTool, Tool, ToolError, ToolRegistry, tool


def builtin_tools() -> list[Tool]:
    """The tools every booted kernel offers: python, the workspace file tools, remember and recall."""
    return [python, *file_tools(), *memory_tools()]


__all__ = [
    "FunctionTool",
    "Risk",
    "Tool",
    "ToolContext",
    "ToolError",
    "ToolRegistry",
    "ToolResult",
    "UnknownTool",
    "builtin_tools",
    "tool",
]
