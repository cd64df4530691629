"""`ConceptDataModule`: a folder of images -> cached VAE latents + prompt strings.

The datamodule never tokenizes and never owns a model: the method hands it an `encode` function (the frozen
VAE encoder) once, through `cache_latents`, before the first step. Each sample is then a cached latent and a
freshly drawn prompt, so a step costs no image decoding and no VAE pass.
"""

import math
import warnings
from pathlib import Path

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from lit_ti.data import buckets as bk
from lit_ti.data import images as img
from lit_ti.data.dataset import ConceptDataset
from lit_ti.data.latents import Encoder, LatentCache, encode_folder, vae_fingerprint
from lit_ti.data.prior import PriorImages
from lit_ti.data.sampler import EpochSampler
from lit_ti.data.settings import check_samples, validate
from lit_ti.data.templates import load_templates, without_filewords
from lit_ti.errors import UserError


class ConceptDataModule(L.LightningDataModule):
    """Images of one concept and the prompts that describe them.

    Args:
        dir: folder of training images; a sidecar `<stem>.txt` is the caption of `<stem>.<ext>`.
        name: the concept name written for `[name]` in the templates.
        template: a shipped template (`subject`, `subject_filewords`, `style`, `style_filewords`,
            `hypernetwork`, `none`) or a path to a text file with one prompt per line.
        resolution: training size in pixels (with buckets: the side of the square of equal area); null = the
            backbone's native size.
        crop: `center` (keep aspect, crop what sticks out) or `squash` (A1111's plain resize).
        flip_p: probability of using the horizontally flipped image (both latents are cached).
        latent_sampling: `once` (one VAE sample per image, A1111's default), `deterministic` (the mean), or
            `random` (a fresh sample every step).
        filewords_regex / filewords_join: A1111's "filename word regex" and "join string".
        shuffle_tags / tag_dropout: shuffle or drop the comma-separated caption tags per sample.
        keep_tokens: the first N caption tags are never shuffled or dropped (kohya's `keep_tokens`).
        attention_maps: weight the loss by DreamArtist attention maps `<stem>_att.<ext>` where present
            (grey 0% -> 0, 50% -> 1, 100% -> 5), cropped like their image.
        alpha_weight: weight the loss by each image's alpha channel (transparent = not learned).
        batch_size, num_workers: DataLoader settings; batch_size is capped at images × repeats.
        repeats: how many times each image appears per epoch.
        seed: seed of the one-off latent sample of `once`.
        buckets: aspect-ratio buckets (kohya's): each image trains at the size of about resolution² pixels
            nearest its aspect ratio, a batch from one bucket; false = every image at resolution².
        bucket_step: bucket sides are multiples of this (kohya's `bucket_reso_steps`, 64).
        bucket_min_side / bucket_max_side: limits of a bucket's sides; null = resolution/2 and 2·resolution.
        cache_dir: a folder for the on-disk latent cache (null = off); see data/latents.py.
        prior_dir: a folder of prior images (DreamBooth's class images, kohya's regularisation images) with their
            own captions; each sample gets one as `prior_*` (data/prior.py). null = none.
        prior_prompt: the prompt of prior images without a `.txt` caption (null = their file name's words).
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
        keep_tokens: int = 0,
        buckets: bool = False,
        bucket_step: int = 64,
        bucket_min_side: int | None = None,
        bucket_max_side: int | None = None,
        cache_dir: str | None = None,
        prior_dir: str | None = None,
        prior_prompt: str | None = None,
    ) -> None:
        super().__init__()
        validate(locals())
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
        self.keep_tokens = keep_tokens
        self.attention_maps = attention_maps
        self.alpha_weight = alpha_weight
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.repeats = repeats
        self.seed = seed
        self.buckets = buckets
        self.bucket_step = bucket_step
        self.bucket_min_side = bucket_min_side
        self.bucket_max_side = bucket_max_side
        self.cache_dir = cache_dir
        self.prior_dir = None if prior_dir is None else Path(prior_dir).expanduser()
        self.prior_prompt = prior_prompt
        self.prior: PriorImages | None = None
        self.paths: list[Path] = []
        self.captions: list[str] = []
        self.templates: list[str] = []
        self.plain_templates: list[str] = []  # the same lines without [filewords]
        self.sizes: list[tuple[int, int]] = []  # each image's training (width, height)
        self.mean: list[Tensor] = []  # per image [V, 4, h, w], V = 2 with flips
        self.std: list[Tensor] | None = None  # per image [V, 4, h, w]; None once sampling is applied
        self.weight_list: list[Tensor] | None = None  # per image [V, 1, h, w] loss weight, None = all 1
        self.pixel_list: list[Tensor] | None = None  # per image [V, 3, H, W] uint8, kept only when a method asks

    def setup(self, stage: str | None = None) -> None:
        """Scan the folder and read captions and templates; fails early on bad input."""
        if self.paths:
            return
        self.templates = load_templates(self.template)
        self.plain_templates = without_filewords(self.template, self.templates)
        self.paths = img.list_images(self.dir)
        check_samples(len(self.paths), self.repeats)
        self.captions = [img.caption(p, self.filewords_regex, self.filewords_join) for p in self.paths]
        if any("[filewords]" in t for t in self.templates) and not any(self.captions):
            raise UserError(
                f"data.template={self.template!r} uses [filewords] but no image in {img.quote(str(self.dir))} has "
                "a caption; add <image>.txt files, name the images after their content, or use a template without it"
            )
        if self.prior_dir is not None:
            self.prior = PriorImages(self.prior_dir, self.prior_prompt)

    def training_sizes(self, resolution: int) -> list[tuple[int, int]]:
        """Each image's training (width, height): its bucket, or the square `resolution`."""
        if not self.buckets:
            return [(resolution, resolution)] * len(self.paths)
        lo, hi = bk.resolve_sides(resolution, self.bucket_step, self.bucket_min_side, self.bucket_max_side)
        grid = bk.bucket_sizes(resolution, self.bucket_step, lo, hi)
        return [bk.nearest(img.image_size(p), grid) for p in self.paths]

    @torch.no_grad()
    def cache_latents(
        self,
        encode: Encoder,
        resolution: int,
        batch_size: int = 8,
        keep_pixels: bool = False,
        vae: torch.nn.Module | None = None,
    ) -> None:
        """Run the VAE encoder once over every image (and its mirror image when flipping), `batch_size`
        images at a time, keeping only the latents.

        keep_pixels: also keep the cropped images (uint8) for methods with a pixel-space loss.
        vae: the module behind `encode`, whose fingerprint keys the on-disk cache (no cache without it).
        """
        self.setup()
        size = self.resolution or resolution
        sizes = self.training_sizes(size)
        cache = None
        if self.cache_dir is not None:
            if vae is None:
                warnings.warn("data.cache_dir: no VAE given to fingerprint, so latents are not cached", stacklevel=2)
            else:
                cache = LatentCache(Path(self.cache_dir).expanduser(), vae_fingerprint(vae))
        views = 2 if self.flip_p > 0 else 1
        done = encode_folder(self.paths, sizes, encode, self.crop, views, batch_size, cache, keep_pixels)
        if done.broken:
            warnings.warn(
                f"data.dir: skipped {len(done.broken)} unreadable image(s): {img.listing(done.broken, '; ')}",
                stacklevel=2,
            )
        if not done.kept:
            raise UserError(f"data.dir: no image in {img.quote(str(self.dir))} could be decoded: {done.broken[0]}")
        self._warn_small([self.paths[i] for i in done.kept], size)
        self.paths = [self.paths[i] for i in done.kept]
        self.captions = [self.captions[i] for i in done.kept]
        self.sizes = [sizes[i] for i in done.kept]
        self.pixel_list = done.pixels if keep_pixels else None
        self.mean, self.std = done.mean, done.std
        self.weight_list = self._weights(views)
        if self.prior is not None:
            self.prior.cache(encode, size, self.crop, self.latent_sampling, self.seed, cache)
        if self.latent_sampling == "deterministic":
            self.std = None
        elif self.latent_sampling == "once":  # one draw per image, frozen
            g = torch.Generator().manual_seed(self.seed)
            for m, s in zip(self.mean, self.std):
                m.add_(s * torch.randn(m.shape, generator=g))  # in place: the latents stay in their blocks
            self.std = None

    def _weights(self, views: int) -> list[Tensor] | None:
        """Per-image loss weights [V, 1, h, w] on its latents' grid (the mean over the pixels of each latent
        cell: 8×8 for SD's VAEs, whatever the VAE's factor), or None (all 1)."""
        found = [
            img.load_weight(p, s, self.crop, self.attention_maps, self.alpha_weight)
            for p, s in zip(self.paths, self.sizes)
        ]
        if all(w is None for w in found):
            return None
        out = []
        for w, (width, height), mean in zip(found, self.sizes, self.mean, strict=True):
            w = torch.ones(1, height, width) if w is None else w
            w = torch.nn.functional.interpolate(w[None], size=mean.shape[-2:], mode="area")[0]  # [1, h, w]
            out.append(torch.stack([w, w.flip(-1)][:views]))
        return out

    def _warn_small(self, paths: list[Path], size: int) -> None:
        small = [f"{img.shown(p)} ({w}x{h})" for p in paths for w, h in [img.image_size(p)] if min(w, h) * 2 < size]
        if small:
            warnings.warn(
                f"data.dir: {len(small)} image(s) upscaled more than 2x to {size}px, so they will look blurry "
                f"to the model: {img.listing(small)}; use larger images or a smaller data.resolution",
                stacklevel=3,
            )

    # stacked views for inspection (every image one size, e.g. without buckets)
    @property
    def latents(self) -> tuple[Tensor, Tensor] | None:
        """(mean, std) `[N, V, 4, h, w]` (std zero once sampling is applied), or None before caching."""
        if not self.mean:
            return None
        mean = torch.stack(self.mean)
        return mean, torch.stack(self.std) if self.std is not None else torch.zeros_like(mean)

    @property
    def weights(self) -> Tensor | None:
        return None if self.weight_list is None else torch.stack(self.weight_list)  # [N, V, 1, h, w]

    @property
    def pixels(self) -> Tensor | None:
        return None if self.pixel_list is None else torch.stack(self.pixel_list)  # [N, V, 3, H, W]

    def latent(self, i: int, view: int = 0) -> Tensor:
        """Image `i`'s latent `[4, h, w]` (its mean, or the `once` sample)."""
        return self.mean[i][view]

    def train_dataloader(self) -> DataLoader:
        if not self.mean:
            raise RuntimeError("ConceptDataModule.cache_latents must run before training (the method calls it)")
        dataset = ConceptDataset(self)
        if self.batch_size > len(dataset):
            warnings.warn(
                f"data.batch_size={self.batch_size} is more than the {len(dataset)} samples per epoch; using "
                f"{len(dataset)} (raise data.repeats to keep the batch size)",
                stacklevel=2,
            )
        rank, world = self._shard()
        if len(dataset) // world < 1:
            raise UserError(
                f"data.repeats: {len(dataset)} samples per epoch cannot feed {world} processes; raise data.repeats"
            )
        batch_size = min(self.batch_size, len(dataset) // world)
        groups = None
        if self.buckets:
            index = {s: k for k, s in enumerate(sorted(set(self.sizes)))}
            groups = [index[self.sizes[j % len(self.sizes)]] for j in range(len(dataset))]
        sampler = EpochSampler(
            len(dataset), self.seed, rank=rank, world_size=world, groups=groups, batch=batch_size * world
        )
        sampler.start = lambda: self._resume_point(len(sampler), batch_size, world)
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
