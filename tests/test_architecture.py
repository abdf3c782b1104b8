"""The architecture holds: floors import only downwards, devices not each other, no file circles,
and programs and tools never reach through to the kernel object (they act by syscalls)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def lint(tree: Path) -> subprocess.CompletedProcess[str]:
    env = {"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"}
    return subprocess.run([str(LINT)], cwd=tree, env=env, capture_output=True, text=True, timeout=120)


def copy_of_the_package(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "llmos", tmp_path / "llmos", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    return tmp_path


def test_the_import_contracts_hold() -> None:
    checked = lint(ROOT)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "2 kept, 0 broken" in checked.stdout


def test_an_import_up_the_floors_breaks_the_check(tmp_path: Path) -> None:
    tree = copy_of_the_package(tmp_path)
    with (tree / "llmos" / "kernel" / "policy.py").open("a") as handle:
        handle.write("\nfrom llmos.agents import agent  # noqa\n")
    checked = lint(tree)
    assert checked.returncode != 0
    assert "llmos.kernel is not allowed to import llmos.agents" in checked.stdout


def test_a_device_importing_another_breaks_the_check(tmp_path: Path) -> None:
    tree = copy_of_the_package(tmp_path)
    with (tree / "llmos" / "tools" / "python.py").open("a") as handle:
        handle.write("\nfrom llmos.sandbox import base  # noqa\n")
    checked = lint(tree)
    assert checked.returncode != 0
    assert "llmos.tools is not allowed to import llmos.sandbox" in checked.stdout


def test_a_circle_between_files_breaks_the_check(tmp_path: Path) -> None:
    tree = copy_of_the_package(tmp_path)
    with (tree / "llmos" / "kernel" / "journal.py").open("a") as handle:
        handle.write("\nfrom llmos.kernel import kernel  # noqa\n")
    checked = lint(tree)
    assert checked.returncode != 0
    assert "No circles" in checked.stdout and "BROKEN" in checked.stdout


REACH_THROUGH = re.compile(r"\w\.kernel\b(?!\.\w+ import)")


def test_programs_and_tools_do_not_reach_through_to_the_kernel() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for folder in ("agents", "tools", "memory")
        for path in sorted((ROOT / "llmos" / folder).rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if REACH_THROUGH.search(line) and not line.lstrip().startswith(("from ", "import ", "#"))
    ]
    assert found == []
