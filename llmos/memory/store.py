"""Long-term memory: records with provenance in a chromadb collection, searched by meaning.

A record belongs to one namespace ("agent:NAME" per agent, "shared" for all), and a search
names the namespaces it may see. Each namespace is its own chroma collection: a metadata filter
on one big collection makes HNSW queries 10-80x slower (measured: 2.4 ms unfiltered against
47-200 ms with a namespace filter at 20k records), while a query per namespace stays on the
fast path. Every record carries its provenance (which process wrote it, from what source,
when, and how far to trust it).

Embedded mode (the default) keeps a PersistentClient under `<home>/memory`. Chroma is not
safe across processes, so the store takes an exclusive lock file next to that directory; a
second process gets `MemoryBusy` at once, naming the owner. Several processes share memory
through a Chroma server instead (`memory.chroma_url`).

Writes are upserts: a record with an id replaces the record of that id. A process writes through
the kernel's `mem.add` syscall, which is journaled before it runs; with deterministic ids (a
context window's archived turns) a resumed process repeats a write a crash cut short, harmlessly.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import numpy as np
from pydantic import BaseModel

from llmos.config import Config
from llmos.kernel.devices import (
    SHARED,
    MemoryHit,
    MemoryRecord,
    MetaValue,
    NewRecord,
    Provenance,
    Trust,
    namespace_for_agent,
)
from llmos.memory.embeddings import OnnxEmbeddingFunction

__all__ = ["SHARED", "MemoryStore", "MemoryStoreError", "namespace_for_agent"]

COLLECTION_PREFIX = "llmos-ns-"
# Keys the store owns in a record's chroma metadata; user metadata may not use them.
RESERVED_KEYS = frozenset({"namespace", "source", "trust", "pid", "time", "tainted"})
PAGE = 1000


class MemoryStoreError(Exception):
    """A memory problem the user has to fix; the message is one sentence with the fix."""


class MemoryBusy(MemoryStoreError):
    """Another process owns the embedded store."""


def collection_name(namespace: str) -> str:
    """The chroma collection of a namespace (chroma names allow only [a-zA-Z0-9._-])."""
    return COLLECTION_PREFIX + hashlib.sha256(namespace.encode()).hexdigest()[:32]


class MemoryStats(BaseModel):
    backend: Literal["embedded", "server"]
    location: str
    records: int
    namespaces: dict[str, int]
    embedding_model: str


def _check_metadata(metadata: dict[str, Any]) -> dict[str, MetaValue]:
    clash = RESERVED_KEYS & metadata.keys()
    if clash:
        raise MemoryStoreError(
            f"Metadata keys {sorted(clash)} are reserved for provenance; rename them (reserved: "
            f"{', '.join(sorted(RESERVED_KEYS))})."
        )
    for key, value in metadata.items():
        if not isinstance(value, str | int | float | bool):
            raise MemoryStoreError(
                f"Metadata value of '{key}' is a {type(value).__name__}; use str, int, float or bool."
            )
    return dict(metadata)


def _to_chroma_meta(record: NewRecord, now: float) -> dict[str, MetaValue]:
    meta: dict[str, MetaValue] = _check_metadata(record.metadata)
    meta.update(namespace=record.namespace, source=record.source, trust=record.trust, time=now)
    if record.tainted:
        meta["tainted"] = True
    if record.pid is not None:
        meta["pid"] = record.pid
    return meta


def _from_chroma(record_id: str, text: str | None, meta: dict[str, Any] | None) -> MemoryRecord:
    meta = dict(meta or {})
    pid = meta.pop("pid", None)
    provenance = Provenance(
        pid=int(pid) if pid is not None else None,
        source=str(meta.pop("source", "")),
        time=float(meta.pop("time", 0.0)),
        trust=meta.pop("trust", "tool"),
        tainted=bool(meta.pop("tainted", False)),
    )
    namespace = str(meta.pop("namespace", ""))
    return MemoryRecord(
        id=record_id, text=text or "", namespace=namespace, provenance=provenance, metadata=meta
    )


class _LockFile:
    """An exclusive, non-blocking flock held for the life of the store; the file names the owner."""

    def __init__(self, path: Path, store_path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(self.fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            raise MemoryBusy(
                f"Memory store {store_path} is in use by process {owner} (an embedded Chroma has one "
                "owner); run a Chroma server and set memory.chroma_url, or go through that process's kernel."
            ) from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd >= 0:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = -1


class MemoryStore:
    """Long-term memory. Open with `MemoryStore.open(config)`; close it (or use `with`)."""

    def __init__(
        self,
        client: Any,
        embedder: OnnxEmbeddingFunction,
        *,
        backend: Literal["embedded", "server"],
        location: str,
        embedding_model: str,
        lock: _LockFile | None = None,
    ) -> None:
        self._client = client
        self.embedder = embedder
        self.backend = backend
        self.location = location
        self.embedding_model = embedding_model
        self._lock = lock
        self._collections: dict[str, Any] = {}
        self._collections_lock = threading.Lock()
        self._max_batch = int(client.get_max_batch_size())

    @classmethod
    def open(
        cls, config: Config, *, path: Path | None = None, embedder: OnnxEmbeddingFunction | None = None
    ) -> MemoryStore:
        """The store of this config: a Chroma server when `memory.chroma_url` is set, else an
        embedded store at `path` (default `<home>/memory`) owned by this process."""
        import chromadb
        from chromadb.config import Settings

        if embedder is None:
            from llmos.models import ModelManager

            model_dir = ModelManager(config.models_dir).ensure(config.memory.embedding_model)
            embedder = OnnxEmbeddingFunction(model_dir)
        settings = Settings(anonymized_telemetry=False)
        if config.memory.chroma_url:
            url = urlparse(config.memory.chroma_url)
            if url.scheme not in ("http", "https") or not url.hostname:
                raise MemoryStoreError(
                    f"memory.chroma_url={config.memory.chroma_url!r} is not an http(s)://host:port "
                    "URL; fix it."
                )
            try:
                client = chromadb.HttpClient(
                    host=url.hostname,
                    port=url.port or (443 if url.scheme == "https" else 80),
                    ssl=url.scheme == "https",
                    settings=settings,
                )
                client.heartbeat()
            except MemoryStoreError:
                raise
            except Exception as exc:
                raise MemoryStoreError(
                    f"Chroma server at {config.memory.chroma_url} does not answer "
                    f"({type(exc).__name__}); start it with `chroma run --path DIR --host 127.0.0.1 "
                    "--port PORT` or unset memory.chroma_url."
                ) from None
            return cls(
                client, embedder, backend="server", location=config.memory.chroma_url,
                embedding_model=config.memory.embedding_model,
            )  # fmt: skip
        store_path = path or config.home / "memory"
        lock = _LockFile(store_path.with_name(store_path.name + ".lock"), store_path)
        try:
            client = chromadb.PersistentClient(path=str(store_path), settings=settings)
            return cls(
                client, embedder, backend="embedded", location=str(store_path),
                embedding_model=config.memory.embedding_model, lock=lock,
            )  # fmt: skip
        except BaseException:
            lock.release()
            raise

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._client.close()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> MemoryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- writes ------------------------------------------------------------------------------

    def add(
        self,
        text: str,
        *,
        namespace: str,
        source: str,
        trust: Trust,
        pid: int | None,
        metadata: dict[str, Any] | None = None,
        id: str | None = None,
    ) -> str:
        """Store one record; returns its id. An existing id is replaced."""
        record = NewRecord(
            text=text, namespace=namespace, source=source, trust=trust, pid=pid,
            metadata=_check_metadata(metadata or {}), id=id,
        )  # fmt: skip
        return self.add_many([record])[0]

    def add_many(self, records: Sequence[NewRecord], embeddings: np.ndarray | None = None) -> list[str]:
        """Store records (embedding them unless `embeddings` are given, one row per record)."""
        if embeddings is not None and len(embeddings) != len(records):
            raise MemoryStoreError(
                f"Got {len(embeddings)} embeddings for {len(records)} records; pass one each."
            )
        ids: list[str] = []
        for start in range(0, len(records), self._max_batch):
            chunk = records[start : start + self._max_batch]
            vectors = None if embeddings is None else embeddings[start : start + self._max_batch]
            ids.extend(self._upsert(chunk, vectors))
        return ids

    def _collection(self, namespace: str, create: bool) -> Any | None:
        """The collection of `namespace`; None when it does not exist and `create` is False."""
        with self._collections_lock:
            found = self._collections.get(namespace)
            if found is not None:
                return found
            name = collection_name(namespace)
            if create:
                found = self._client.get_or_create_collection(
                    name,
                    embedding_function=self.embedder,
                    metadata={"llmos_namespace": namespace},
                    configuration={"hnsw": {"space": "cosine"}},
                )
            else:
                try:
                    found = self._client.get_collection(name, embedding_function=self.embedder)
                except Exception:  # chroma raises NotFoundError / ValueError by version
                    return None
            self._collections[namespace] = found
            return found

    def namespaces(self) -> list[str]:
        """Every namespace that holds (or held) records."""
        names = []
        for collection in self._client.list_collections():
            if collection.name.startswith(COLLECTION_PREFIX):
                namespace = (collection.metadata or {}).get("llmos_namespace")
                if isinstance(namespace, str):
                    names.append(namespace)
        return sorted(names)

    def _upsert(self, records: Sequence[NewRecord], embeddings: np.ndarray | None = None) -> list[str]:
        if not records:
            return []
        now = time.time()
        for r in records:
            if not r.namespace:
                raise MemoryStoreError("A memory record needs a namespace, e.g. 'agent:NAME' or 'shared'.")
        ids = [r.id or uuid.uuid4().hex for r in records]
        if len(set(ids)) != len(ids):
            raise MemoryStoreError("Two records in one batch have the same id; give each record its own id.")
        metas = [_to_chroma_meta(r, now) for r in records]
        vectors = self.embedder.embed([r.text for r in records]) if embeddings is None else embeddings
        by_namespace: dict[str, list[int]] = {}
        for i, r in enumerate(records):
            by_namespace.setdefault(r.namespace, []).append(i)
        for namespace, rows in by_namespace.items():
            collection: Any = self._collection(namespace, create=True)
            collection.upsert(
                ids=[ids[i] for i in rows],
                documents=[records[i].text for i in rows],
                metadatas=[metas[i] for i in rows],
                embeddings=vectors[rows],
            )
        return ids

    def delete(self, ids: str | Sequence[str], namespace: str | None = None) -> None:
        """Delete records by id (in one namespace, or wherever they are)."""
        id_list = [ids] if isinstance(ids, str) else list(ids)
        if not id_list:
            return
        for ns in [namespace] if namespace else self.namespaces():
            collection = self._collection(ns, create=False)
            if collection is not None:
                collection.delete(ids=id_list)

    # ---- reads -------------------------------------------------------------------------------

    def search(
        self,
        query: str,
        *,
        namespaces: Sequence[str],
        k: int = 5,
        where: dict[str, Any] | None = None,
        query_embedding: np.ndarray | None = None,
    ) -> list[MemoryHit]:
        """The `k` records nearest in meaning to `query` among `namespaces`, best first."""
        collections = [c for ns in dict.fromkeys(namespaces) if (c := self._collection(ns, create=False))]
        if not collections or k < 1:
            return []
        vector = self.embedder.embed([query]) if query_embedding is None else query_embedding.reshape(1, -1)
        hits: list[MemoryHit] = []
        for collection in collections:
            result = collection.query(
                query_embeddings=vector, n_results=k, where=where or None,
                include=["documents", "metadatas", "distances"],
            )  # fmt: skip
            for record_id, text, meta, distance in zip(
                result["ids"][0], result["documents"][0], result["metadatas"][0], result["distances"][0],
                strict=True,
            ):  # fmt: skip
                record = _from_chroma(record_id, text, meta)
                hits.append(MemoryHit(**record.model_dump(), score=1.0 - float(distance)))
        hits.sort(key=lambda h: h.score, reverse=True)
        return hits[:k]

    def get(self, id: str) -> MemoryRecord | None:
        records = self.get_many([id])
        return records[0] if records else None

    def get_many(self, ids: Sequence[str]) -> list[MemoryRecord]:
        """The records of `ids` that exist, in the order asked."""
        if not ids:
            return []
        by_id: dict[str, MemoryRecord] = {}
        for namespace in self.namespaces():
            collection = self._collection(namespace, create=False)
            if collection is None:
                continue
            got = collection.get(ids=list(ids), include=["documents", "metadatas"])
            for i, d, m in zip(got["ids"], got["documents"], got["metadatas"], strict=True):
                by_id.setdefault(i, _from_chroma(i, d, m))
        return [by_id[i] for i in ids if i in by_id]

    def count(self, namespace: str | None = None) -> int:
        names = [namespace] if namespace is not None else self.namespaces()
        return sum(int(c.count()) for ns in names if (c := self._collection(ns, create=False)))

    def _pages(self, namespace: str, include: list[str]) -> Iterator[MemoryRecord]:
        collection = self._collection(namespace, create=False)
        if collection is None:
            return
        offset = 0
        while True:
            got = collection.get(include=include, limit=PAGE, offset=offset)
            ids = got["ids"]
            if not ids:
                return
            docs = got.get("documents") or [None] * len(ids)
            metas = got.get("metadatas") or [None] * len(ids)
            for i, d, m in zip(ids, docs, metas, strict=True):
                yield _from_chroma(i, d, m)
            offset += len(ids)

    def export(self, namespace: str | None = None) -> Iterator[MemoryRecord]:
        """Every record (of one namespace, if given), page by page."""
        for ns in [namespace] if namespace else self.namespaces():
            yield from self._pages(ns, include=["documents", "metadatas"])

    def stats(self) -> MemoryStats:
        namespaces = {ns: n for ns in self.namespaces() if (n := self.count(ns))}
        return MemoryStats(
            backend=self.backend, location=self.location, records=sum(namespaces.values()),
            namespaces=dict(sorted(namespaces.items())), embedding_model=self.embedding_model,
        )  # fmt: skip


__all__ = [
    "SHARED",
    "MemoryBusy",
    "MemoryHit",
    "MemoryRecord",
    "MemoryStats",
    "MemoryStore",
    "MemoryStoreError",
    "NewRecord",
    "Provenance",
    "Trust",
    "collection_name",
    "namespace_for_agent",
]
