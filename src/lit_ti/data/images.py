"""Reading training images and their captions (A1111 "filewords" rules)."""

import glob
import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from lit_ti.errors import UserError

SIDECAR_SUFFIXES = {".txt", ".json", ".yaml", ".yml", ".npz", ".caption"}  # never warned about
MASK_SUFFIXES = ("_att", "_att_proc")  # DreamArtist attention maps: `X_att.png` weights the loss of `X.png`


def list_images(folder: Path) -> list[Path]:
    """Image files of `folder` (not recursive, sorted); anything Pillow cannot open is skipped with one
    warning that names every skipped file and why."""
    if not folder.is_dir():
        raise UserError(f"data.dir: {folder} is not a folder; point data.dir at a folder of training images")
    images, skipped = [], []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in SIDECAR_SUFFIXES or path.name.startswith(".") or path.stem.endswith(MASK_SUFFIXES):
            continue
        if path.is_dir():
            continue
        reason = why_unreadable(path)
        if reason is None:
            images.append(path)
        else:
            skipped.append(f"{display(path)} ({reason})")
    if skipped and images:
        warnings.warn(f"data.dir: skipped {len(skipped)} file(s): {'; '.join(skipped)}", stacklevel=2)
    if not images:
        found = f" (skipped: {'; '.join(skipped)})" if skipped else ""
        raise UserError(f"data.dir: {folder} holds no images Pillow can read{found}; add .png/.jpg/.webp files")
    return images


def why_unreadable(path: Path) -> str | None:
    """None for an image Pillow can open, else a short reason."""
    if not path.exists():
        return "broken link"
    try:
        with Image.open(path) as im:
            im.verify()
    except Image.DecompressionBombError as e:
        return f"{e}; downscale it"
    except PermissionError:
        return "no permission to read it"
    except Exception:
        return "empty file" if path.stat().st_size == 0 else "not an image, or a damaged one"
    return None


def display(path: Path) -> str:
    """A file name fit for a message, whatever bytes it holds (non-UTF-8 names show as escapes)."""
    return path.name.encode("utf-8", "backslashreplace").decode("utf-8")


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


def attention_map(path: Path) -> Path | None:
    """The image's DreamArtist attention map `<stem>_att.<any image ext>`, if there is one."""
    found = sorted(p for p in path.parent.glob(f"{glob.escape(path.stem)}_att.*") if p.suffix.lower() != ".txt")
    return found[0] if found else None


def load_weight(path: Path, size: int, crop: str, attention: bool, alpha: bool) -> torch.Tensor | None:
    """Per-pixel loss weight `[1, size, size]` for an image, cropped exactly like the image, or None (all 1).

    attention: DreamArtist's `<stem>_att` map, grey g in [0, 255] -> g/127 up to 127 (0..1), then
    1 + 4(g-127)/128 (1..5): 0% 0, 50% 1, 100% 5.  alpha: the image's own alpha channel (A1111's
    "use alpha as loss weight").
    """
    weight = None
    mask_path = attention_map(path) if attention else None
    if mask_path is not None:
        with Image.open(mask_path) as im:
            g = np.asarray(resize(ImageOps.exif_transpose(im).convert("L"), size, crop), dtype=np.float32)
        weight = np.where(g <= 127, g / 127, 1 + 4 * (g - 127) / 128)
    if alpha:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if "A" in im.getbands() or "transparency" in im.info:
                a = np.asarray(resize(im.convert("RGBA"), size, crop), dtype=np.float32)[..., 3] / 255
                weight = a if weight is None else weight * a
    return None if weight is None else torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32))[None]


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
    stem = os.fsencode(path.stem).decode("utf-8", errors="replace")  # non-UTF-8 names: no lone surrogates
    text = re.sub(r"^[-\d]+\s*", "", stem)
    if word_regex:
        text = join.join(re.findall(word_regex, text))
    return text
