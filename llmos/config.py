"""Configuration: offline defaults, then a TOML file, then `LLMOS_*` environment variables.

Precedence, lowest first: the defaults below; `OPENAI_API_KEY` and `OPENAI_BASE_URL` (for the
OpenAI backend only); the TOML file at `$LLMOS_CONFIG` or `~/.config/llmos/config.toml`; `LLMOS_*`
variables. A nested key `llm.model` is set by `LLMOS_LLM__MODEL` (sections and keys joined by a
double underscore); `LLMOS_HOME` sets `home`.
"""

from __future__ import annotations

import os
import sys
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError


def _default_home() -> Path:
    return Path("~/.llmos").expanduser()


def _default_models_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path("~/.cache").expanduser())
    return Path(cache) / "llmos" / "models"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


OPENAI_URL = "https://api.openai.com/v1"
SECRET_KEYS = frozenset({("llm", "api_key")})  # their values are never printed, not even in errors


class LLMConfig(Section):
    model: str = Field("qwen2.5-coder-0.5b-instruct", description="catalog name, .gguf path, or openai:NAME")
    base_url: str | None = Field(
        None, description="OpenAI-compatible server(s), comma-separated; None runs the model locally"
    )
    openai_base_url: str = Field(
        OPENAI_URL, description="where openai:NAME models go while base_url is unset ($OPENAI_BASE_URL)"
    )
    # SecretStr: shown as ********** in reprs, dumps, `llmos config show` and errors; the OpenAI
    # backend reads the value when it builds its HTTP client.
    api_key: SecretStr | None = Field(None, description="for the OpenAI-compatible server ($OPENAI_API_KEY)")
    n_ctx: int = Field(4096, ge=256)
    threads: int | None = Field(None, ge=1)
    timeout_s: float = Field(120.0, gt=0)
    max_retries: int = Field(3, ge=0)
    kv_cache_mb: int = Field(512, ge=0, description="disk budget for per-process KV snapshots")
    prefix_cache_mb: int = Field(
        256, ge=0, description="disk budget for system-prompt KV states shared by every run (0: off)"
    )


class JournalConfig(Section):
    # "normal" survives a killed process (the WAL is in the OS page cache); "full" also survives
    # a power cut, at the price of an fsync per event.
    synchronous: Literal["normal", "full"] = "normal"


class Budget(BaseModel):
    """Limits on what a process may consume; None means unlimited."""

    tokens: int | None = Field(None, ge=0)
    wall_time_s: float | None = Field(None, gt=0)
    tool_calls: int | None = Field(None, ge=0)
    sandbox_cpu_s: float | None = Field(None, gt=0)


class BudgetConfig(Budget):
    """Every process's budget unless its spawn gives one."""

    model_config = ConfigDict(extra="forbid")


class SandboxLimits(Section):
    """Per-call limits of sandboxed code; every backend enforces them the same way."""

    wall_time_s: float = Field(10.0, gt=0)
    cpu_s: float = Field(10.0, gt=0)
    memory_mb: int = Field(256, ge=16)
    pids: int = Field(64, ge=4)
    output_bytes: int = Field(1_000_000, ge=1024)
    file_size_mb: int = Field(16, ge=1)
    workspace_mb: int = Field(
        256, ge=1, description="disk use of a session's workspace, measured every ~10 ms while code runs"
    )


class SandboxConfig(Section):
    # "auto" picks docker when an engine answers and the image exists, else namespace (bubblewrap).
    # subprocess is not a boundary: it is used only when named here.
    backend: Literal["auto", "docker", "namespace", "subprocess"] = "auto"
    image: str = "llmos-sandbox:latest"
    docker_host: str | None = Field(None, description="unix:///path/docker.sock; None uses DOCKER_HOST")
    pool_size: int = Field(2, ge=0, description="warm containers kept ready")
    max_calls_per_session: int = Field(200, ge=1, description="a session is recycled after this many calls")
    idle_timeout_s: float = Field(600.0, gt=0, description="a session idle this long is removed")
    uid: int = Field(65534, ge=1, description="non-root uid sandboxed code runs as")
    limits: SandboxLimits = Field(default_factory=SandboxLimits)


Decision = Literal["allow", "ask", "deny"]


class PolicyConfig(Section):
    """The autonomy slider: for each risk class of tool, run it, ask a person first, or refuse."""

    read: Decision = "allow"
    write: Decision = "allow"
    network: Decision = "allow"
    execute: Decision = "allow"
    irreversible: Decision = "ask"
    # After a tool returned untrusted content (web, API, another server), an execute or
    # irreversible action may be an injected instruction: ask first unless this says otherwise.
    after_untrusted: Decision = "ask"


class MemoryConfig(Section):
    chroma_url: str | None = Field(None, description="http://host:port of a Chroma server; None embeds it")
    embedding_model: str = Field("all-minilm-l6-v2", description="catalog name of the offline embedder")


class Config(Section):
    home: Path = Field(default_factory=_default_home)
    models_dir: Path = Field(default_factory=_default_models_dir)
    llm: LLMConfig = Field(default_factory=LLMConfig)
    journal: JournalConfig = Field(default_factory=JournalConfig)
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    sandbox: SandboxConfig = Field(default_factory=SandboxConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    memory: MemoryConfig = Field(default_factory=MemoryConfig)

    @property
    def journal_path(self) -> Path:
        return self.home / "journal.sqlite3"

    def workspace(self, pid: int | str) -> Path:
        """Where process `pid` keeps its files: its file tools' and its sandbox session's folder."""
        return self.home / "workspaces" / str(pid)


class ConfigError(Exception):
    """A configuration value a user has to fix; the message is one sentence."""


def config_file_path(env: dict[str, str] | None = None) -> Path:
    env = dict(os.environ) if env is None else env
    if env.get("LLMOS_CONFIG"):
        return Path(env["LLMOS_CONFIG"]).expanduser()
    base = env.get("XDG_CONFIG_HOME") or str(Path("~/.config").expanduser())
    return Path(base) / "llmos" / "config.toml"


def _read_config_file(path: Path, named: bool) -> dict[str, Any]:
    """The TOML file's values; a missing file is no values unless LLMOS_CONFIG named it."""
    where = f"{path} (from LLMOS_CONFIG)" if named else str(path)
    if not path.exists():
        if named:
            raise ConfigError(f"Config file {where} does not exist; create it or unset LLMOS_CONFIG.")
        return {}
    if path.is_dir():
        raise ConfigError(f"Config file {where} is a folder, not a file; point it at a TOML file.")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"Config file {where} is not UTF-8 text (byte {exc.start} is 0x{exc.object[exc.start]:02x}); "
            "save it as UTF-8."
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"Config file {where} is not valid TOML ({exc}); fix or remove it.") from None
    except OSError as exc:
        message = f"Config file {where} cannot be read ({exc.strerror}); fix its permissions."
        raise ConfigError(message) from None


# LLMOS_* variables that llmos reads but that are not settings.
NOT_SETTINGS = frozenset({"LLMOS_CONFIG", "LLMOS_TEST_DOCKER_HOST"})
_warned: set[str] = set()  # each ignored variable is named once per process, not at every load


def _warn_ignored(name: str) -> None:
    if name in _warned:
        return
    _warned.add(name)
    first = name[len("LLMOS_") :].split("__")[0].lower()
    section = next((s for s in Config.model_fields if first.startswith(f"{s}_")), None)
    hint = ""
    if section:  # LLMOS_LLM_MODEL for LLMOS_LLM__MODEL
        hint = f" (a key in [{section}] takes a double underscore: LLMOS_{section.upper()}__KEY)"
    print(f"warning: {name} is not an llmos setting; ignored{hint}.", file=sys.stderr)


def _env_overrides(env: dict[str, str]) -> tuple[dict[str, Any], dict[tuple[str, ...], str]]:
    """Nested dict of values from LLMOS_* variables, and which variable set each key.

    A variable whose first part names no setting or section (LLMOS_DEBUG) is warned about and
    ignored; one that names a section but a key it does not have (LLMOS_LLM__MODLE) is a typo
    of a real setting, and validation stops on it.
    """
    values: dict[str, Any] = {}
    sources: dict[tuple[str, ...], str] = {}
    for name, value in env.items():
        if not name.startswith("LLMOS_") or name in NOT_SETTINGS:
            continue
        path = tuple(part.lower() for part in name[len("LLMOS_") :].split("__"))
        if path[0] not in Config.model_fields:
            _warn_ignored(name)
            continue
        node = values
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
        sources[path] = name
    return values, sources


def _openai_defaults(env: dict[str, str]) -> dict[str, Any]:
    """OPENAI_API_KEY and OPENAI_BASE_URL, the OpenAI client's own variables: below the file and LLMOS_*."""
    llm: dict[str, Any] = {}
    if env.get("OPENAI_API_KEY"):
        llm["api_key"] = env["OPENAI_API_KEY"]
    if env.get("OPENAI_BASE_URL"):
        # Not llm.base_url: a shell set up for other tools must not move the local model to a server.
        llm["openai_base_url"] = env["OPENAI_BASE_URL"]
    return {"llm": llm} if llm else {}


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(env: dict[str, str] | None = None, **overrides: Any) -> Config:
    """Build the config from file and environment; keyword overrides win over both."""
    env = dict(os.environ) if env is None else env
    path = config_file_path(env)
    file_values = _read_config_file(path, named=bool(env.get("LLMOS_CONFIG")))
    env_values, env_sources = _env_overrides(env)
    data = _merge(_merge(_merge(_openai_defaults(env), file_values), env_values), overrides)
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, data, env_sources, path)) from None
    config.home = config.home.expanduser()
    config.models_dir = config.models_dir.expanduser()
    for key in ("home", "models_dir"):
        _check_folder(key, getattr(config, key), env_sources.get((key,), str(path)))
    return config


def _check_folder(key: str, folder: Path, where: str) -> None:
    """A state folder may not exist yet (it is made when needed), but it cannot be, or be under, a file."""
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        what = "is a file" if existing == folder else f"is under {existing}, which is a file"
        raise ConfigError(f"{key} = {folder} (from {where}) {what}; point it at a folder.")


def _explain(
    exc: ValidationError, data: dict[str, Any], env_sources: dict[tuple[str, ...], str], path: Path
) -> str:
    error = exc.errors()[0]
    loc = tuple(str(part) for part in error["loc"])
    key = ".".join(loc)
    if error["type"] == "extra_forbidden":
        where = env_sources.get(loc, str(path))
        return f"Unknown config key '{key}' (from {where}); see `llmos config show` for the keys that exist."
    value: Any = data
    for part in loc:
        value = value.get(part) if isinstance(value, dict) else None
    where = env_sources.get(loc, str(path))
    allowed = error["msg"][0].lower() + error["msg"][1:]
    shown = "(hidden)" if loc in SECRET_KEYS else repr(value)
    return f"Bad config value {key}={shown} (from {where}): {allowed}."
