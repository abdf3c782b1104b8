"""The embedded local CPU: a GGUF model run in-process by llama-cpp-python.

What this backend adds on top of the library:

- One `Llama` per (model file, n_ctx, threads) in the process, shared by every backend that asks for
  it and driven by one worker thread, so the event loop stays free and calls never interleave.
- Prompt-prefix reuse: the conversation is rendered with the model's chat template and tokenized;
  only the tokens after the longest prefix already in the KV cache are evaluated. A multi-turn
  conversation never re-evaluates its history (`TokenUsage.reused_prompt_tokens` says how much was saved).
- Per-session KV snapshots: when the model switches from session A to session B, A's KV state is
  written to a file (`llama_state_save_file`, ~10 ms per 1,000 tokens); when A comes back it is
  loaded instead of prefilling A's history again. Snapshot files live under `kv_dir` within an LRU
  size budget (`kv_cache_mb`).
- A prefix cache shared by every process and run on the machine: the KV state of a long system
  prompt is saved once, in a file named by the model and the prompt's tokens, and loaded wherever
  that prompt starts a conversation again (the next `llmos run` of the same agent, a second process
  with it, a restarted kernel), so the system prompt is never prefilled twice. LRU within
  `prefix_cache_mb`, recency kept in the files' mtimes so concurrent processes share one budget.
- Tool calls and structured output through a GBNF grammar built from the JSON schema of
  `llmos.cpu.toolcalls`, validated, with a bounded repair loop.
- Logprobs computed from the logits row that produced each token (read right after the step that
  sampled it), so `logits_all=True` (an n_ctx x n_vocab buffer) is never needed.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import ctypes
import hashlib
import json
import os
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from llama_cpp.llama_grammar import LlamaGrammar

from llmos.cpu.toolcalls import (
    MAX_REPAIRS,
    OutputInvalid,
    constrained_schema,
    invalid_output_text,
    parse_output,
    prompt_messages,
    repair_request,
)
from llmos.kernel.devices import (
    ChatRequest,
    ChatResult,
    FinishReason,
    LLMError,
    Message,
    ModelInfo,
    TextCallback,
    TokenLogprob,
    TokenUsage,
    ToolCall,
)

# Used when the GGUF carries no chat template; SmolLM2 and Qwen2.5 both speak ChatML.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_MB = 1024 * 1024
# Shorter system prompts are cheaper to evaluate than to keep a file for.
PREFIX_MIN_TOKENS = 128


class ContextOverflowError(LLMError):
    """The prompt does not fit into the model's context window."""


class ModelLoadError(LLMError):
    """The GGUF file could not be opened."""


class UnsupportedSchemaError(LLMError):
    """A tool's or response's JSON schema cannot be turned into a grammar."""


Emit = Callable[[str], None]


# --------------------------------------------------------------------------- engines (shared models)


@dataclass(eq=False)
class _Engine:
    """One loaded model, the worker thread that drives it, and who its KV cache belongs to."""

    key: tuple[str, int, int | None]  # its place in _ENGINES
    llm: llama_cpp.Llama
    worker: ThreadPoolExecutor
    # Serialises direct use of `llm` (the worker already runs one job at a time).
    lock: threading.Lock = field(default_factory=threading.Lock)
    # The (snapshot store, session) whose conversation is in the KV cache right now.
    owner: tuple[_SnapshotStore, str | None] | None = None
    refs: int = 0


_ENGINES: dict[tuple[str, int, int | None], _Engine] = {}
_ENGINES_LOCK = threading.Lock()


def _acquire_engine(path: Path, n_ctx: int, threads: int | None) -> _Engine:
    key = (str(path.resolve()), n_ctx, threads)
    with _ENGINES_LOCK:
        engine = _ENGINES.get(key)
        if engine is None:
            if not path.is_file():
                raise ModelLoadError(
                    f"Model file {path} does not exist; pull it with `llmos models pull NAME`."
                )
            try:
                llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, verbose=False)
            except ValueError as exc:
                raise ModelLoadError(
                    f"llama.cpp could not load {path} ({exc}); check that it is a complete GGUF file."
                ) from None
            worker = ThreadPoolExecutor(1, thread_name_prefix=f"llmos-{path.stem}")
            engine = _Engine(key=key, llm=llm, worker=worker)
            _ENGINES[key] = engine
        engine.refs += 1
        return engine


def _release_engine(engine: _Engine) -> None:
    with _ENGINES_LOCK:
        engine.refs -= 1
        if engine.refs > 0:
            return
        del _ENGINES[engine.key]
    engine.worker.shutdown(wait=True)
    engine.llm.close()


# --------------------------------------------------------------------------- KV snapshots


def _save_state(llm: llama_cpp.Llama, path: Path, tokens: list[int]) -> bool:
    """Write the context's KV state, which holds `tokens`, to `path`."""
    array = (llama_cpp.llama_token * len(tokens))(*tokens)
    return bool(llama_cpp.llama_state_save_file(llm._ctx.ctx, str(path).encode(), array, len(tokens)))


def _load_state(llm: llama_cpp.Llama, path: Path) -> bool:
    capacity = llm.n_ctx()
    tokens = (llama_cpp.llama_token * capacity)()
    count = ctypes.c_size_t(0)
    if not llama_cpp.llama_state_load_file(
        llm._ctx.ctx, str(path).encode(), tokens, capacity, ctypes.byref(count)
    ):
        # The context may hold a half-written state now: forget all of it (the next eval drops
        # every KV cell past n_tokens).
        llm.n_tokens = 0
        return False
    n = count.value
    llm.input_ids[:n] = tokens[:n]
    llm.n_tokens = n
    return True


@dataclass
class _Snapshot:
    path: Path
    tokens: list[int]
    size: int


class _SnapshotStore:
    """Per-session KV state files of one backend, least recently used evicted past the budget.

    Only the engine's worker thread touches a store, so it needs no lock of its own.
    """

    def __init__(self, directory: Path, budget_bytes: int) -> None:
        self.directory = directory
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[str, _Snapshot] = OrderedDict()

    @property
    def total_bytes(self) -> int:
        return sum(s.size for s in self._entries.values())

    def get(self, session: str) -> _Snapshot | None:
        snapshot = self._entries.get(session)
        if snapshot is not None:
            self._entries.move_to_end(session)
        return snapshot

    def save(self, llm: llama_cpp.Llama, session: str) -> None:
        n = llm.n_tokens
        tokens = [int(t) for t in llm.input_ids[:n]]
        current = self._entries.get(session)
        if current is not None and current.tokens == tokens:
            self._entries.move_to_end(session)
            return
        if n == 0 or self.budget_bytes <= 0:
            self.drop(session)
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        name = hashlib.sha256(session.encode()).hexdigest()[:24]
        path = self.directory / f"{name}.kv"
        partial = path.with_suffix(".partial")
        if not _save_state(llm, partial, tokens):
            partial.unlink(missing_ok=True)
            self.drop(session)
            return
        partial.replace(path)
        self._entries[session] = _Snapshot(path, tokens, path.stat().st_size)
        self._entries.move_to_end(session)
        self._evict()

    def load(self, llm: llama_cpp.Llama, snapshot: _Snapshot) -> bool:
        return _load_state(llm, snapshot.path)

    def drop(self, session: str) -> None:
        snapshot = self._entries.pop(session, None)
        if snapshot is not None:
            snapshot.path.unlink(missing_ok=True)

    def _evict(self) -> None:
        while self._entries and self.total_bytes > self.budget_bytes:
            oldest = next(iter(self._entries))
            self.drop(oldest)

    def close(self) -> None:
        self._entries.clear()
        shutil.rmtree(self.directory, ignore_errors=True)


class _PrefixCache:
    """KV states of system prompts, one file each, shared by every backend of one model file.

    A file's name hashes the model file's identity, the llama.cpp version and the prefix's tokens,
    so a state is only ever loaded into the model that computed it, for exactly that prefix. Files
    are written under a temporary name and renamed, so readers in other processes never see half a
    file; a file that fails to load is deleted and the prefix is evaluated again.
    """

    def __init__(self, directory: Path, budget_bytes: int, model_path: Path) -> None:
        self.directory = directory
        self.budget_bytes = budget_bytes
        stat = model_path.stat()
        self._model_key = f"{model_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{llama_cpp.__version__}"

    def path(self, prefix: Sequence[int]) -> Path:
        digest = hashlib.sha256(self._model_key.encode())
        digest.update(np.asarray(prefix, dtype=np.int32).tobytes())
        return self.directory / f"{digest.hexdigest()[:32]}.prefix"

    def load(self, llm: llama_cpp.Llama, prefix: Sequence[int]) -> bool:
        path = self.path(prefix)
        if self.budget_bytes <= 0 or not path.is_file():
            return False
        if not _load_state(llm, path) or llm.input_ids[: llm.n_tokens].tolist() != list(prefix):
            llm.n_tokens = 0
            path.unlink(missing_ok=True)
            return False
        with contextlib.suppress(OSError):
            os.utime(path)  # recency for the LRU
        return True

    def save(self, llm: llama_cpp.Llama, prefix: Sequence[int]) -> None:
        """Save the KV state, which must hold exactly `prefix` right now."""
        path = self.path(prefix)
        if self.budget_bytes <= 0 or path.exists():
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.partial")
        if _save_state(llm, partial, list(prefix)):
            partial.replace(path)
            self._evict()
        else:
            partial.unlink(missing_ok=True)

    def _evict(self) -> None:
        files = []
        for path in self.directory.glob("*.prefix"):
            with contextlib.suppress(OSError):
                stat = path.stat()
                files.append((stat.st_mtime_ns, stat.st_size, path))
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files):
            if total <= self.budget_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep_stale_stores(kv_dir: Path) -> None:
    """Remove snapshot directories left behind by processes that died without closing."""
    if not kv_dir.is_dir():
        return
    for directory in kv_dir.iterdir():
        parts = directory.name.rsplit("-", 2)
        if len(parts) == 3 and parts[1].isdigit() and directory.is_dir() and not _pid_alive(int(parts[1])):
            shutil.rmtree(directory, ignore_errors=True)


# --------------------------------------------------------------------------- generation


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters of `text` could be the start of a stop string."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                longest = max(longest, k)
                break
    return longest


def _log_softmax_at(logits: np.ndarray[Any, np.dtype[np.float32]], token: int) -> float:
    row = logits.astype(np.float64)
    peak = float(row.max())
    return float(row[token] - peak - np.log(np.exp(row - peak).sum()))


@dataclass
class _Attempt:
    text: str = ""
    finish_reason: FinishReason = "stop"
    usage: TokenUsage = field(default_factory=TokenUsage)
    logprobs: list[TokenLogprob] | None = None
    first_token_at: float | None = None


class LlamaCppBackend:
    """An `LLMBackend` running a GGUF model in this process (see the module docstring)."""

    def __init__(
        self,
        model_path: Path,
        *,
        name: str,
        n_ctx: int = 4096,
        threads: int | None = None,
        kv_dir: Path,
        kv_cache_mb: int = 512,
        prefix_cache_mb: int = 256,
    ) -> None:
        self.name = name
        self.model_path = Path(model_path)
        self._engine = _acquire_engine(self.model_path, n_ctx, threads)
        self._closed = False
        # A directory of its own: two backends (two kernels) never see each other's snapshots.
        _sweep_stale_stores(Path(kv_dir))
        store_dir = Path(kv_dir) / f"{self.model_path.stem}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._store = _SnapshotStore(store_dir, kv_cache_mb * _MB)
        self._prefixes = _PrefixCache(Path(kv_dir) / "prefix", prefix_cache_mb * _MB, self.model_path)
        llm = self._engine.llm
        metadata: dict[str, str] = llm.metadata
        template = metadata.get("tokenizer.chat_template") or CHATML_TEMPLATE
        eos, bos = self._token_text(llm.token_eos()), self._token_text(llm.token_bos())
        self._formatter = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)
        self._head_formatter = Jinja2ChatFormatter(
            template=template, eos_token=eos, bos_token=bos, add_generation_prompt=False
        )
        self._info = ModelInfo(
            name=name,
            context_length=llm.n_ctx(),
            native_tool_calls=False,
            structured_output=True,
            logprobs=True,
            family=metadata.get("general.architecture", "unknown"),
        )
        self._grammars: dict[str, LlamaGrammar] = {}
        self._head: tuple[str, list[int]] | None = None  # the last system message and its tokens

    # -- protocol

    @property
    def info(self) -> ModelInfo:
        return self._info

    def count_tokens(self, text: str) -> int:
        return len(self._tokenize(text))

    async def chat(self, request: ChatRequest, on_text: TextCallback | None = None) -> ChatResult:
        """Run one request on the worker thread; `on_text` is called on the caller's event loop.

        If the awaiting task is cancelled, generation stops at the next token and the
        cancellation propagates once the worker has let go of the model.
        """
        if self._closed:
            raise LLMError(f"Backend {self.name} is closed; open a new one.")
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        cancel = threading.Event()
        emit: Emit | None = None
        if on_text is not None:
            callback = on_text

            def emit(piece: str) -> None:
                loop.call_soon_threadsafe(callback, piece)

        job = loop.run_in_executor(self._engine.worker, self._chat_sync, request, emit, cancel, started)
        try:
            return await asyncio.shield(job)
        except asyncio.CancelledError:
            cancel.set()
            with contextlib.suppress(BaseException):
                await job
            raise

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await asyncio.get_running_loop().run_in_executor(self._engine.worker, self._detach)
        await asyncio.to_thread(_release_engine, self._engine)

    def close(self) -> None:
        """Synchronous `aclose` for code without an event loop."""
        if self._closed:
            return
        self._closed = True
        self._engine.worker.submit(self._detach).result()
        _release_engine(self._engine)

    # -- prompt

    def _tokenize(self, text: str) -> list[int]:
        # Special tokens as tokens: chat templates write them as text.
        return list(self._engine.llm.tokenize(text.encode(), add_bos=False, special=True))

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return self._engine.llm.detokenize([token], special=True).decode("utf-8", errors="replace")

    def prompt_tokens(self, messages: list[Message]) -> list[int]:
        """The conversation rendered with the model's chat template, ready for generation."""
        chat: list[Any] = [{"role": m.role, "content": m.content} for m in messages]
        rendered = self._formatter(messages=chat)
        # The template writes the special tokens itself (what llama-cpp-python's handler does too).
        return self._tokenize(rendered.prompt)

    def _system_prefix(self, messages: list[Message], prompt: list[int]) -> list[int]:
        """The leading system message's tokens, if `prompt` starts with them and they are worth caching."""
        if self._prefixes.budget_bytes <= 0 or not messages or messages[0].role != "system":
            return []
        content = messages[0].content
        if self._head is None or self._head[0] != content:  # a process keeps its system prompt
            try:
                rendered = self._head_formatter(messages=[{"role": "system", "content": content}])
            except Exception:  # templates may insist on a user turn; then there is no cacheable head
                self._head = (content, [])
            else:
                self._head = (content, self._tokenize(rendered.prompt))
        head = self._head[1]
        if len(head) < PREFIX_MIN_TOKENS or len(head) >= len(prompt) or prompt[: len(head)] != head:
            return []
        return head

    def _grammar(self, schema: dict[str, Any]) -> LlamaGrammar:
        key = json.dumps(schema, sort_keys=True)
        grammar = self._grammars.get(key)
        if grammar is None:
            try:
                grammar = LlamaGrammar.from_json_schema(key, verbose=False)
            except Exception as exc:  # the converter raises bare Exceptions and others
                raise UnsupportedSchemaError(
                    f"The JSON schema cannot be turned into a grammar ({exc}); simplify the tool's "
                    "parameters or the response schema."
                ) from None
            self._grammars[key] = grammar
        return grammar

    # -- worker thread

    def _detach(self) -> None:
        engine = self._engine
        with engine.lock:
            if engine.owner is not None and engine.owner[0] is self._store:
                engine.owner = None
            self._store.close()

    def _switch_to(self, session: str | None, prompt: list[int]) -> None:
        """Make the KV cache the best starting point for `session`'s prompt."""
        engine, llm = self._engine, self._engine.llm
        owner = engine.owner
        if owner is not None and owner[0] is self._store and owner[1] == session:
            return
        if owner is not None and owner[1] is not None:
            owner[0].save(llm, owner[1])
        if session is not None:
            snapshot = self._store.get(session)
            in_cache = _common_prefix(llm.input_ids[: llm.n_tokens].tolist(), prompt)
            better = snapshot is not None and _common_prefix(snapshot.tokens, prompt) > in_cache
            if snapshot is not None and better and not self._store.load(llm, snapshot):
                self._store.drop(session)
        engine.owner = (self._store, session)

    def _chat_sync(
        self, request: ChatRequest, emit: Emit | None, cancel: threading.Event, started: float
    ) -> ChatResult:
        if cancel.is_set():
            return ChatResult(finish_reason="cancelled", model=self.name, backend="llamacpp")
        with self._engine.lock:
            schema = constrained_schema(request)
            if schema is None:
                attempt = self._generate(prompt_messages(request), request, None, emit, cancel)
                return self._result(attempt, attempt.text, [], attempt.usage, started)
            grammar = self._grammar(schema)
            messages = prompt_messages(request)
            usage = TokenUsage()
            for repair in range(MAX_REPAIRS + 1):
                attempt = self._generate(messages, request, grammar, None, cancel)
                usage += attempt.usage
                try:
                    text, calls = parse_output(attempt.text, request)
                except OutputInvalid as exc:
                    if repair == MAX_REPAIRS or attempt.finish_reason == "cancelled":
                        # A model error: the bad output goes back as data, not as an exception.
                        failed = self._result(attempt, attempt.text, [], usage, started)
                        if failed.finish_reason != "cancelled":
                            failed.finish_reason = "error"
                            failed.text = invalid_output_text(attempt.text, exc)
                        return failed
                    messages = prompt_messages(repair_request(request, attempt.text, str(exc)))
                    continue
                if text and emit is not None:
                    emit(text)
                result = self._result(attempt, text, calls, usage, started)
                if calls:
                    result.finish_reason = "tool_calls"
                return result
            raise AssertionError("unreachable: the repair loop always returns")

    def _result(
        self, attempt: _Attempt, text: str, calls: list[ToolCall], usage: TokenUsage, started: float
    ) -> ChatResult:
        ttft = None if attempt.first_token_at is None else attempt.first_token_at - started
        return ChatResult(
            text=text,
            tool_calls=calls,
            finish_reason=attempt.finish_reason,
            usage=usage,
            model=self.name,
            backend="llamacpp",
            logprobs=attempt.logprobs,
            time_to_first_token_s=ttft,
            duration_s=time.perf_counter() - started,
        )

    def _generate(
        self,
        messages: list[Message],
        request: ChatRequest,
        grammar: LlamaGrammar | None,
        emit: Emit | None,
        cancel: threading.Event,
    ) -> _Attempt:
        llm = self._engine.llm
        prompt = self.prompt_tokens(messages)
        n_ctx = llm.n_ctx()
        if len(prompt) >= n_ctx:
            raise ContextOverflowError(
                f"The prompt has {len(prompt)} tokens but {self.name}'s context holds {n_ctx}; "
                "shorten the conversation or raise llm.n_ctx."
            )
        self._switch_to(request.session, prompt)
        in_cache = _common_prefix(llm.input_ids[: llm.n_tokens].tolist(), prompt)
        prefix = self._system_prefix(messages, prompt)
        if len(prefix) > in_cache and self._prefixes.load(llm, prefix):
            in_cache = len(prefix)
        # At least one prompt token is evaluated so the logits that pick the first token are fresh.
        reused = min(in_cache, len(prompt) - 1)
        llm.n_tokens = reused
        if reused < len(prefix):
            # Evaluated in two parts so the system prompt's state can be saved on its own.
            llm.eval(prompt[reused : len(prefix)])
            self._prefixes.save(llm, prefix)
        if request.seed is not None:
            llm.set_seed(request.seed)
        budget = n_ctx - len(prompt)
        if request.max_tokens is not None:
            budget = min(budget, request.max_tokens)

        attempt = _Attempt(usage=TokenUsage(prompt_tokens=len(prompt), reused_prompt_tokens=reused))
        attempt.logprobs = [] if request.logprobs else None
        stops = [s for s in request.stop if s]
        longest_stop = max((len(s) for s in stops), default=0)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        vocab = llm._model.vocab
        text, emitted, generated, cut = "", 0, 0, False
        attempt.finish_reason = "length"
        tokens = llm.generate(
            prompt[llm.n_tokens :],
            temp=request.temperature,
            top_p=request.top_p,
            min_p=0.0,
            repeat_penalty=1.0,
            reset=False,
            grammar=grammar,
        )
        try:
            for token in tokens if budget > 0 else ():
                if attempt.first_token_at is None:
                    attempt.first_token_at = time.perf_counter()
                if cancel.is_set():
                    attempt.finish_reason = "cancelled"
                    break
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    attempt.finish_reason = "stop"
                    break
                generated += 1
                if attempt.logprobs is not None:
                    attempt.logprobs.append(self._logprob(token))
                piece = decoder.decode(llm.detokenize([token]))
                # Only the new text (plus a stop string's length before it) can complete a stop.
                start = max(0, len(text) - longest_stop)
                text += piece
                hit = min((i for i in (text.find(s, start) for s in stops) if i >= 0), default=-1)
                if hit >= 0:
                    text, cut = text[:hit], True
                    attempt.finish_reason = "stop"
                    break
                if emit is not None:
                    safe = len(text) - _held_back(text, stops)
                    if safe > emitted:
                        emit(text[emitted:safe])
                        emitted = safe
                if generated >= budget:
                    break
        finally:
            tokens.close()
        if not cut:
            text += decoder.decode(b"", final=True)
        if emit is not None and len(text) > emitted:
            emit(text[emitted:])
        attempt.text = text
        attempt.usage.completion_tokens = generated
        return attempt

    def _logprob(self, token: int) -> TokenLogprob:
        """The log-probability of `token` under the logits row that was just sampled from."""
        llm = self._engine.llm
        row = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
        logits = np.ctypeslib.as_array(row, shape=(llm.n_vocab(),))
        return TokenLogprob(token=self._token_text(token), logprob=_log_softmax_at(logits, token))


__all__ = ["ContextOverflowError", "LlamaCppBackend", "ModelLoadError", "UnsupportedSchemaError"]
