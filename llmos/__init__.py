"""llmos: an operating system whose CPU is a language model."""

from llmos.config import Config, load_config
from llmos.kernel import Budget, Kernel, Process, State

__all__ = ["Budget", "Config", "Kernel", "Process", "State", "load_config"]
