"""The CPU device: LLM backends behind one protocol, and the factory that picks one from the config."""

from __future__ import annotations

from typing import TYPE_CHECKING

from llmos.kernel.devices import LLMBackend, LLMError

if TYPE_CHECKING:
    from llmos.config import Config

OPENAI_PREFIX = "openai:"
SCRIPTED_PREFIX = "scripted:"


def open_backend(config: Config, model: str | None = None) -> LLMBackend:
    """The backend for `model` (default `config.llm.model`).

    "openai:NAME", or any name while `llm.base_url` is set, talks to an OpenAI-compatible server
    (`llm.openai_base_url` when no base_url is set: $OPENAI_BASE_URL or api.openai.com) with
    `llm.api_key`; a catalog name or a .gguf path runs locally with llama.cpp, pulling a catalog
    model into `config.models_dir` on first use.
    """
    spec = model or config.llm.model
    if spec.startswith(SCRIPTED_PREFIX):  # a scripted fake for control-flow tests, named as such
        from pathlib import Path

        from llmos.cpu.scripted import ScriptedLLM

        script = Path(spec.removeprefix(SCRIPTED_PREFIX))
        try:
            return ScriptedLLM.from_file(script)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise LLMError(f"Scripted model {script} cannot be read ({type(exc).__name__}: {exc}).") from None
    if spec.startswith(OPENAI_PREFIX) or config.llm.base_url:
        # Imported here: the openai client costs time to import and local runs do not need it.
        from llmos.cpu.openai import OpenAIBackend

        name = spec.removeprefix(OPENAI_PREFIX)
        if not name:
            raise LLMError(
                "Model 'openai:' names no model; write it as openai:NAME, e.g. openai:gpt-4o-mini."
            )
        servers = config.llm.base_url or config.llm.openai_base_url
        urls = [url.strip() for url in servers.split(",") if url.strip()]
        backends = [
            OpenAIBackend(
                url,
                model=name,
                api_key=config.llm.api_key,
                timeout_s=config.llm.timeout_s,
                max_retries=config.llm.max_retries,
                context_length=config.llm.n_ctx,
            )
            for url in urls
        ]
        if len(backends) == 1:
            return backends[0]
        from llmos.cpu.pool import ServerPool

        return ServerPool(backends)

    try:
        from llmos.cpu.llamacpp import LlamaCppBackend
    except ImportError as exc:  # llmos installed without the `local` extra
        raise LLMError(
            f"Model {spec!r} runs locally, which needs llama-cpp-python ({exc}): install it with "
            "`pip install 'llmos[local]'`, or use a model on a server (openai:NAME or llm.base_url)."
        ) from None
    from llmos.models import ModelManager

    manager = ModelManager(config.models_dir)
    path = manager.resolve(spec)
    return LlamaCppBackend(
        path,
        name=spec if spec in manager.catalog else path.stem,
        n_ctx=config.llm.n_ctx,
        threads=config.llm.threads,
        kv_dir=config.home / "kv",
        kv_cache_mb=config.llm.kv_cache_mb,
        prefix_cache_mb=config.llm.prefix_cache_mb,
    )
