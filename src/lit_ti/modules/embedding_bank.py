"""The trainable part of textual inversion: `[n, d]` vectors per concept name and text encoder.

Nothing frozen is modified. The vectors are spliced into the output of each text encoder's token-embedding
layer at the positions where the concept name stood in the prompt (the A1111 / original-TI approach), so the
optimizer holds only these few vectors: no full-vocabulary AdamW and no per-step restore of frozen rows.

Vectors are keyed by encoder (`text_encoder`; SDXL adds `text_encoder_2`), so one concept can own a
`clip_l` and a `clip_g` part, and several concepts (DreamArtist's positive and negative) share one bank.
"""

from contextlib import contextmanager

import torch
from torch import Tensor, nn

MAX_VECTORS = 75  # one CLIP chunk holds 75 tokens between BOS and EOS


class EmbeddingBank(nn.Module):
    """Concept vectors, always fp32 (the frozen model may run in bf16/fp16)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []
        # key "<encoder>__<concept index>": concept names may hold characters a module key cannot.
        self.vectors = nn.ParameterDict()

    def add(self, name: str, vectors: dict[str, Tensor]) -> None:
        """Register `name` with its initial vectors `{encoder: [n, d]}` (same n for every encoder)."""
        counts = {v.shape[0] for v in vectors.values()}
        if name in self.names:
            raise ValueError(f"concept {name!r} is already in the bank")
        if len(counts) != 1 or any(v.dim() != 2 for v in vectors.values()):
            raise ValueError(f"concept {name!r}: every encoder needs a [n, d] tensor with the same n")
        self.names.append(name)
        for encoder, v in vectors.items():
            self.vectors[self.key(name, encoder)] = nn.Parameter(v.detach().to(torch.float32).clone())

    def key(self, name: str, encoder: str) -> str:
        """The `vectors` key of one concept's part for one encoder."""
        return f"{encoder}__{self.names.index(name)}"

    def encoders(self) -> list[str]:
        return sorted({key.rsplit("__", 1)[0] for key in self.vectors})

    def get(self, name: str) -> dict[str, Tensor]:
        """`{encoder: [n, d]}` for one concept (live parameters)."""
        return {e: self.vectors[self.key(name, e)] for e in self.encoders() if self.key(name, e) in self.vectors}

    def num_vectors(self, name: str) -> int:
        return next(iter(self.get(name).values())).shape[0]

    def table(self, encoder: str) -> Tensor:
        """All concepts' vectors for one encoder, stacked in bank order: `[sum n, d]`. A concept without a part
        for this encoder (an SD3 concept trained without T5) holds zero rows there, which no prompt uses."""
        parts = {name: self.vectors[self.key(name, encoder)] for name in self.names if encoder in self.get(name)}
        like = next(iter(parts.values()))
        return torch.cat([parts.get(n, like.new_zeros(self.num_vectors(n), like.shape[1])) for n in self.names])

    def offsets(self) -> dict[str, int]:
        """Row where each concept starts in `table()`."""
        offsets, start = {}, 0
        for name in self.names:
            offsets[name] = start
            start += self.num_vectors(name)
        return offsets


@contextmanager
def swapped(bank: EmbeddingBank, vectors: dict[str, Tensor]):
    """Temporarily give the bank other vectors (`{bank key: [n, d]}`, e.g. the initial ones or an average)."""
    saved = {k: v.detach().clone() for k, v in bank.vectors.items()}
    with torch.no_grad():
        for k, v in vectors.items():
            bank.vectors[k].copy_(v)
    try:
        yield
    finally:
        with torch.no_grad():
            for k, v in saved.items():
                bank.vectors[k].copy_(v)
