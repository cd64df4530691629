"""Embedding and hypernetwork files: pure functions, no Lightning or Hydra."""

from lit_ti.io.embeddings import (
    EmbeddingFile,
    load_embedding,
    read_embedding,
    save_embedding,
    save_image_embedding,
)
from lit_ti.io.hypernetworks import load_hypernetwork, save_hypernetwork

__all__ = [
    "EmbeddingFile",
    "load_embedding",
    "load_hypernetwork",
    "read_embedding",
    "save_embedding",
    "save_hypernetwork",
    "save_image_embedding",
]
