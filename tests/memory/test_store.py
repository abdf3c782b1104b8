"""Long-term memory with the real embedding model: recall, provenance, isolation, restart, locking."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from llmos.config import Config, MemoryConfig
from llmos.memory.embeddings import OnnxEmbeddingFunction
from llmos.memory.store import MemoryBusy, MemoryStore, MemoryStoreError, NewRecord, collection_name

# (stored text, a query that paraphrases it): distinct topics, few shared words.
PARAPHRASES = [
    (
        "The Wi-Fi password for the office is printed under the router.",
        "Where can I find the wireless key at work?",
    ),
    ("My daughter is allergic to peanuts.", "Which food gives my kid an allergic reaction?"),
    (
        "The quarterly report is due on the last Friday of March.",
        "When must the Q1 financial summary be handed in?",
    ),
    ("Our dog Biscuit needs his heartworm pill every month.", "How often does the puppy take his medicine?"),
    (
        "The spare house key is hidden inside the fake rock by the porch.",
        "Where did we stash the extra key to the home?",
    ),
    ("Grandma's lasagna recipe uses ricotta and fresh basil.", "What cheese goes into granny's pasta bake?"),
    (
        "The car's oil was last changed at 42,000 miles.",
        "At what odometer reading was the engine lubricant replaced?",
    ),
    (
        "Flight BA117 to New York departs from Heathrow terminal 5.",
        "Which airport terminal does my plane to NYC leave from?",
    ),
    (
        "The production database is backed up nightly at 2 a.m.",
        "What time do the server snapshots of our data run?",
    ),
    ("I prefer my coffee black with no sugar.", "How do I like to take my morning brew?"),
    (
        "The team stand-up meeting happens at 9:30 every weekday.",
        "At what time does the group get together each morning?",
    ),
    (
        "Photosynthesis turns sunlight, water and carbon dioxide into sugar.",
        "How do plants make food from light?",
    ),
    (
        "The Treaty of Versailles ended the First World War in 1919.",
        "Which agreement concluded the Great War?",
    ),
    (
        "Python's GIL prevents threads from running bytecode in parallel.",
        "Why can't multiple threads execute code simultaneously in CPython?",
    ),
    ("The apartment lease expires on the thirtieth of June.", "When does my rental contract run out?"),
    ("Mount Everest is the highest mountain above sea level.", "What is the tallest peak on Earth?"),
    (
        "Water boils at 100 degrees Celsius at sea level.",
        "At what temperature does H2O start to bubble into steam?",
    ),
    ("The dentist appointment was moved to Thursday afternoon.", "When is my teeth check-up now scheduled?"),
    ("Alice's phone number ends in 4471.", "What are the last digits of Alice's mobile?"),
    (
        "The garden tomatoes need watering twice a day in July.",
        "How often should the vegetable plants be irrigated in midsummer?",
    ),
    (
        "Bitcoin uses proof of work to secure its blockchain.",
        "What consensus mechanism protects the original cryptocurrency?",
    ),
    ("The museum is closed on Mondays.", "Which day of the week can't we visit the gallery?"),
    ("Our wedding anniversary is on September 14th.", "What date did my spouse and I get married?"),
    (
        "The printer on the third floor keeps jamming with thick paper.",
        "Which office copier has trouble with heavy card stock?",
    ),
    ("The violin lessons cost forty dollars per hour.", "How much is the hourly fee for fiddle classes?"),
    ("Insulin regulates the amount of glucose in the blood.", "Which hormone controls blood sugar levels?"),
    (
        "The marathon route passes over the Brooklyn Bridge at mile 13.",
        "Where does the long-distance race cross the river halfway?",
    ),
    ("Tom is vegetarian and does not eat fish either.", "Does Tom avoid meat and seafood?"),
    ("The SSL certificate for example.org expires next week.", "When does the website's HTTPS cert run out?"),
    (
        "The library fine for a late book is ten cents a day.",
        "What is the daily penalty for returning a borrowed novel late?",
    ),
    (
        "The basement flooded after the storm last spring.",
        "Which part of the house got water damage from the heavy rain?",
    ),
    (
        "Kubernetes restarts a container when its liveness probe fails.",
        "What happens to a pod whose health check keeps failing?",
    ),
]


def test_paraphrase_recall_ranks_the_right_record_first(store: MemoryStore) -> None:
    ids = store.add_many(
        [NewRecord(text=t, namespace="agent:a", source="test", trust="user") for t, _ in PARAPHRASES]
    )
    misses = []
    for (text, query), expected in zip(PARAPHRASES, ids, strict=True):
        hits = store.search(query, namespaces=["agent:a"], k=3)
        if hits[0].id != expected:
            misses.append((query, text, hits[0].text))
    assert not misses, misses
    assert len(PARAPHRASES) >= 30


def test_provenance_metadata_get_delete_count(store: MemoryStore) -> None:
    rid = store.add(
        "Deploys happen on Tuesdays.", namespace="agent:ops", source="chat", trust="user", pid=7,
        metadata={"kind": "fact", "priority": 2},
    )  # fmt: skip
    other = store.add("Rollbacks need approval.", namespace="agent:ops", source="web", trust="web", pid=None)
    hit = store.search("which day do we ship releases", namespaces=["agent:ops"], k=1)[0]
    assert hit.id == rid
    assert (hit.provenance.pid, hit.provenance.source, hit.provenance.trust) == (7, "chat", "user")
    assert hit.provenance.time > 0
    assert hit.metadata == {"kind": "fact", "priority": 2}
    assert 0.0 < hit.score <= 1.0
    # where filters on user metadata
    only_web = store.search("deploy", namespaces=["agent:ops"], k=5, where={"kind": {"$ne": "fact"}})
    assert [h.id for h in only_web] == [other]
    assert store.get(other) is not None and store.get(other).provenance.pid is None  # type: ignore[union-attr]
    assert store.count() == 2 and store.count("agent:ops") == 2 and store.count("agent:none") == 0
    # an explicit id replaces
    store.add(
        "Deploys happen on Wednesdays.", namespace="agent:ops", source="chat", trust="user", pid=7, id=rid
    )
    assert store.get(rid).text == "Deploys happen on Wednesdays."  # type: ignore[union-attr]
    store.delete(rid)
    assert store.get(rid) is None and store.count() == 1


def test_namespaces_isolate_agents_and_share_shared(store: MemoryStore) -> None:
    store.add(
        "Agent A's secret plan is to reorganise the archive.",
        namespace="agent:a",
        source="t",
        trust="model",
        pid=1,
    )
    store.add(
        "Everyone may use the shared scratch bucket.", namespace="shared", source="t", trust="user", pid=None
    )
    seen_by_b = store.search("secret plan archive", namespaces=["agent:b", "shared"], k=5)
    assert [h.namespace for h in seen_by_b] == ["shared"]
    assert store.search("anything", namespaces=[], k=5) == []
    stats = store.stats()
    assert (
        stats.namespaces == {"agent:a": 1, "shared": 1} and stats.records == 2 and stats.backend == "embedded"
    )


def test_bad_input_is_refused_with_a_clear_error(store: MemoryStore) -> None:
    with pytest.raises(MemoryStoreError, match="reserved"):
        store.add("x", namespace="n", source="s", trust="user", pid=None, metadata={"namespace": "other"})
    with pytest.raises(MemoryStoreError, match="use str, int, float or bool"):
        store.add("x", namespace="n", source="s", trust="user", pid=None, metadata={"tags": ["a", "b"]})
    with pytest.raises(MemoryStoreError, match="needs a namespace"):
        store.add("x", namespace="", source="s", trust="user", pid=None)
    with pytest.raises(MemoryStoreError, match="same id"):
        store.add_many([NewRecord(text="a", namespace="n", source="s", trust="user", id="dup")] * 2)


def test_memory_survives_a_restart(config: Config, embedder: OnnxEmbeddingFunction) -> None:
    first = MemoryStore.open(config, embedder=embedder)
    rid = first.add(
        "The boiler was serviced in October.", namespace="shared", source="t", trust="user", pid=3
    )
    first.close()
    again = MemoryStore.open(config, embedder=embedder)
    try:
        hits = again.search("when was the heating system maintained", namespaces=["shared"], k=1)
        assert hits[0].id == rid and hits[0].provenance.pid == 3
    finally:
        again.close()


def test_persisted_collection_reopens_by_its_registered_embedding_function(
    config: Config, embedder: OnnxEmbeddingFunction
) -> None:
    """A fresh process opens the collection with plain chromadb: the embedding function is
    rebuilt from its persisted config because llmos registered it."""
    with MemoryStore.open(config, embedder=embedder) as memory:
        memory.add("Cats purr when they are content.", namespace="shared", source="t", trust="user", pid=None)
    code = textwrap.dedent(
        f"""
        import chromadb
        import llmos.memory.embeddings  # registers the embedding function
        client = chromadb.PersistentClient(path={str(config.home / "memory")!r})
        col = client.get_collection({collection_name("shared")!r})
        print(type(col.configuration["embedding_function"]).__name__)
        found = col.query(query_texts=["a happy kitten makes a rumbling sound"], n_results=1)
        print(found["documents"][0][0])
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.splitlines()[-2:] == ["OnnxEmbeddingFunction", "Cats purr when they are content."]


def test_second_opener_gets_memory_busy_not_a_hang(config: Config, store: MemoryStore) -> None:
    # Another process: fails at once with the owner's pid and the fix (the timeout only guards a hang).
    code = textwrap.dedent(
        """
        from llmos.config import load_config
        from llmos.memory.store import MemoryBusy, MemoryStore
        try:
            MemoryStore.open(load_config())
        except MemoryBusy as exc:
            print("BUSY", exc)
        """
    )
    env = {**os.environ, "LLMOS_HOME": str(config.home)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.stdout.startswith("BUSY"), out.stderr
    assert f"process {os.getpid()}" in out.stdout and "memory.chroma_url" in out.stdout
    # The same process opening it twice is refused too.
    with pytest.raises(MemoryBusy):
        MemoryStore.open(config)


def test_lock_is_released_on_close(config: Config, embedder: OnnxEmbeddingFunction) -> None:
    MemoryStore.open(config, embedder=embedder).close()
    MemoryStore.open(config, embedder=embedder).close()


def test_bad_chroma_url_and_dead_server_are_user_errors(
    config: Config, embedder: OnnxEmbeddingFunction
) -> None:
    bad = config.model_copy(update={"memory": MemoryConfig(chroma_url="localhost:8000")})
    with pytest.raises(MemoryStoreError, match="not an http"):
        MemoryStore.open(bad, embedder=embedder)
    dead = config.model_copy(update={"memory": MemoryConfig(chroma_url="http://127.0.0.1:9")})
    with pytest.raises(MemoryStoreError, match="does not answer"):
        MemoryStore.open(dead, embedder=embedder)


def test_missing_embedding_model_says_how_to_fetch_it(tmp_path: Path) -> None:
    from llmos.memory.embeddings import EmbeddingModelError

    with pytest.raises(EmbeddingModelError, match="llmos models pull"):
        OnnxEmbeddingFunction(tmp_path)


def test_export_yields_every_record(store: MemoryStore) -> None:
    store.add_many(
        [NewRecord(text=f"note {i}", namespace="shared", source="t", trust="tool") for i in range(5)]
    )
    store.add("mine", namespace="agent:x", source="t", trust="model", pid=2)
    records = list(store.export())
    assert sorted(r.text for r in records) == ["mine"] + [f"note {i}" for i in range(5)]
    assert [r.text for r in store.export("agent:x")] == ["mine"]


def test_precomputed_embeddings_are_used(store: MemoryStore, embedder: OnnxEmbeddingFunction) -> None:
    texts = ["red apples", "blue ocean"]
    vectors = embedder.embed(texts)
    store.add_many(
        [NewRecord(text=t, namespace="n", source="t", trust="tool") for t in texts], embeddings=vectors
    )
    assert store.search("sea water", namespaces=["n"], k=1)[0].text == "blue ocean"
    with pytest.raises(MemoryStoreError, match="embeddings for"):
        store.add_many([NewRecord(text="x", namespace="n", source="t", trust="tool")], embeddings=vectors)


def test_chroma_server_path(chroma_server: str, config: Config, embedder: OnnxEmbeddingFunction) -> None:
    """Through a real `chroma run`: two stores at once (no lock), and data outlives the clients."""
    remote = config.model_copy(update={"memory": MemoryConfig(chroma_url=chroma_server)})
    one = MemoryStore.open(remote, embedder=embedder)
    two = MemoryStore.open(remote, embedder=embedder)
    try:
        rid = one.add(
            "The on-call rota changes every Sunday night.",
            namespace="agent:s",
            source="t",
            trust="user",
            pid=9,
        )
        hits = two.search("when does the pager duty schedule rotate", namespaces=["agent:s"], k=1)
        assert hits[0].id == rid and hits[0].provenance.pid == 9
        assert two.stats().backend == "server"
    finally:
        one.close()
        two.close()
    with MemoryStore.open(remote, embedder=embedder) as again:
        assert again.get(rid) is not None
        again.delete(rid)
