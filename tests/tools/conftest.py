from __future__ import annotations

from pathlib import Path

import pytest

from llmos.kernel.process import detached
from llmos.tools.registry import ToolContext


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMOS_HOME", str(tmp_path / "home"))


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    path = tmp_path / "workspace"
    path.mkdir()
    return path


@pytest.fixture
def ctx(workspace: Path) -> ToolContext:
    return ToolContext(process=detached(7), workspace=workspace)
