"""Sandboxed Python: docker, namespace (bubblewrap) and subprocess backends behind one protocol."""

from llmos.tools.sandbox.base import (
    ExecResult,
    Limits,
    Sandbox,
    SandboxError,
    SandboxUnavailable,
    open_sandbox,
)

__all__ = ["ExecResult", "Limits", "Sandbox", "SandboxError", "SandboxUnavailable", "open_sandbox"]
