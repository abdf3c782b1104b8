"""Workspaces: each process's folder, `$LLMOS_HOME/workspaces/<pid>`, shared by its file tools and
its sandbox session, and kept after it ends; and how much disk one uses.

No backend here has per-directory quotas, so a workspace's size is measured: the blocks its files
take plus ENTRY_BYTES per entry, so a flood of empty files counts too.
"""

from __future__ import annotations

import os
from pathlib import Path

ENTRY_BYTES = 512


def disk_use(path: Path, stop_above: int | None = None) -> int:
    """Bytes allocated below `path` plus ENTRY_BYTES per entry; counting stops past `stop_above`."""
    size = count_disk_use(path, stop_above, max_entries=None)
    assert size is not None  # only a limit on entries gives up
    return size


def count_disk_use(path: Path, stop_above: int | None, max_entries: int | None) -> int | None:
    """`disk_use`, or None once more than `max_entries` entries were seen."""
    total = entries_seen = 0
    pending = [str(path)]
    while pending:
        try:
            entries = os.scandir(pending.pop())
        except OSError:
            continue
        with entries:
            for entry in entries:
                entries_seen += 1
                if max_entries is not None and entries_seen > max_entries:
                    return None
                try:
                    stat = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                total += stat.st_blocks * 512 + ENTRY_BYTES
                if stop_above is not None and total > stop_above:
                    return total
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
    return total
