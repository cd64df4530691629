"""Exponential moving average of the embedding bank's vectors (DreamArtist's EMA with reset).

Only the trainable vectors have a shadow, never the frozen model. The shadows are buffers, so Lightning
checkpoints carry them and a resumed run continues the same average.
"""

import torch
from torch import nn

from lit_ti.modules.embedding_bank import EmbeddingBank


class BankEMA(nn.Module):
    """Per concept: `shadow ← β·shadow + (1 − β)·θ` after every optimizer step and, every `reset_every`
    steps, `θ ← shadow` (the live vectors jump to the average; the optimizer's moments are kept).

    Args:
        bank: the bank whose vectors are averaged.
        settings: `{concept name: (β, reset_every)}`; β = 1 means no EMA for that concept; reset_every 0
            means never reset.
    """

    def __init__(self, bank: EmbeddingBank, settings: dict[str, tuple[float, int]]) -> None:
        super().__init__()
        self.decay: dict[str, float] = {}
        self.reset_every: dict[str, int] = {}
        self.keys: dict[str, list[str]] = {}  # concept -> its bank keys
        for name, (beta, every) in settings.items():
            if not 0 <= beta <= 1 or every < 0:
                raise ValueError(f"EMA of {name!r}: decay must lie in [0, 1] and reset_every be >= 0")
            if beta == 1:
                continue
            self.decay[name], self.reset_every[name] = beta, every
            self.keys[name] = [bank.key(name, enc) for enc in bank.get(name)]
            for key in self.keys[name]:
                self.register_buffer(key, bank.vectors[key].detach().clone())

    @torch.no_grad()
    def update(self, bank: EmbeddingBank, step: int) -> None:
        """After optimizer step number `step` (1-based)."""
        for name, keys in self.keys.items():
            beta, every = self.decay[name], self.reset_every[name]
            for key in keys:
                shadow, live = getattr(self, key), bank.vectors[key]
                shadow.lerp_(live.detach(), 1 - beta)
                if every and step % every == 0:
                    live.copy_(shadow)

    def shadows(self) -> dict[str, torch.Tensor]:
        """`{bank key: [n, d]}`: every average, keyed as the bank's vectors (for `swapped`)."""
        return {key: getattr(self, key) for keys in self.keys.values() for key in keys}

    def averaged(self, bank: EmbeddingBank, name: str) -> dict[str, torch.Tensor]:
        """`{encoder: [n, d]}`: the shadow where the concept has one, else the live vectors."""
        live = bank.get(name)
        if name not in self.keys:
            return live
        return {enc: getattr(self, bank.key(name, enc)) for enc in live}
