"""Sandbox latency: cold start and warm round trip of each llmos backend, next to AutoGen's executors.

Runs the same code, `print(1+1)`, on:
  - llmos docker, namespace (bubblewrap) and subprocess backends: cold = the first call of a new
    session with nothing warm (starts the container / bwrap / interpreter); warm = later calls of
    that session; docker and namespace also "pool" = the first call of a new session served by a
    warm worker of the pool;
  - autogen-ext's LocalCommandLineCodeExecutor and DockerCommandLineCodeExecutor (a new process
    per call, `docker exec` for the Docker one), on the same engine and the same image (plus the
    /bin/sh, `timeout` and `python` that AutoGen's executor needs).
Starts and stops a private dockerd when no engine is configured. Last line: one JSON object.

    .venv/bin/python bench/sandbox_latency.py [--warm-calls 200] [--cold-runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

from llmos.config import Config, SandboxConfig, load_config
from llmos.sandbox import open_sandbox
from llmos.sandbox.dockerd import ManagedDockerd, engine_answers
from llmos.sandbox.image import CONTENT_LABEL, build_image, docker_host_of, extend_image, image_labels

CODE = "print(1+1)"
AUTOGEN_IMAGE = "llmos-sandbox-autogen-bench:latest"


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {"median_ms": ms(statistics.median(ordered)), "p95_ms": ms(p95), "n": len(ordered)}


async def timed(call: Callable[[], Awaitable[Any]]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = await call()
    return time.perf_counter() - started, result


def check(output: str, where: str) -> None:
    if output.strip() != "2":
        raise SystemExit(f"{where}: expected output 2, got {output!r}")


async def bench_llmos(
    backend: str, home: Path, docker_host: str | None, cold_runs: int, warm_calls: int
) -> dict[str, Any]:
    def config(pool_size: int) -> Config:
        sandbox = {"backend": backend, "docker_host": docker_host, "pool_size": pool_size}
        return Config(home=home, sandbox=SandboxConfig.model_validate(sandbox))

    colds: list[float] = []
    warms: list[float] = []
    for run in range(cold_runs):
        sandbox = open_sandbox(config(0))
        try:
            took, result = await timed(partial(sandbox.exec, "cold", CODE))
            check(result.stdout, f"{backend} cold")
            colds.append(took)
            if run == 0:
                for _ in range(warm_calls):
                    took, result = await timed(partial(sandbox.exec, "cold", CODE))
                    warms.append(took)
                check(result.stdout, f"{backend} warm")
        finally:
            await sandbox.aclose()
    figures: dict[str, Any] = {"cold": summary(colds), "warm": summary(warms)}
    if backend in ("docker", "namespace"):  # the backends with a warm pool
        pooled: list[float] = []
        sandbox = open_sandbox(config(2))
        try:
            for run in range(cold_runs):
                await sandbox.warm_up()
                took, result = await timed(partial(sandbox.exec, f"pool{run}", CODE))
                check(result.stdout, f"{backend} pool")
                pooled.append(took)
        finally:
            await sandbox.aclose()
        figures["pool_start"] = summary(pooled)
    return figures


async def bench_autogen_executor(
    make: Callable[[str], Any], label: str, cold_runs: int, warm_calls: int, work_mode: int | None = None
) -> dict[str, Any]:
    """Cold start (create, start, first run) and warm runs of an AutoGen code executor."""
    from autogen_core import CancellationToken
    from autogen_core.code_executor import CodeBlock

    block = [CodeBlock(code=CODE, language="python")]
    colds: list[float] = []
    warms: list[float] = []
    for run in range(cold_runs):
        with tempfile.TemporaryDirectory() as work:
            if work_mode is not None:
                os.chmod(work, work_mode)
            started = time.perf_counter()
            executor = make(work)
            await executor.start()
            result = await executor.execute_code_blocks(block, CancellationToken())
            colds.append(time.perf_counter() - started)
            check(result.output, label)
            if run == 0:
                for _ in range(warm_calls):
                    took, result = await timed(
                        partial(executor.execute_code_blocks, block, CancellationToken())
                    )
                    warms.append(took)
            await executor.stop()
    return {"cold": summary(colds), "warm": summary(warms)}


async def bench_autogen_local(cold_runs: int, warm_calls: int) -> dict[str, Any]:
    from autogen_ext.code_executors.local import LocalCommandLineCodeExecutor

    def make(work: str) -> Any:
        return LocalCommandLineCodeExecutor(work_dir=work, timeout=60)

    return await bench_autogen_executor(make, "autogen local", cold_runs, warm_calls)


def autogen_image(config: Config) -> str:
    """Our sandbox image plus what AutoGen's Docker executor runs: /bin/sh, `timeout` and `python`."""
    derived = config.model_copy(
        update={"sandbox": config.sandbox.model_copy(update={"image": AUTOGEN_IMAGE})}
    )
    # A commit keeps the base image's labels: a derived image with the base's content label is current.
    current = (image_labels(config) or {}).get(CONTENT_LABEL)
    if (image_labels(derived) or {}).get(CONTENT_LABEL) != current:
        extend_image(
            config,
            config.sandbox.image,
            AUTOGEN_IMAGE,
            host_paths=["/bin/sh", "/usr/bin/timeout"],
            symlinks={"/usr/bin/python": "python3"},
        )
    return AUTOGEN_IMAGE


async def bench_autogen_docker(config: Config, cold_runs: int, warm_calls: int) -> dict[str, Any]:
    from autogen_ext.code_executors.docker import DockerCommandLineCodeExecutor

    image = autogen_image(config)

    def make(work: str) -> Any:
        return DockerCommandLineCodeExecutor(image=image, work_dir=work, timeout=60)

    # The image runs as the non-root sandbox uid: it must be able to write the work dir.
    return await bench_autogen_executor(make, "autogen docker", cold_runs, warm_calls, work_mode=0o777)


@contextlib.contextmanager
def engine(config: Config) -> Iterator[tuple[str, bool]]:
    """The configured engine if it answers, else a private dockerd for this run (data root kept)."""
    configured = docker_host_of(config)
    if configured and engine_answers(configured):
        yield configured, False
        return
    with ManagedDockerd(config=config) as managed:
        yield managed.docker_host, True


async def run(args: argparse.Namespace) -> dict[str, Any]:
    user_config = load_config()
    figures: dict[str, Any] = {"code": CODE}
    with (
        engine(user_config) as (host, started_engine),
        tempfile.TemporaryDirectory(prefix="llmos-bench-") as home,
    ):
        figures["private_dockerd"] = started_engine
        os.environ["DOCKER_HOST"] = host  # for AutoGen's docker SDK client
        config = Config(home=Path(home), sandbox=SandboxConfig(docker_host=host))
        took = time.perf_counter()
        build_image(config, progress=False)
        figures["image_ready_s"] = round(time.perf_counter() - took, 2)
        for backend in ("docker", "namespace", "subprocess"):
            print(f"llmos {backend} ...", file=sys.stderr, flush=True)
            try:
                figures[backend] = await bench_llmos(
                    backend, Path(home), host, args.cold_runs, args.warm_calls
                )
            except Exception as exc:  # a backend that cannot run here is reported, not fatal
                figures[backend] = {"error": str(exc)}
        print("autogen local ...", file=sys.stderr, flush=True)
        figures["autogen_local"] = await bench_autogen_local(args.cold_runs, args.autogen_calls)
        print("autogen docker ...", file=sys.stderr, flush=True)
        figures["autogen_docker"] = await bench_autogen_docker(config, args.cold_runs, args.autogen_calls)
    return figures


def ratios(figures: dict[str, Any]) -> dict[str, Any]:
    def get(name: str, kind: str) -> float | None:
        value = figures.get(name, {}).get(kind, {}).get("median_ms")
        return float(value) if value else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 1) if a and b else None

    docker_warm, ns_warm, ns_cold = get("docker", "warm"), get("namespace", "warm"), get("namespace", "cold")
    speedup_docker = ratio(get("autogen_docker", "warm"), docker_warm)
    return {
        "ratios": {
            "autogen_docker_warm_over_llmos_docker_warm": speedup_docker,
            "autogen_docker_cold_over_llmos_docker_cold": ratio(
                get("autogen_docker", "cold"), get("docker", "cold")
            ),
            "autogen_docker_cold_over_llmos_docker_pool_start": ratio(
                get("autogen_docker", "cold"), get("docker", "pool_start")
            ),
            "autogen_local_warm_over_llmos_namespace_warm": ratio(get("autogen_local", "warm"), ns_warm),
            "autogen_local_warm_over_llmos_subprocess_warm": ratio(
                get("autogen_local", "warm"), get("subprocess", "warm")
            ),
        },
        "targets": {
            "docker_warm_under_5ms": docker_warm is not None and docker_warm < 5,
            "namespace_warm_under_5ms": ns_warm is not None and ns_warm < 5,
            "namespace_cold_under_100ms": ns_cold is not None and ns_cold < 100,
            "docker_warm_10x_faster_than_autogen_docker": speedup_docker is not None and speedup_docker >= 10,
        },
    }


def print_table(figures: dict[str, Any]) -> None:
    print(f"code: {CODE!r}    all times in ms (median / p95)")
    print(f"{'executor':<24}{'cold start':>22}{'warm round trip':>22}{'pool start':>22}")
    for name in ("docker", "namespace", "subprocess", "autogen_docker", "autogen_local"):
        row = figures.get(name, {})
        if "error" in row:
            print(f"{name:<24}  unavailable: {row['error']}")
            continue
        cells = []
        for kind in ("cold", "warm", "pool_start"):
            cell = row.get(kind)
            cells.append(f"{cell['median_ms']:.2f} / {cell['p95_ms']:.2f}" if cell else "-")
        label = name if name.startswith("autogen") else f"llmos {name}"
        print(f"{label:<24}{cells[0]:>22}{cells[1]:>22}{cells[2]:>22}")
    for key, value in {**figures["ratios"], **figures["targets"]}.items():
        print(f"  {key}: {value}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cold-runs", type=int, default=5)
    parser.add_argument("--warm-calls", type=int, default=200)
    parser.add_argument("--autogen-calls", type=int, default=20, help="warm calls of the AutoGen executors")
    args = parser.parse_args()
    figures = asyncio.run(run(args))
    figures.update(ratios(figures))
    print_table(figures)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
