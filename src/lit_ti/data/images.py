"""Reading training images and their captions (A1111 "filewords" rules), safely: whatever sits in the folder."""

import codecs
import glob
import os
import re
import stat
import unicodedata
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from lit_ti.errors import UserError

SIDECAR_SUFFIXES = {".txt", ".json", ".yaml", ".yml", ".npz", ".caption"}  # never warned about
MASK_SUFFIXES = ("_att", "_att_proc")  # DreamArtist attention maps: `X_att.png` weights the loss of `X.png`
CAPTION_BYTES = 64 * 1024  # CLIP reads 77 tokens; a longer "caption" is a wrong file, not worth holding
SPECIAL = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a device", stat.S_IFBLK: "a device", stat.S_IFSOCK: "a socket"}


def list_images(folder: Path, key: str = "data.dir") -> list[Path]:
    """Image files of `folder` (not recursive, sorted). Anything Pillow cannot open, and special files (never
    opened: a FIFO would block), are skipped with one warning naming them; subfolders are not searched (one
    warning names them); multi-frame images train on their first frame (one warning)."""
    if not folder.is_dir():
        raise UserError(f"{key}: {quote(str(folder))} is not a folder; point {key} at a folder of training images")
    images, skipped, subfolders, animated = [], [], [], []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in SIDECAR_SUFFIXES or path.name.startswith(".") or path.stem.endswith(MASK_SUFFIXES):
            continue
        try:
            mode = path.stat().st_mode  # follows links; never opens the file
        except OSError:
            skipped.append(f"{shown(path)} (broken link)")
            continue
        if stat.S_ISDIR(mode):
            subfolders.append(shown(path))
            continue
        if not stat.S_ISREG(mode):
            skipped.append(f"{shown(path)} ({SPECIAL.get(stat.S_IFMT(mode), 'not a regular file')}; not opened)")
            continue
        reason, frames = inspect(path)
        if reason is not None:
            skipped.append(f"{shown(path)} ({reason})")
            continue
        images.append(path)
        if frames > 1:
            animated.append(f"{shown(path)} ({frames} frames)")
    if subfolders:
        warnings.warn(
            f"{key}: {len(subfolders)} subfolder(s) not searched: {listing(subfolders)}; move their images "
            f"into {key} itself to train on them",
            stacklevel=2,
        )
    if animated and images:
        warnings.warn(f"{key}: training on the first frame of {listing(animated)}", stacklevel=2)
    if skipped and images:
        warnings.warn(f"{key}: skipped {len(skipped)} file(s): {listing(skipped, '; ')}", stacklevel=2)
    if not images:
        found = f" (skipped: {listing(skipped, '; ')})" if skipped else ""
        raise UserError(
            f"{key}: {quote(str(folder))} holds no images Pillow can read{found}; add .png/.jpg/.webp files"
        )
    return images


def inspect(path: Path) -> tuple[str | None, int]:
    """(None, frame count) for an image Pillow can open, else (a short reason, 0)."""
    try:
        with Image.open(path) as im:
            frames = getattr(im, "n_frames", 1)
            im.verify()
    except Image.DecompressionBombError as e:
        return f"{e}; downscale it", 0
    except PermissionError:
        return "no permission to read it", 0
    except Exception:
        return ("empty file" if path.stat().st_size == 0 else "not an image, or a damaged one"), 0
    return None, frames


def why_unreadable(path: Path) -> str | None:
    """None for an image Pillow can open, else a short reason."""
    if not path.exists():
        return "broken link"
    return inspect(path)[0]


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) as displayed (EXIF orientation applied), read from the header only."""
    with Image.open(path) as im:
        w, h = im.size
        if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # rotated by 90 degrees
            return h, w
        return w, h


def quote(text: str, limit: int = 120) -> str:
    """User text fit for one log line: control characters escaped, at most `limit` characters."""
    safe = "".join(c if unicodedata.category(c)[0] != "C" else c.encode("unicode_escape").decode("ascii") for c in text)
    return safe if len(safe) <= limit else f"{safe[: limit - 21]}...{safe[-18:]}"


def display(path: Path) -> str:
    """A file name as text, whatever bytes it holds (non-UTF-8 bytes show as escapes)."""
    return path.name.encode("utf-8", "backslashreplace").decode("utf-8")


def shown(path: Path) -> str:
    """A file name fit for a log line: `display` with control characters escaped, bounded in length."""
    return quote(display(path))


def listing(items: list[str], sep: str = ", ", most: int = 10) -> str:
    """At most `most` items, then how many more: a warning stays one readable line for any folder."""
    more = f"{sep}... and {len(items) - most} more" if len(items) > most else ""
    return sep.join(items[:most]) + more


def over_white(im: Image.Image) -> Image.Image:
    """`im` as RGB, any transparency composited over white: how a transparent image is trained and captioned."""
    if im.mode in ("RGBA", "LA", "PA"):
        im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im.convert("RGBA"))
    return im.convert("RGB")


def load_image(path: Path, alpha: bool = False) -> Image.Image:
    """RGB image (first frame), upright per EXIF; transparency composited over white; 16-bit scaled to 8-bit.
    alpha: RGBA instead, its transparency kept (opaque for an image without any), for cut-outs."""
    with Image.open(path) as im:
        im.seek(0)
        im = ImageOps.exif_transpose(im)
        if im.mode.startswith("I"):  # 16/32-bit integer greyscale
            im = im.convert("I").point(lambda v: v * (1 / 256)).convert("L")
        if im.mode == "P" or (im.mode in ("L", "RGB") and "transparency" in im.info):
            im = im.convert("RGBA")
        return im.convert("RGBA") if alpha else over_white(im)


def attention_map(path: Path) -> Path | None:
    """The image's DreamArtist attention map `<stem>_att.<any image ext>`, if there is one (a regular file)."""
    found = sorted(
        p for p in path.parent.glob(f"{glob.escape(path.stem)}_att.*") if p.suffix.lower() != ".txt" and p.is_file()
    )
    return found[0] if found else None


def load_weight(path: Path, size: tuple[int, int], crop: str, attention: bool, alpha: bool) -> torch.Tensor | None:
    """Per-pixel loss weight `[1, H, W]` for an image at `size` = (W, H), cropped exactly like the image, or
    None (all 1).

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


def resize(im: Image.Image, size: int | tuple[int, int], crop: str) -> Image.Image:
    """To `size` (a side, or (W, H)). `center`: scale to cover it and center-crop what sticks out (keeps
    aspect); `squash`: A1111's plain resize."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if crop == "center":
        return ImageOps.fit(im, size, method=Image.Resampling.BICUBIC)
    if crop == "squash":
        return im.resize(size, Image.Resampling.BICUBIC)
    raise UserError(f"data.crop={crop!r}: use 'center' or 'squash'")


def to_tensor(im: Image.Image) -> torch.Tensor:
    """[3, H, W] float in [-1, 1]."""
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1).contiguous()


def read_text(path: Path) -> str:
    """A caption file's text: UTF-8 (with or without a byte-order mark), UTF-16 (BOM, or NUL-padded ASCII
    without one), else Latin-1; at most CAPTION_BYTES are read."""
    with open(path, "rb") as f:
        data = f.read(CAPTION_BYTES)
    if data.startswith(codecs.BOM_UTF8):
        return data[3:].decode("utf-8", "replace")
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return data.decode("utf-16", "replace")
    if len(data) >= 2 and data.count(0) * 3 >= len(data):  # UTF-16 without a BOM: every other byte is 0
        return data.decode("utf-16-le" if data[1] == 0 else "utf-16-be", "replace")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")  # any byte decodes; Windows-1252-era captions read right


def caption(path: Path, word_regex: str | None = None, join: str = " ") -> str:
    """A1111 filewords: the sidecar `.txt` wins; else the file stem minus leading digits/dashes, optionally
    reduced to the matches of `word_regex` joined by `join`."""
    sidecar = path.with_suffix(".txt")
    if sidecar.is_file():  # False for a FIFO or a device: never opened
        return read_text(sidecar).replace("\x00", "").strip()
    stem = os.fsencode(path.stem).decode("utf-8", errors="replace")  # non-UTF-8 names: no lone surrogates
    text = re.sub(r"^[-\d]+\s*", "", stem)
    if word_regex:
        text = join.join(re.findall(word_regex, text))
    return text
