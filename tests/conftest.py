"""Every test gets its own LLMOS_HOME and no user config; model files stay in the shared cache."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def llmos_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    home = tmp_path / "llmos-home"
    monkeypatch.setenv("LLMOS_HOME", str(home))
    empty_config = tmp_path / "empty-config.toml"  # LLMOS_CONFIG naming a missing file is an error
    empty_config.write_text("")
    monkeypatch.setenv("LLMOS_CONFIG", str(empty_config))
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL"):  # the shell's, set up for other tools
        monkeypatch.delenv(name, raising=False)
    yield home
