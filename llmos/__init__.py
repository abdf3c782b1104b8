"""llmos: an operating system whose CPU is a language model."""

from llmos.agents.embed import Agent, AgentRun
from llmos.config import Config, load_config
from llmos.kernel import Budget, Kernel, Process, State
from llmos.tools.registry import Risk, Tool, tool

__all__ = [
    "Agent",
    "AgentRun",
    "Budget",
    "Config",
    "Kernel",
    "Process",
    "Risk",
    "State",
    "Tool",
    "load_config",
    "tool",
]
