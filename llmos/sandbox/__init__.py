"""The sandbox device: docker, namespace (bubblewrap) and subprocess backends behind the kernel's
`Sandbox` protocol (llmos.kernel.devices), and the choice between them.

The parts, bottom up: base.py (errors, session names, the worker's command line), quota.py (the
workspace disk cap), session.py (the host side of one worker), pool.py (workers started ahead),
frame.py (sessions by name, the frame the backends fill in), then the backends docker.py,
namespace.py and subprocess.py. The backends are imported here only when chosen.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmos.sandbox.base import Limits, SandboxError, SandboxUnavailable

if TYPE_CHECKING:
    from llmos.config import Config
    from llmos.sandbox.frame import WorkerSandbox

__all__ = ["Limits", "SandboxError", "SandboxUnavailable", "docker_reason", "open_sandbox"]


def open_sandbox(config: Config) -> WorkerSandbox[Any]:
    """The configured backend; "auto" is docker, else namespace, else a SandboxUnavailable saying why."""
    backend = config.sandbox.backend
    if backend == "subprocess":
        from llmos.sandbox.subprocess import SubprocessSandbox

        return SubprocessSandbox(config)
    if backend == "namespace":
        from llmos.sandbox.namespace import NamespaceSandbox, namespace_available

        reason = namespace_available(config)
        if reason is not None:
            raise SandboxUnavailable(f"The namespace sandbox cannot run: {reason}.")
        return NamespaceSandbox(config)
    docker_why_not = docker_reason(config)
    if backend == "docker":
        if docker_why_not is not None:
            raise SandboxUnavailable(f"The docker sandbox cannot run: {docker_why_not}.")
        return _docker_sandbox(config)
    # auto
    if docker_why_not is None:
        return _docker_sandbox(config)
    from llmos.sandbox.namespace import NamespaceSandbox, namespace_available

    namespace_why_not = namespace_available(config)
    if namespace_why_not is None:
        return NamespaceSandbox(config)
    raise SandboxUnavailable(
        f"No sandbox can run here: docker: {docker_why_not}; namespace: {namespace_why_not}. "
        'Fix one of them (see `llmos sandbox doctor`), or set sandbox.backend = "subprocess" '
        "to run code unsandboxed on purpose."
    )


def docker_reason(config: Config) -> str | None:
    """None when the docker backend can run here; otherwise why not, as a clause with the fix."""
    try:
        from llmos.sandbox.docker import docker_available
    except ImportError as exc:
        return f"the docker backend is not installed ({exc}); `pip install llmos[docker]`"
    reason: str | None = docker_available(config)
    return reason


def _docker_sandbox(config: Config) -> WorkerSandbox[Any]:
    from llmos.sandbox.docker import DockerSandbox

    return DockerSandbox(config)
