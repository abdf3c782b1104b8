"""Median cost of a no-op syscall through the kernel (capability check, budget, journal) beside a
direct Python call of the same no-op. Run: .venv/bin/python bench/syscall_overhead.py

With `--baseline REV` it also measures the kernel of another commit (its `llmos/` taken with
`git archive`, run by this same script in a subprocess), alternating the two, and prints the ratio
of their median syscall costs: a before/after figure measured in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The tree whose llmos is measured: this checkout, or (in the baseline's subprocess) another commit's.
sys.path.insert(0, os.environ.get("LLMOS_BENCH_TREE", str(Path(__file__).resolve().parents[1])))

from llmos import Kernel
from llmos.config import load_config
from llmos.kernel import Budget, Process

ROOT = Path(__file__).resolve().parents[1]
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


def once(synchronous: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as home:
        direct, kernel, waiting = asyncio.run(measure(Path(home), synchronous))
    return {
        "direct_median_us": round(statistics.median(direct), 2),
        "syscall_median_us": round(statistics.median(kernel), 2),
        "syscall_p95_us": round(percentile(kernel, 0.95), 2),
        "sleep0_syscall_median_us": round(statistics.median(waiting), 2),
    }


def baseline_once(tree: Path) -> dict[str, float]:
    """One measurement of the kernel in `tree` (journal synchronous=normal), in a subprocess."""
    env = {**os.environ, "LLMOS_BENCH_TREE": str(tree)}
    done = subprocess.run(
        [sys.executable, __file__, "--once", "normal"], env=env, capture_output=True, text=True, check=True
    )
    figures: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return figures


def compare(revision: str, rounds: int) -> dict[str, float | str]:
    """This kernel against `revision`'s, alternating, each in a process of its own."""
    with tempfile.TemporaryDirectory() as tree:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", revision, "llmos"], capture_output=True, check=True
        )
        subprocess.run(["tar", "-x", "-C", tree], input=archive.stdout, check=True)
        ours: list[float] = []
        theirs: list[float] = []
        for _ in range(rounds):
            ours.append(baseline_once(ROOT)["syscall_median_us"])
            theirs.append(baseline_once(Path(tree))["syscall_median_us"])
    now, before = statistics.median(ours), statistics.median(theirs)
    print(
        f"before ({revision}): syscall median {before:.2f} us; now: {now:.2f} us; "
        f"now/before {now / before:.2f} ({rounds} alternating rounds, medians of each round's median)"
    )
    return {
        "baseline": revision,
        "before_syscall_median_us": round(before, 2),
        "now_over_before": round(now / before, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--baseline", help="a git revision whose kernel to compare with (e.g. main)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--once", choices=["normal", "full"], help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.once:
        print(json.dumps(once(options.once)))
        return
    figures: dict[str, float | str] = {
        "calls": CALLS,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
    }
    for synchronous in ("normal", "full"):
        measured = once(synchronous)
        median_direct, median_kernel = measured["direct_median_us"], measured["syscall_median_us"]
        print(
            f"journal synchronous={synchronous:6}  direct call median {median_direct:6.2f} us   "
            f"syscall median {median_kernel:7.2f} us  p95 {measured['syscall_p95_us']:7.2f} us   "
            f"overhead ratio {median_kernel / median_direct:6.1f}x   "
            f"sleep(0) syscall (two commits) median {measured['sleep0_syscall_median_us']:7.2f} us"
        )
        figures.update({f"{synchronous}_{key}": value for key, value in measured.items()})
        figures[f"{synchronous}_ratio"] = round(median_kernel / median_direct, 1)
    target = float(figures["normal_syscall_median_us"])
    print(f"target: under 100 us median with the journal on (default synchronous=normal): {target} us")
    if options.baseline:
        figures.update(compare(options.baseline, options.rounds))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
