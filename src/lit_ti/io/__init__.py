"""Embedding (and later hypernetwork) files: pure functions, no Lightning or Hydra."""

from lit_ti.io.embeddings import EmbeddingFile, load_embedding, read_embedding, save_embedding

__all__ = ["EmbeddingFile", "load_embedding", "read_embedding", "save_embedding"]
