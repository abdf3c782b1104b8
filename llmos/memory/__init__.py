"""Memory devices: long-term memory on chromadb (store.py) with offline embeddings
(embeddings.py), and the context window manager (context.py)."""

from llmos.memory.context import (
    MEMORY_TOOL_SPECS,
    ContextBudget,
    ContextError,
    ContextWindow,
    Summarizer,
    ToolAnswer,
    llm_summarizer,
)
from llmos.memory.embeddings import OnnxEmbeddingFunction
from llmos.memory.store import (
    SHARED,
    MemoryBusy,
    MemoryHit,
    MemoryRecord,
    MemoryStats,
    MemoryStore,
    MemoryStoreError,
    NewRecord,
    Provenance,
    Trust,
    namespace_for_agent,
)

__all__ = [
    "MEMORY_TOOL_SPECS",
    "SHARED",
    "ContextBudget",
    "ContextError",
    "ContextWindow",
    "MemoryBusy",
    "MemoryHit",
    "MemoryRecord",
    "MemoryStats",
    "MemoryStore",
    "MemoryStoreError",
    "NewRecord",
    "OnnxEmbeddingFunction",
    "Provenance",
    "Summarizer",
    "ToolAnswer",
    "Trust",
    "llm_summarizer",
    "namespace_for_agent",
]
