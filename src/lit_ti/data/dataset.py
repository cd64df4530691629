"""`ConceptDataset`: cached latents + a prompt drawn per fetch (template line, tag shuffle/dropout)."""

import random

import torch
from torch import Tensor
from torch.utils.data import Dataset

from lit_ti.data.templates import fill


class ConceptDataset(Dataset):
    """Samples of a `ConceptDataModule` whose latents are cached; images may differ in size (buckets), so a
    batch must come from one bucket (the EpochSampler sees to it)."""

    def __init__(self, dm) -> None:
        self.mean: list[Tensor] = dm.mean  # per image [V, 4, h, w]
        self.std: list[Tensor] | None = dm.std  # None: sampling already applied (std 0)
        self.weights, self.pixels = dm.weight_list, dm.pixel_list
        self.captions = dm.captions
        self.templates, self.plain_templates = dm.templates, dm.plain_templates
        self.name = dm.name
        self.flip_p, self.shuffle, self.dropout, self.keep = dm.flip_p, dm.shuffle_tags, dm.tag_dropout, dm.keep_tokens
        self.repeats = dm.repeats
        self.prior = dm.prior  # PriorImages or None

    def __len__(self) -> int:
        return len(self.captions) * self.repeats

    def __getitem__(self, item: tuple[int, int] | int) -> dict:
        index, seed = item if isinstance(item, tuple) else (item, item)
        i = index % len(self.captions)
        # every draw from the sample's own seed (see EpochSampler): resumes replay the same prompts and noise
        g = torch.Generator().manual_seed(seed)
        mean = self.mean[i]
        view = int(mean.shape[0] > 1 and torch.rand((), generator=g) < self.flip_p)
        latents = mean[view]
        noise = torch.randn(latents.shape, generator=g)  # drawn in every mode, so the draws after it never move
        if self.std is not None:
            latents = latents + self.std[i][view] * noise
        k = int(torch.randint(len(self.templates), (), generator=g))
        line = self.templates[k]
        rng = random.Random(seed)
        prompt = fill(line, self.name, self.captions[i], rng, self.shuffle, self.dropout, self.keep)
        sample = {
            # the step's noise and timestep come from this seed (the method draws them), so they depend on the
            # sample, not on the process or the batch it lands in: DDP ranks and resumes reproduce them
            "noise_seed": int(torch.randint(2**62, (), generator=g)),
            "latents": latents,  # [4, h, w]
            "prompt": prompt,
            "template": line,
            "template_plain": self.plain_templates[k],
            "caption": self.captions[i],
            "index": i,
        }
        if self.weights is not None:
            sample["weight"] = self.weights[i][view]  # [1, h, w]
        if self.pixels is not None:
            sample["pixels"] = self.pixels[i][view].float() / 127.5 - 1  # [3, H, W] in [-1, 1]
        if self.prior is not None:  # drawn last: the sample's other draws are those of a run without a prior
            sample |= self.prior.draw(g)
        return sample
