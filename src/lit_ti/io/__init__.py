"""Embedding, hypernetwork and LoRA files: pure functions, no Lightning or Hydra."""

from lit_ti.io.embeddings import (
    EmbeddingFile,
    load_embedding,
    read_embedding,
    save_embedding,
    save_image_embedding,
)
from lit_ti.io.hypernetworks import load_hypernetwork, save_hypernetwork
from lit_ti.io.loras import read_lora, save_diffusers_lora, save_lora

__all__ = [
    "EmbeddingFile",
    "load_embedding",
    "load_hypernetwork",
    "read_embedding",
    "read_lora",
    "save_diffusers_lora",
    "save_embedding",
    "save_hypernetwork",
    "save_image_embedding",
    "save_lora",
]
