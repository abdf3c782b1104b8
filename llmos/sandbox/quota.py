"""The workspace disk cap (sandbox.limits.workspace_mb), enforced from outside the sandbox.

No backend here has per-directory quotas, so a session's workspace is measured (llmos.kernel.workspace
counts blocks plus a charge per entry): before a call, every QUOTA_POLL_S while it runs (a call that
grows it past the cap is stopped), and after it. Writes between two checks can overshoot the cap;
a workspace over the cap may shrink but not grow.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from llmos.kernel.workspace import count_disk_use, disk_use
from llmos.sandbox.base import Limits

# Page-cache writes reach ~3 GB/s here, so every 10 ms while a measurement is cheap; a workspace
# of many files is measured less often.
QUOTA_POLL_S = 0.01
QUOTA_POLL_SHARE = 0.05  # at most this share of one core spent measuring
MB = 1024 * 1024


async def workspace_use(path: Path, stop_above: int | None = None) -> int:
    # A few hundred entries are measured in well under a millisecond, here; more on a thread, so
    # the event loop never waits for a workspace of many files.
    size = count_disk_use(path, stop_above, max_entries=256)
    return size if size is not None else await asyncio.to_thread(disk_use, path, stop_above)


async def allowance(path: Path, limits: Limits) -> int:
    """The bytes a call may leave in the workspace: the cap, or what is there if it is over already."""
    return max(limits.workspace_mb * MB, await workspace_use(path))


async def wait_until_outgrown(path: Path, allowance: int) -> None:
    """Return once the workspace at `path` uses more than `allowance` bytes."""
    took = 0.0
    while True:
        await asyncio.sleep(max(QUOTA_POLL_S, took / QUOTA_POLL_SHARE))
        started = time.perf_counter()
        if await workspace_use(path, stop_above=allowance) > allowance:
            return
        took = time.perf_counter() - started


def over_quota_error(size: int, limits: Limits) -> str:
    return (
        f"The workspace grew to {size / MB:.0f} MB, past its limit of {limits.workspace_mb} MB "
        "(sandbox.limits.workspace_mb); delete files that are not needed: while it is over the "
        "limit, code may remove files but not add any."
    )
