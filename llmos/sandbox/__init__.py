"""The sandbox device: docker, namespace (bubblewrap) and subprocess backends behind the kernel's
`Sandbox` protocol (llmos.kernel.devices)."""

from llmos.sandbox.base import Limits, SandboxError, SandboxUnavailable, open_sandbox

__all__ = ["Limits", "SandboxError", "SandboxUnavailable", "open_sandbox"]
