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

With aspect-ratio buckets (`groups`), an epoch is a shuffled list of *global batches* of `batch` = W·b samples,
each from one bucket: every bucket's samples are shuffled and cut into global batches, a bucket's last batch
filled up with its own first samples (so every image is seen each epoch and every batch is full, which DDP's
gradient average needs), and the batches are shuffled. Flattened, this is again one global order whose
positions k·W·b .. (k+1)·W·b - 1 hold batch k, so the same rank-strided shards and resume positions apply:
rank r's k-th batch of b is its share of global batch k, from one bucket.
"""

from collections import Counter
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
        rank, world_size: this process's shard (DDP); each rank yields `n // world_size` samples per epoch
            (with buckets: a padded count, see `total`).
        groups: the bucket of every sample (null = no buckets: one shuffled order).
        batch: the global batch (world_size × the per-rank batch); with `groups`, every batch is from one bucket.
    """

    def __init__(
        self,
        n: int,
        seed: int = 0,
        start: Start | None = None,
        rank: int = 0,
        world_size: int = 1,
        groups: list[int] | None = None,
        batch: int = 1,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if groups is not None and (len(groups) != n or batch % world_size):
            raise ValueError(f"{len(groups)} groups for {n} samples, or batch {batch} not a multiple of {world_size}")
        self.n = n
        self.groups = groups
        self.batch = batch
        self.seed = seed
        self.start = start
        self.rank = rank
        self.world_size = world_size
        self.passes = 0

    @property
    def total(self) -> int:
        """Samples in one epoch's global order (with buckets: each bucket padded to whole global batches)."""
        if self.groups is None:
            return self.n
        sizes = Counter(self.groups).values()
        return sum(-(-size // self.batch) * self.batch for size in sizes)

    def __len__(self) -> int:
        return self.total // self.world_size

    def epoch(self, epoch: int) -> tuple[list[int], list[int]]:
        """The order and the sample seeds of one epoch."""
        g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
        if self.groups is None:
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = self._bucketed(g)
        seeds = torch.randint(2**62, (len(order),), generator=g)
        return order, seeds.tolist()

    def _bucketed(self, g: torch.Generator) -> list[int]:
        """Global batches of `batch` samples, each from one bucket, in shuffled order, flattened."""
        members: dict[int, list[int]] = {}
        for i, group in enumerate(self.groups):
            members.setdefault(group, []).append(i)
        batches = []
        for group in sorted(members):
            items = [members[group][k] for k in torch.randperm(len(members[group]), generator=g).tolist()]
            while len(items) % self.batch:  # fill the last batch with this bucket's own first samples
                items += items[: self.batch - len(items) % self.batch]
            batches += [items[k : k + self.batch] for k in range(0, len(items), self.batch)]
        return [i for k in torch.randperm(len(batches), generator=g).tolist() for i in batches[k]]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        where = self.start() if self.start is not None else None
        epoch, position = where if where is not None else (self.passes, 0)
        self.passes = epoch + 1
        order, seeds = self.epoch(epoch)
        end = len(self) * self.world_size  # every rank gets as many samples (the remainder is dropped)
        shard = slice(position + self.rank, end, self.world_size)
        yield from zip(order[shard], seeds[shard])
