"""Encoding a folder into VAE latents in batches streamed from disk, with an optional on-disk cache.

Only latents stay in memory: a batch of images is loaded, cropped, encoded (and its mirror image, when flips
are on) and dropped, so memory grows with the latents (4×64×64 floats per view at 512 px), not the pixels.

The cache (`data.cache_dir`) holds one safetensors file per image and view (plain / mirrored) with the
posterior's mean and std, named by a hash of the image file's bytes and of every setting that changes them: a
fingerprint of the VAE (config and weights), the training size (bucket), the crop and the view. Latent sampling
is applied after the cache (it draws from mean and std), so changing it re-uses the files. A changed image or
setting misses and is re-encoded alone; files are written atomically and a damaged one is a miss.
"""

import hashlib
import json
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from lit_ti.data import images as img
from lit_ti.io.atomic import atomic_path

log = logging.getLogger(__name__)
VERSION = 1  # bump when the cached content changes meaning

# encode(pixels [B, 3, H, W] in [-1, 1]) -> (mean, std), each [B, 4, H/8, W/8], already scaled
Encoder = Callable[[Tensor], tuple[Tensor, Tensor]]


def vae_fingerprint(vae: torch.nn.Module) -> str:
    """A hash of a VAE's config and weights: another VAE (or a fine-tuned one) gives other latents."""
    # diffusers' private config keys (`_use_default_values`, `_name_or_path`) vary between processes and
    # folders without changing the model (the first is built from a set: its order follows hash randomization)
    config = {k: v for k, v in dict(getattr(vae, "config", {})).items() if not k.startswith("_")}
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in vae.state_dict().items():
        h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@dataclass
class LatentCache:
    """Posterior moments on disk, one file per (image content, settings, view)."""

    folder: Path
    fingerprint: str
    hits: int = 0
    misses: int = 0

    def key(self, digest: str, size: tuple[int, int], crop: str, view: int) -> Path:
        settings = {"v": VERSION, "vae": self.fingerprint, "image": digest, "size": size, "crop": crop, "view": view}
        name = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
        return self.folder / name[:2] / f"{name}.safetensors"

    def get(self, path: Path) -> tuple[Tensor, Tensor] | None:
        if not path.is_file():
            self.misses += 1
            return None
        try:
            t = load_file(path)
            found = t["mean"], t["std"]
        except (OSError, SafetensorError, KeyError):
            self.misses += 1
            return None
        self.hits += 1
        return found

    def put(self, path: Path, mean: Tensor, std: Tensor) -> None:
        try:
            with atomic_path(path) as tmp:
                save_file({"mean": mean.contiguous(), "std": std.contiguous()}, tmp)
        except OSError as e:  # a full or read-only disk costs speed, not the run
            warnings.warn(f"data.cache_dir: could not write {img.quote(str(path))} ({e}); not caching", stacklevel=2)


@dataclass
class Encoded:
    """What caching keeps per image: moments `[V, 4, h, w]` (V = 2 with flips), optional pixels."""

    mean: list[Tensor] = field(default_factory=list)
    std: list[Tensor] = field(default_factory=list)
    pixels: list[Tensor] = field(default_factory=list)  # [V, 3, H, W] uint8, only when asked
    kept: list[int] = field(default_factory=list)  # indices into the input paths
    broken: list[str] = field(default_factory=list)


# Pixels the VAE encoder takes in one call (sampling decodes one image at a time: `Backbone.pipeline`). Its
# fp32 activations, not the training step, set a run's peak memory otherwise: 8 images at 512 px peaked at
# 8.2 GiB on a GPU (SD1.5 shapes) where the batch-1 step needs 3.2 GiB, and at 5.1 GiB of RSS on a CPU against
# 0.7 GiB one image at a time, which was no slower.
VAE_PIXELS = 512 * 512


def encode_folder(
    paths: list[Path],
    sizes: list[tuple[int, int]],
    encode: Encoder,
    crop: str,
    views: int,
    batch_size: int,
    cache: LatentCache | None = None,
    keep_pixels: bool = False,
) -> Encoded:
    """Latents of every image at its training size, encoded `batch_size` images at a time but never more
    than `VAE_PIXELS` pixels (one size per batch), views plain (and mirrored when `views` = 2); unreadable
    images are listed in `broken`."""
    out: dict[int, tuple[Tensor, Tensor, Tensor | None]] = {}
    broken: list[str] = []
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, size in enumerate(sizes):
        by_size.setdefault(size, []).append(i)
    with tqdm(total=len(paths), desc="caching latents", unit="image", disable=None, leave=False) as bar:
        for size, members in sorted(by_size.items()):
            store: tuple[Tensor, Tensor] | None = None  # this size's moments [n, V, 4, h, w], one block each
            rows = {i: row for row, i in enumerate(members)}
            step = max(1, min(batch_size, VAE_PIXELS // (size[0] * size[1])))
            for start in range(0, len(members), step):
                chunk = members[start : start + step]
                for i, (mean, std, pixels) in _encode_batch(
                    chunk, paths, size, encode, crop, views, cache, keep_pixels, broken
                ).items():
                    # one allocation per size instead of one per image: thousands of small tensors left
                    # between the VAE's large temporaries fragment the heap, which then never shrinks
                    store = store or (
                        mean.new_empty(len(members), *mean.shape),
                        std.new_empty(len(members), *std.shape),
                    )
                    row = rows[i]
                    store[0][row], store[1][row] = mean, std
                    out[i] = store[0][row], store[1][row], pixels
                bar.update(len(chunk))
    if cache is not None:
        log.info("latent cache: %d hit(s), %d miss(es)", cache.hits, cache.misses)
    result = Encoded(broken=broken)
    for i in sorted(out):
        mean, std, pixels = out[i]
        result.mean.append(mean)
        result.std.append(std)
        if pixels is not None:
            result.pixels.append(pixels)
        result.kept.append(i)
    return result


def _encode_batch(batch, paths, size, encode, crop, views, cache, keep_pixels, broken) -> dict:
    """Moments of the images `batch` (one training `size`): from the cache where it has them, else encoded."""
    keys, found, pixels = {}, {}, {}
    for i in batch:
        digest = file_digest(paths[i]) if cache is not None else None
        for v in range(views):
            keys[i, v] = cache.key(digest, size, crop, v) if cache is not None else None
            found[i, v] = cache.get(keys[i, v]) if cache is not None else None
        if keep_pixels or any(found[i, v] is None for v in range(views)):
            try:
                x = img.to_tensor(img.resize(img.load_image(paths[i]), size, crop))  # [3, H, W]
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                broken.append(f"{img.shown(paths[i])} ({img.quote(str(e), 80)})")
                continue
            pixels[i] = torch.stack([x, x.flip(-1)][:views])  # [V, 3, H, W]
    for v in range(views):
        todo = [i for i in pixels if found[i, v] is None]
        if todo:
            mean, std = encode(torch.stack([pixels[i][v] for i in todo]))
            for j, i in enumerate(todo):
                found[i, v] = mean[j].float().cpu().clone(), std[j].float().cpu().clone()
                if cache is not None:
                    cache.put(keys[i, v], *found[i, v])
    out = {}
    for i in batch:
        if all(found.get((i, v)) is not None for v in range(views)):
            mean = torch.stack([found[i, v][0] for v in range(views)])
            std = torch.stack([found[i, v][1] for v in range(views)])
            kept = ((pixels[i] + 1) * 127.5).round().to(torch.uint8) if keep_pixels else None
            out[i] = mean, std, kept
    return out
