"""`ConceptDataModule`: a folder of images -> cached VAE latents + prompt strings.

The datamodule never tokenizes and never owns a model: the method hands it an `encode` function (the frozen
VAE encoder) once, through `cache_latents`, before the first step. Each sample is then a cached latent and a
freshly drawn prompt, so a step costs no image decoding and no VAE pass.
"""

import math
import random
import warnings
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lit_ti.data import images as img
from lit_ti.data.sampler import EpochSampler
from lit_ti.data.templates import fill, load_templates, without_filewords
from lit_ti.errors import UserError

LATENT_SAMPLING = ("once", "deterministic", "random")

# encode(pixels [B, 3, H, W] in [-1, 1]) -> (mean, std), each [B, 4, H/8, W/8], already scaled
Encoder = Callable[[Tensor], tuple[Tensor, Tensor]]


class ConceptDataModule(L.LightningDataModule):
    """Images of one concept and the prompts that describe them.

    Args:
        dir: folder of training images; a sidecar `<stem>.txt` is the caption of `<stem>.<ext>`.
        name: the concept name written for `[name]` in the templates.
        template: a shipped template (`subject`, `subject_filewords`, `style`, `style_filewords`,
            `hypernetwork`, `none`) or a path to a text file with one prompt per line.
        resolution: training size in pixels; null = the backbone's native size.
        crop: `center` (keep aspect, crop the middle) or `squash` (A1111's plain resize).
        flip_p: probability of using the horizontally flipped image (both latents are cached).
        latent_sampling: `once` (one VAE sample per image, A1111's default), `deterministic` (the mean), or
            `random` (a fresh sample every step).
        filewords_regex / filewords_join: A1111's "filename word regex" and "join string".
        shuffle_tags / tag_dropout: shuffle or drop the comma-separated caption tags per sample.
        attention_maps: weight the loss by DreamArtist attention maps `<stem>_att.<ext>` where present
            (grey 0% -> 0, 50% -> 1, 100% -> 5), cropped like their image.
        alpha_weight: weight the loss by each image's alpha channel (transparent = not learned).
        batch_size, num_workers: DataLoader settings; batch_size is capped at images × repeats.
        repeats: how many times each image appears per epoch.
        seed: seed of the one-off latent sample of `once`.
    """

    def __init__(
        self,
        dir: str,
        name: str,
        template: str = "subject",
        resolution: int | None = None,
        crop: str = "center",
        flip_p: float = 0.0,
        latent_sampling: str = "once",
        filewords_regex: str | None = None,
        filewords_join: str = " ",
        shuffle_tags: bool = False,
        tag_dropout: float = 0.0,
        attention_maps: bool = True,
        alpha_weight: bool = False,
        batch_size: int = 1,
        num_workers: int = 0,
        repeats: int = 1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if latent_sampling not in LATENT_SAMPLING:
            raise UserError(f"data.latent_sampling={latent_sampling!r}: use one of {', '.join(LATENT_SAMPLING)}")
        if crop not in ("center", "squash"):
            raise UserError(f"data.crop={crop!r}: use 'center' or 'squash'")
        if resolution is not None and (resolution < 8 or resolution % 8):
            raise UserError(f"data.resolution={resolution}: use a multiple of 8 (the VAE's downscale), or null")
        if batch_size < 1 or repeats < 1 or num_workers < 0:
            raise UserError("data.batch_size and data.repeats must be >= 1, data.num_workers >= 0")
        if not 0 <= flip_p <= 1 or not 0 <= tag_dropout < 1:
            raise UserError("data.flip_p must lie in [0, 1] and data.tag_dropout in [0, 1)")
        self.dir = Path(dir).expanduser()
        self.name = name
        self.template = template
        self.resolution = resolution
        self.crop = crop
        self.flip_p = flip_p
        self.latent_sampling = latent_sampling
        self.filewords_regex = filewords_regex
        self.filewords_join = filewords_join
        self.shuffle_tags = shuffle_tags
        self.tag_dropout = tag_dropout
        self.attention_maps = attention_maps
        self.alpha_weight = alpha_weight
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.repeats = repeats
        self.seed = seed
        self.paths: list[Path] = []
        self.captions: list[str] = []
        self.templates: list[str] = []
        self.plain_templates: list[str] = []  # the same lines without [filewords]
        self.latents: tuple[Tensor, Tensor] | None = None  # (mean, std): [N, V, 4, h, w], V = 2 with flips
        self.weights: Tensor | None = None  # [N, V, 1, h, w] loss weight at latent size, None = all 1
        self.pixels: Tensor | None = None  # [N, V, 3, H, W] uint8, kept only when a method asks

    def setup(self, stage: str | None = None) -> None:
        """Scan the folder and read captions and templates; fails early on bad input."""
        if self.paths:
            return
        self.templates = load_templates(self.template)
        self.plain_templates = without_filewords(self.template, self.templates)
        self.paths = img.list_images(self.dir)
        self.captions = [img.caption(p, self.filewords_regex, self.filewords_join) for p in self.paths]
        if any("[filewords]" in t for t in self.templates) and not any(self.captions):
            raise UserError(
                f"data.template={self.template!r} uses [filewords] but no image in {self.dir} has a caption; "
                "add <image>.txt files, name the images after their content, or use a template without it"
            )

    @torch.no_grad()
    def cache_latents(self, encode: Encoder, resolution: int, batch_size: int = 8, keep_pixels: bool = False) -> None:
        """Run the VAE encoder once over every image (and its mirror image when flipping).

        keep_pixels: also keep the cropped images (uint8) for methods with a pixel-space loss.
        """
        self.setup()
        size = self.resolution or resolution
        pixels, weights, kept_paths, kept_captions, broken = [], [], [], [], []
        small = []
        for path, text in zip(self.paths, self.captions):
            try:
                image = img.load_image(path)
                if min(image.size) * 2 < size:
                    small.append(f"{img.display(path)} ({image.width}x{image.height})")
                pixels.append(img.to_tensor(img.resize(image, size, self.crop)))
                weights.append(img.load_weight(path, size, self.crop, self.attention_maps, self.alpha_weight))
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                pixels = pixels[: len(kept_paths)]
                broken.append(f"{img.display(path)} ({e})")
                continue
            kept_paths.append(path)
            kept_captions.append(text)
        if broken:
            warnings.warn(f"data.dir: skipped {len(broken)} unreadable image(s): {'; '.join(broken)}", stacklevel=2)
        if small:
            warnings.warn(
                f"data.dir: {len(small)} image(s) upscaled more than 2x to {size}px, so they will look blurry "
                f"to the model: {', '.join(small)}; use larger images or a smaller data.resolution",
                stacklevel=2,
            )
        if not pixels:
            raise UserError(f"data.dir: no image in {self.dir} could be decoded: {'; '.join(broken)}")
        self.paths, self.captions = kept_paths, kept_captions
        x = torch.stack(pixels)  # [N, 3, H, W]
        views = [x, x.flip(-1)] if self.flip_p > 0 else [x]
        means, stds = [], []
        for view in views:
            parts = [encode(view[i : i + batch_size]) for i in range(0, len(view), batch_size)]
            means.append(torch.cat([m for m, _ in parts]).float().cpu())
            stds.append(torch.cat([s for _, s in parts]).float().cpu())
        mean, std = torch.stack(means, 1), torch.stack(stds, 1)  # [N, V, 4, h, w]
        self.weights = None
        if any(w is not None for w in weights):
            w = torch.stack([torch.ones(1, size, size) if w is None else w for w in weights])  # [N, 1, H, W]
            w = torch.nn.functional.interpolate(w, size=mean.shape[-2:], mode="area")  # mean over each 8x8 cell
            self.weights = torch.stack([w, w.flip(-1)] if self.flip_p > 0 else [w], 1)
        self.pixels = None
        if keep_pixels:
            self.pixels = torch.stack([((v + 1) * 127.5).round().to(torch.uint8) for v in views], 1)
        if self.latent_sampling == "deterministic":
            std = torch.zeros_like(std)
        elif self.latent_sampling == "once":
            noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(self.seed))
            mean, std = mean + std * noise, torch.zeros_like(std)
        self.latents = (mean, std)

    def train_dataloader(self) -> DataLoader:
        if self.latents is None:
            raise RuntimeError("ConceptDataModule.cache_latents must run before training (the method calls it)")
        dataset = _ConceptDataset(self)
        if self.batch_size > len(dataset):
            warnings.warn(
                f"data.batch_size={self.batch_size} is more than the {len(dataset)} samples per epoch; using "
                f"{len(dataset)} (raise data.repeats to keep the batch size)",
                stacklevel=2,
            )
        rank, world = self._shard()
        per_rank = len(dataset) // world
        if per_rank < 1:
            raise UserError(
                f"data.repeats: {len(dataset)} samples per epoch cannot feed {world} processes; raise data.repeats"
            )
        batch_size = min(self.batch_size, per_rank)
        sampler = EpochSampler(
            len(dataset),
            self.seed,
            start=lambda: self._resume_point(per_rank, batch_size, world),
            rank=rank,
            world_size=world,
        )
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            drop_last=True,
            # worker seeds from their own generator: creating an iterator never draws from the global RNG
            generator=torch.Generator().manual_seed(self.seed),
        )

    def _shard(self) -> tuple[int, int]:
        """(rank, world size) of this process; the EpochSampler shards itself (see data/sampler.py)."""
        trainer = self.trainer
        if trainer is None or trainer.world_size == 1:
            return 0, 1
        if trainer._accelerator_connector.use_distributed_sampler:
            raise UserError(
                "trainer.use_distributed_sampler=true: lit_ti's sampler shards the data across processes itself "
                "(so that N processes equal one with N times the batch); set trainer.use_distributed_sampler=false"
            )
        return trainer.global_rank, trainer.world_size

    def _resume_point(self, samples: int, batch_size: int, world_size: int = 1) -> tuple[int, int] | None:
        """(epoch, global sample position) of the trainer's next batch, from its optimizer-step count
        (restored on resume); every checkpoint is taken at an optimizer-step boundary. `samples` are one
        rank's samples per epoch."""
        trainer = self.trainer
        if trainer is None:
            return None
        batches = samples // batch_size
        limit = trainer.limit_train_batches  # what Lightning cuts an epoch to (an int, or a share as a float)
        batches = min(batches, limit) if isinstance(limit, int) else max(1, int(batches * limit))
        steps_per_epoch = math.ceil(batches / trainer.accumulate_grad_batches)
        epoch, step = divmod(trainer.global_step, steps_per_epoch)
        return epoch, step * trainer.accumulate_grad_batches * batch_size * world_size


class _ConceptDataset(Dataset):
    """Cached latents + a prompt drawn per fetch (template line, tag shuffle/dropout)."""

    def __init__(self, dm: ConceptDataModule) -> None:
        self.mean, self.std = dm.latents
        self.weights, self.pixels = dm.weights, dm.pixels
        self.captions = dm.captions
        self.templates, self.plain_templates = dm.templates, dm.plain_templates
        self.name = dm.name
        self.flip_p, self.shuffle, self.dropout = dm.flip_p, dm.shuffle_tags, dm.tag_dropout
        self.repeats = dm.repeats

    def __len__(self) -> int:
        return len(self.captions) * self.repeats

    def __getitem__(self, item: tuple[int, int] | int) -> dict:
        index, seed = item if isinstance(item, tuple) else (item, item)
        i = index % len(self.captions)
        # every draw from the sample's own seed (see EpochSampler): resumes replay the same prompts and noise
        g = torch.Generator().manual_seed(seed)
        view = int(self.mean.shape[1] > 1 and torch.rand((), generator=g) < self.flip_p)
        std = self.std[i, view]
        latents = self.mean[i, view] + std * torch.randn(std.shape, generator=g)
        k = int(torch.randint(len(self.templates), (), generator=g))
        line = self.templates[k]
        rng = random.Random(seed)
        prompt = fill(line, self.name, self.captions[i], rng, self.shuffle, self.dropout)
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
            sample["weight"] = self.weights[i, view]  # [1, h, w]
        if self.pixels is not None:
            sample["pixels"] = self.pixels[i, view].float() / 127.5 - 1  # [3, H, W] in [-1, 1]
        return sample
