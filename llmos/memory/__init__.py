"""The memory device: long-term memory on chromadb (store.py) with offline embeddings
(embeddings.py), and the context window manager programs lay out their prompts with (context.py).

Nothing is imported here: chromadb takes most of a second to import, and `llmos --help` should not.
"""
