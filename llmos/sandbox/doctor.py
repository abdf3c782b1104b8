"""`llmos sandbox doctor`: which sandbox backends work on this machine, and why the others do not."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from llmos.config import Config
from llmos.sandbox import SandboxUnavailable, docker_reason
from llmos.sandbox.frame import WorkerSandbox


class BackendStatus(BaseModel):
    name: str
    works: bool
    sandboxed: bool
    detail: str  # what was checked, or why it does not work and the fix


def _round_trip(sandbox: WorkerSandbox[Any]) -> str | None:
    """Run `6*7` through the backend for real; None on success, else what went wrong."""

    async def run() -> str | None:
        try:
            result = await sandbox.exec("doctor", "6 * 7")
        except SandboxUnavailable as exc:
            return str(exc)
        finally:
            await sandbox.aclose()
        return None if result.value == "42" else f"unexpected result {result.model_dump()}"

    return asyncio.run(run())


def _namespace(config: Config, home: Path) -> BackendStatus:
    from llmos.sandbox.namespace import Cgroup, NamespaceSandbox, namespace_available

    reason = namespace_available(config)
    if reason is None:
        reason = _round_trip(NamespaceSandbox(config.model_copy(update={"home": home})))
    if reason is not None:
        return BackendStatus(name="namespace", works=False, sandboxed=True, detail=reason)
    cgroups = Cgroup.available()
    limits = "cgroup memory+pids limits" if cgroups is None else f"rlimits only ({cgroups})"
    return BackendStatus(
        name="namespace",
        works=True,
        sandboxed=True,
        detail=f"bubblewrap + seccomp, uid {config.sandbox.uid}, {limits}",
    )


def _docker(config: Config) -> BackendStatus:
    reason = docker_reason(config)
    if reason is not None:
        return BackendStatus(name="docker", works=False, sandboxed=True, detail=reason)
    return BackendStatus(
        name="docker", works=True, sandboxed=True, detail=f"engine answers, image {config.sandbox.image}"
    )


def _subprocess(config: Config, home: Path) -> BackendStatus:
    from llmos.sandbox.subprocess import SubprocessSandbox

    reason = _round_trip(SubprocessSandbox(config.model_copy(update={"home": home})))
    return BackendStatus(
        name="subprocess",
        works=reason is None,
        sandboxed=False,
        detail=reason or "runs, but is NOT a sandbox (rlimits only): use it only on purpose",
    )


def diagnose(config: Config) -> list[BackendStatus]:
    """Check every backend for real (a round trip through the worker where it can run)."""
    home = Path(tempfile.mkdtemp(prefix="llmos-doctor-"))
    try:
        return [_docker(config), _namespace(config, home), _subprocess(config, home)]
    finally:
        shutil.rmtree(home, ignore_errors=True)


def auto_choice(statuses: list[BackendStatus]) -> str | None:
    """The backend `sandbox.backend = "auto"` would pick (never subprocess)."""
    for status in statuses:
        if status.works and status.sandboxed:
            return status.name
    return None
