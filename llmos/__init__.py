"""llmos: an operating system whose CPU is a language model."""

from llmos.agents.embed import Agent, AgentRun
from llmos.boot import Kernel
from llmos.config import Config, load_config
from llmos.kernel import Budget, Process, State
from llmos.kernel.devices import Risk
from llmos.tools.registry import Tool, tool

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
