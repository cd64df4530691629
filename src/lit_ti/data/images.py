"""Reading training images and their captions (A1111 "filewords" rules)."""

import re
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from lit_ti.errors import UserError

SIDECAR_SUFFIXES = {".txt", ".json", ".yaml", ".yml", ".npz", ".caption"}  # never warned about


def list_images(folder: Path) -> list[Path]:
    """Image files of `folder` (not recursive, sorted); anything Pillow cannot identify is skipped with
    one warning that names every skipped file."""
    if not folder.is_dir():
        raise UserError(f"data.dir: {folder} is not a folder; point data.dir at a folder of training images")
    images, skipped = [], []
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        if path.suffix.lower() in SIDECAR_SUFFIXES or path.name.startswith("."):
            continue
        try:
            with Image.open(path) as im:
                im.verify()
            images.append(path)
        except Exception:
            skipped.append(path.name)
    if skipped:
        warnings.warn(
            f"data.dir: skipped {len(skipped)} file(s) that are not images: {', '.join(skipped)}",
            stacklevel=2,
        )
    if not images:
        raise UserError(f"data.dir: {folder} holds no images Pillow can read; add .png/.jpg/.webp files")
    return images


def load_image(path: Path) -> Image.Image:
    """RGB image, upright per EXIF; transparency composited over white; 16-bit scaled to 8-bit."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode.startswith("I"):  # 16/32-bit integer greyscale
            im = im.convert("I").point(lambda v: v * (1 / 256)).convert("L")
        if im.mode == "P" or (im.mode in ("L", "RGB") and "transparency" in im.info):
            im = im.convert("RGBA")
        if im.mode in ("RGBA", "LA", "PA"):
            background = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(background, im.convert("RGBA"))
        return im.convert("RGB")


def resize(im: Image.Image, size: int, crop: str) -> Image.Image:
    """`center`: scale the short side to `size` and center-crop (keeps aspect); `squash`: A1111's resize."""
    if crop == "center":
        return ImageOps.fit(im, (size, size), method=Image.Resampling.BICUBIC)
    if crop == "squash":
        return im.resize((size, size), Image.Resampling.BICUBIC)
    raise UserError(f"data.crop={crop!r}: use 'center' or 'squash'")


def to_tensor(im: Image.Image) -> torch.Tensor:
    """[3, H, W] float in [-1, 1]."""
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1).contiguous()


def caption(path: Path, word_regex: str | None = None, join: str = " ") -> str:
    """A1111 filewords: the sidecar `.txt` wins; else the file stem minus leading digits/dashes, optionally
    reduced to the matches of `word_regex` joined by `join`."""
    sidecar = path.with_suffix(".txt")
    if sidecar.is_file():
        return sidecar.read_text(encoding="utf-8", errors="replace").strip()
    text = re.sub(r"^[-\d]+\s*", "", path.stem)
    if word_regex:
        text = join.join(re.findall(word_regex, text))
    return text
