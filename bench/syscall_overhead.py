"""Median cost of a no-op syscall through the kernel (capability check, budget, journal) beside a
direct Python call of the same no-op. Run: .venv/bin/python bench/syscall_overhead.py"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmos import Kernel
from llmos.config import load_config
from llmos.kernel import Budget, Process

CALLS = 5000


async def noop() -> None:
    return None


def percentile(samples: list[float], q: float) -> float:
    return sorted(samples)[int(q * (len(samples) - 1))]


async def measure(home: Path, synchronous: str) -> tuple[list[float], list[float], list[float]]:
    direct: list[float] = []
    through_kernel: list[float] = []
    two_commits: list[float] = []  # a syscall that may wait (sleep 0): call and result committed apart

    async def program(proc: Process) -> None:
        for _ in range(CALLS):  # interleaved, so both see the same machine noise
            start = time.perf_counter_ns()
            await noop()
            direct.append((time.perf_counter_ns() - start) / 1000)
            start = time.perf_counter_ns()
            await proc.syscall("noop")
            through_kernel.append((time.perf_counter_ns() - start) / 1000)
            start = time.perf_counter_ns()
            await proc.syscall("sleep", seconds=0)
            two_commits.append((time.perf_counter_ns() - start) / 1000)

    config = load_config(env={"LLMOS_HOME": str(home), "LLMOS_JOURNAL__SYNCHRONOUS": synchronous})
    async with Kernel(config) as kernel:
        # Capabilities and a budget to check, as a real process has.
        await kernel.run(
            program, capabilities=["llm", "tool:*"], budget=Budget(tokens=10**9, tool_calls=10**6)
        )
    return direct, through_kernel, two_commits


def main() -> None:
    figures: dict[str, float | str] = {
        "calls": CALLS,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
    }
    for synchronous in ("normal", "full"):
        with tempfile.TemporaryDirectory() as home:
            direct, kernel, waiting = asyncio.run(measure(Path(home), synchronous))
        median_direct, median_kernel = statistics.median(direct), statistics.median(kernel)
        median_waiting = statistics.median(waiting)
        print(
            f"journal synchronous={synchronous:6}  direct call median {median_direct:6.2f} us   "
            f"syscall median {median_kernel:7.2f} us  p95 {percentile(kernel, 0.95):7.2f} us   "
            f"overhead ratio {median_kernel / median_direct:6.1f}x   "
            f"sleep(0) syscall (two commits) median {median_waiting:7.2f} us"
        )
        figures[f"{synchronous}_sleep0_syscall_median_us"] = round(median_waiting, 2)
        figures[f"{synchronous}_direct_median_us"] = round(median_direct, 2)
        figures[f"{synchronous}_syscall_median_us"] = round(median_kernel, 2)
        figures[f"{synchronous}_syscall_p95_us"] = round(percentile(kernel, 0.95), 2)
        figures[f"{synchronous}_ratio"] = round(median_kernel / median_direct, 1)
    target = float(figures["normal_syscall_median_us"])
    print(f"target: under 100 us median with the journal on (default synchronous=normal): {target} us")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
