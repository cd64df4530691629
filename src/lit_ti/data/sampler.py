"""`EpochSampler`: shuffled sample order and per-sample seeds as pure functions of (seed, epoch, position).

Why not `shuffle=True`: Lightning resumes a run that stopped mid-epoch by iterating a fresh DataLoader and
ending the epoch early, so a plain shuffle replays the wrong samples, and the per-sample draws (flip, template
line, latent noise) come from whatever the global RNG holds after the DataLoader's prefetch. Here the order of
epoch e and the seed of every sample are fixed by (seed, e, position), and a pass that begins mid-epoch starts
at the right position, so a resumed run sees exactly the batches an uninterrupted one would.

Under DDP the sampler shards itself: rank r of W takes positions r, r + W, r + 2W, ... of the one global order,
so at every step the W ranks' batches of b together are exactly the batch of W·b a single process would take
(with the same sample seeds, hence the same noise). Lightning's own `DistributedSamplerWrapper` is switched off
(`trainer.use_distributed_sampler: false`): it would re-shard a list whose length changes on resume.
"""

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import Sampler

# () -> (epoch, position) where the next pass begins, or None to count passes from 0
Start = Callable[[], tuple[int, int] | None]


class EpochSampler(Sampler[tuple[int, int]]):
    """Yields `(index, sample_seed)` for `n` samples, reshuffled every epoch.

    Args:
        n: samples per epoch.
        seed: run seed; the same seed gives the same order and sample seeds.
        start: where the next pass begins, as a position in the global order (the datamodule derives it
            from the trainer's step count).
        rank, world_size: this process's shard (DDP); each rank yields `n // world_size` samples per epoch.
    """

    def __init__(self, n: int, seed: int = 0, start: Start | None = None, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.n = n
        self.seed = seed
        self.start = start
        self.rank = rank
        self.world_size = world_size
        self.passes = 0

    def __len__(self) -> int:
        return self.n // self.world_size

    def epoch(self, epoch: int) -> tuple[list[int], list[int]]:
        """The order and the sample seeds of one epoch."""
        g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
        order = torch.randperm(self.n, generator=g)
        seeds = torch.randint(2**62, (self.n,), generator=g)
        return order.tolist(), seeds.tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        where = self.start() if self.start is not None else None
        epoch, position = where if where is not None else (self.passes, 0)
        self.passes = epoch + 1
        order, seeds = self.epoch(epoch)
        end = len(self) * self.world_size  # every rank gets as many samples (the remainder is dropped)
        shard = slice(position + self.rank, end, self.world_size)
        yield from zip(order[shard], seeds[shard])
