"""`python preprocess.py src=... dst=...`: a folder of raw images -> a clean training folder (A1111's
"Preprocess images": split, focal or centre crop, flips, captions; and cut-outs on other backgrounds and at
other sizes, `lit_ti.cutout`), and a report of what was skipped.

Outputs are `{index:05}-{n}-{original stem}.png` with a sidecar `.txt` caption, the legacy A1111 naming whose
leading digits the dataset strips; `index` continues after any earlier outputs in `dst`, so names never
collide, and `src` is only read.
"""

import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf
from PIL import Image, ImageOps
from tqdm import tqdm

from lit_ti import cutout
from lit_ti.data.images import SIDECAR_SUFFIXES, display, load_image, over_white, why_unreadable
from lit_ti.errors import UserError, check_choice, check_flag, check_number, quote
from lit_ti.io.atomic import atomic_path

CAPTION_ACTIONS = ("ignore", "keep", "prepend", "append")
MIN_SIZE, MAX_SIZE = 8, 8192  # output pixels per side
FLIPS = ("none", "horizontal", "vertical", "both")


def split_oversized(im: Image.Image, width: int, height: int, threshold: float, overlap: float) -> list[Image.Image]:
    """A1111's split: a much longer-than-target image -> overlapping target-shaped tiles along its long axis."""
    w, h = im.size
    vertical = h > w
    ratio = (w * height) / (h * width) if vertical else (h * width) / (w * height)
    if ratio >= 1 or ratio > threshold:
        return [im]
    short_target, long_target = (width, height) if vertical else (height, width)
    short = w if vertical else h
    length = (h if vertical else w) * short_target // short
    im = im.resize((short_target, length) if vertical else (length, short_target), Image.Resampling.LANCZOS)
    count = math.ceil((length - long_target * overlap) / (long_target * (1 - overlap)))
    stride = (length - long_target) / max(1, count - 1)
    tiles = []
    for i in range(count):
        start = int(stride * i)
        box = (
            (0, start, short_target, start + long_target) if vertical else (start, 0, start + long_target, short_target)
        )
        tiles.append(im.crop(box))
    return tiles


def _entropy_point(grey: np.ndarray, width: int, height: int) -> tuple[float, float] | None:
    """Centre of the crop-sized window (slid in 4 px steps along the long axis) whose 1-bit image has the most
    entropy; None for square images."""
    h, w = grey.shape
    if w == h:
        return None
    bits = grey > 127
    best, where = -1.0, None
    along_x = w > h
    for start in range(0, (w - width if along_x else h - height) + 1, 4):
        window = bits[:, start : start + width] if along_x else bits[start : start + height]
        p = float(window.mean())
        score = -sum(q * math.log2(q) for q in (p, 1 - p) if q > 0)
        if score > best:
            best, where = score, start
    return (where + width / 2, h / 2) if along_x else (w / 2, where + height / 2)


def _edge_point(grey: np.ndarray) -> tuple[float, float] | None:
    """Centroid of the 100 strongest gradient points (a corner-detector stand-in without OpenCV); the bottom
    10% is ignored, as A1111 greys it against watermarks."""
    g = grey.astype(np.float32)
    g[int(g.shape[0] * 0.9) :] = 128
    mag = np.hypot(*np.gradient(g))
    flat = np.argsort(mag.ravel())[-100:]
    if mag.ravel()[flat].max() <= 0:
        return None
    ys, xs = np.unravel_index(flat, mag.shape)
    return float(xs.mean()), float(ys.mean())


def focal_crop(im: Image.Image, width: int, height: int, entropy: float = 0.15, edges: float = 0.5) -> Image.Image:
    """A1111's focal-point crop without face detection: scale to cover, weigh the entropy and edge points,
    centre the window on their weighted mean, clamp it into the image."""
    w, h = im.size
    scale = height / h if w > h else width / w if h > w else (width / w if width >= height else height / h)
    im = im.resize((max(width, round(w * scale)), max(height, round(h * scale))), Image.Resampling.LANCZOS)
    grey = np.asarray(im.convert("L"))
    points = [
        (p, wt)
        for p, wt in ((_entropy_point(grey, width, height), entropy), (_edge_point(grey), edges))
        if p and wt > 0
    ]
    if points:
        total = sum(wt for _, wt in points)
        cx = sum(p[0] * wt for p, wt in points) / total
        cy = sum(p[1] * wt for p, wt in points) / total
    else:
        cx, cy = im.width / 2, im.height / 2
    left = int(min(max(0, round(cx - width / 2)), im.width - width))
    top = int(min(max(0, round(cy - height / 2)), im.height - height))
    return im.crop((left, top, left + width, top + height))


def combine(existing: str, generated: str, action: str) -> str:
    """A1111's "existing caption" action."""
    if action == "ignore" or not existing:
        return generated or (existing if action != "ignore" else "")
    if action == "keep" or not generated:
        return existing
    return f"{existing} {generated}" if action == "prepend" else f"{generated} {existing}"


def _flips(im: Image.Image, flip: str) -> list[Image.Image]:
    out = [im]
    if flip in ("horizontal", "both"):
        out.append(ImageOps.mirror(im))
    if flip in ("vertical", "both"):
        out.append(ImageOps.flip(im))
    if flip == "both":
        out.append(ImageOps.mirror(ImageOps.flip(im)))
    return out


def _first_index(dst: Path) -> int:
    found = [int(m.group(1)) for p in dst.glob("*") if (m := re.match(r"(\d{5})-", p.name))]
    return max(found) + 1 if found else 0


def _cutout_settings(cfg: DictConfig) -> tuple | None:
    """`cutout.*` checked: (backgrounds, sizes, caption template), or None when no background is asked for."""
    backgrounds, sizes = cutout.parse_backgrounds(cfg.backgrounds), cutout.parse_sizes(cfg.sizes)
    template = cutout.check_caption(cfg.caption)
    if sizes and not backgrounds:
        raise UserError("cutout.sizes: set cutout.backgrounds too; the copies are the subject on those backgrounds")
    return (backgrounds, sizes, template) if backgrounds else None


def check(cfg: DictConfig) -> tuple[Path, Path, int, int, tuple | None]:
    """Every option in range before anything is read or written: (src, dst, width, height, cut-out settings)."""
    for key in ("src", "dst"):
        if OmegaConf.is_missing(cfg, key) or cfg[key] in (None, ""):
            raise UserError(f"{key}: not set; python preprocess.py src=<raw images> dst=<training folder>")
    src, dst = Path(str(cfg.src)).expanduser(), Path(str(cfg.dst)).expanduser()
    if not src.is_dir():
        raise UserError(f"src: {quote(str(src))} is not a folder of images")
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise UserError(f"dst: {dst} must be outside src ({src}); preprocessing never writes into its source")
    check_choice("existing_caption", cfg.existing_caption, CAPTION_ACTIONS)
    check_choice("flip", cfg.flip, FLIPS)
    check_choice("crop", cfg.crop, ("center", "focal"))
    width = check_number("width", cfg.width, MIN_SIZE, MAX_SIZE, integer=True)
    height = check_number("height", cfg.height, MIN_SIZE, MAX_SIZE, integer=True, optional=True, hint="null = width")
    check_number("split_threshold", cfg.split_threshold, 0, 1, low_open=True, hint="A1111's default is 0.5")
    check_number("split_overlap", cfg.split_overlap, 0, 0.9, hint="the share of a tile its neighbour repeats")
    check_number("focal_entropy", cfg.focal_entropy, 0, 1)
    check_number("focal_edges", cfg.focal_edges, 0, 1)
    for key in ("split", "progress"):
        check_flag(key, cfg[key])
    caption = cfg.caption
    check_number("caption.threshold", caption.threshold, 0, 1, hint="tags scoring at least this are kept")
    check_choice("caption.sort", caption.sort, ("alphabetical", "score"))
    check_flag("caption.spaces", caption.spaces)
    check_flag("caption.escape_brackets", caption.escape_brackets)
    exclude = caption.exclude
    if isinstance(exclude, str) or not isinstance(exclude, Sequence) or not all(isinstance(t, str) for t in exclude):
        raise UserError(f"caption.exclude={quote(exclude)}: a list of tags, e.g. caption.exclude='[rating:safe]'")
    return src, dst, width, height or width, _cutout_settings(cfg.cutout)


def _variants(piece: Image.Image, text: str, flip: str, cut: tuple | None) -> list[tuple[Image.Image, str]]:
    """What one cropped piece becomes, each with its caption: its flips, or with cut-outs (`cut` = backgrounds,
    sizes, caption template) every copy's flips; [] for a piece with nothing transparent to cut out."""
    if cut is None:
        return [(out, text) for out in _flips(piece, flip)]
    backgrounds, sizes, template = cut
    return [
        (out, cutout.caption(template, text, background, size))
        for copy, background, size in cutout.copies(piece, backgrounds, sizes)
        for out in _flips(copy, flip)
    ]


def run(cfg: DictConfig) -> dict:
    src, dst, width, height, cut = check(cfg)
    captioners = []
    if cfg.caption.blip:
        from lit_ti.captioning import BlipCaptioner

        captioners.append(BlipCaptioner(cfg.caption.blip))
    if cfg.caption.tagger:
        from lit_ti.captioning import Tagger

        captioners.append(
            Tagger(
                cfg.caption.tagger,
                threshold=cfg.caption.threshold,
                sort=cfg.caption.sort,
                spaces=cfg.caption.spaces,
                escape_brackets=cfg.caption.escape_brackets,
                exclude=tuple(cfg.caption.exclude),
            )
        )
    files = sorted(p for p in src.iterdir() if p.is_file() and p.suffix.lower() not in SIDECAR_SUFFIXES)
    dst.mkdir(parents=True, exist_ok=True)
    index, written, skipped = _first_index(dst), [], []
    for path in tqdm(files, desc="preprocess", unit="image", disable=not cfg.progress):
        reason = why_unreadable(path)
        if reason is None:
            try:
                image = load_image(path, alpha=cut is not None)
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                reason = str(e)
        if reason is not None:
            skipped.append(f"{display(path)} ({reason})")
            continue
        sidecar = path.with_suffix(".txt")
        existing = sidecar.read_text(encoding="utf-8", errors="replace").strip() if sidecar.is_file() else ""
        pieces = split_oversized(image, width, height, cfg.split_threshold, cfg.split_overlap) if cfg.split else [image]
        sub = 0
        for piece in pieces:
            if cfg.crop == "focal" and piece.width != piece.height:
                piece = focal_crop(piece, width, height, cfg.focal_entropy, cfg.focal_edges)
            else:
                piece = ImageOps.fit(piece, (width, height), Image.Resampling.LANCZOS)
            generated = ", ".join(c for c in (cap(over_white(piece)) for cap in captioners) if c)
            text = combine(existing, generated, cfg.existing_caption)
            variants = _variants(piece, text, cfg.flip, cut)
            if not variants:
                skipped.append(
                    f"{display(path)} (no transparent pixels, so no subject to cut out; remove its background)"
                )
            for out, out_text in variants:
                stem = f"{index:05d}-{sub}-{display(path).rsplit('.', 1)[0]}"[:200]
                with atomic_path(dst / f"{stem}.png") as tmp:
                    out.save(tmp, format="PNG")
                if out_text:
                    with atomic_path(dst / f"{stem}.txt") as tmp:
                        tmp.write_text(out_text + "\n", encoding="utf-8")
                written.append(dst / f"{stem}.png")
                sub += 1
        index += 1
    report = [f"{len(files)} file(s) read from {src}, {len(written)} image(s) written to {dst}"]
    report += [f"skipped {s}" for s in skipped]
    with atomic_path(dst / "preprocess_report.txt") as tmp:
        tmp.write_text("\n".join(report) + "\n", encoding="utf-8")
    print("[lit_ti] " + "\n[lit_ti] ".join(report))
    return {"written": written, "skipped": skipped}
