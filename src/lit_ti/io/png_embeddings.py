"""Embeddings inside PNG images, in the A1111 webui's format (read and write).

A1111 stores the embedding twice in a preview image: a `sd-ti-embedding` tEXt chunk (base64 of a JSON dump of
the `.pt` dict, tensors as `{"TORCHTENSOR": nested lists}`), and in the pixels: the zlib-compressed JSON split
into low and high nibbles, each nibble block decorated with grey dots (high nibble only), scrambled with an
LCG (low nibble only), and laid out as `[low block | black column | caption image | black column | high block]`.
Loading prefers the text chunk (chat apps strip it; the pixels survive) and is pure data: no pickle. It is
bounded (`io.limits`): images over `PNG_PIXELS` are refused before decoding, and the payload is decompressed
and parsed only up to `PNG_PAYLOAD_BYTES`; `png_name` finds the concept name without decoding pixels.
"""

import base64
import json
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from lit_ti.errors import UserError
from lit_ti.io.atomic import atomic_path
from lit_ti.io.limits import PNG_PAYLOAD_BYTES, PNG_PIXELS, mb

KEY = "sd-ti-embedding"


# ----------------------------------------------------------------- JSON payload
def to_json(data: dict) -> bytes:
    """A1111's JSON: tensors as `{"TORCHTENSOR": [...]}`, floats as Python's shortest repr of float32->float64."""

    def encode(obj):
        if isinstance(obj, torch.Tensor):
            return {"TORCHTENSOR": obj.detach().cpu().float().numpy().tolist()}
        raise TypeError(f"{type(obj).__name__} is not JSON serialisable")

    return json.dumps(data, default=encode).encode("utf-8")


def from_json(raw: bytes | str) -> dict:
    if len(raw) > PNG_PAYLOAD_BYTES:
        raise ValueError(f"an embedding payload of {mb(len(raw))} (at most {mb(PNG_PAYLOAD_BYTES)})")

    def hook(d: dict):
        return torch.from_numpy(np.array(d["TORCHTENSOR"], dtype=np.float64)) if "TORCHTENSOR" in d else d

    return json.loads(raw, object_hook=hook)


# ----------------------------------------------------------------- pixel blocks
def lcg(n: int) -> np.ndarray:
    """A1111's scrambling stream: seed 0, `seed = (1664525 seed + 1013904223) mod 2^32`, output `seed mod 255`."""
    out, seed = np.empty(n, dtype=np.uint8), 0
    for i in range(n):
        seed = (1664525 * seed + 1013904223) % 2**32
        out[i] = seed % 255
    return out


def _decorate(block: np.ndarray, shades: np.ndarray) -> np.ndarray:
    """XOR the high nibble of a dotted drawing into a block `[h, w, 3]` (values 0..15); cosmetic only."""
    h, w = block.shape[:2]
    canvas = Image.new("RGB", (w, h))
    draw, i = ImageDraw.Draw(canvas), 0
    for x in range(-6, w, 8):
        for yi, y in enumerate(range(-6, h, 8)):
            off = 4 if yi % 2 == 0 else 0
            shade = int(shades[i % len(shades)])
            draw.ellipse((x + off, y, x + off + 6, y + 6), fill=(shade, shade, shade))
            i += 1
    return block ^ (np.asarray(canvas) & 0xF0)


def encode_blocks(payload: bytes, height: int, first_vector: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The low- and high-nibble blocks `[height, w, 3]` uint8 for a compressed payload."""
    data = np.frombuffer(payload, dtype=np.uint8)
    m1 = len(data) + (height - len(data) % height)
    total = m1 + (3 * height - m1 % (3 * height))
    v = first_vector.detach().float().cpu().numpy()[:1024]
    shades = (np.abs(v) / max(float(np.abs(v).max()), 1e-12) * 255).astype(np.uint8)
    noise = (lcg(total) & 0x0F).reshape(height, -1, 3)
    blocks = []
    for nibbles, seq in ((data & 0x0F, shades), (data >> 4, shades[::-1])):
        block = np.resize(nibbles, total).reshape(height, -1, 3)  # cyclic padding, as A1111 since 2023-01
        blocks.append(_decorate(block, seq) ^ noise)
    return blocks[0], blocks[1]


def decode_pixels(image: Image.Image) -> dict | None:
    """The embedding dict hidden in an image's pixels, or None when it holds none."""
    rgb = np.asarray(image.convert("RGB"))  # [h, w, 3]
    lit = rgb.min(axis=-1) > 0  # [h, w]; rows and columns below, not argwhere (8 bytes a pixel)
    rows, cols = np.flatnonzero(lit.any(axis=1)), np.flatnonzero(lit.any(axis=0))
    if len(rows) == 0:
        return None
    low = rgb[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] & 0x0F
    empty = np.where((low == 0).all(axis=(0, 2)))[0]
    if len(empty) < 2:
        return None
    left, right = low[:, : empty[0]], low[:, empty[-1] + 1 :]
    if left.shape != right.shape or left.size == 0:
        return None
    noise = (lcg(left.size) & 0x0F).reshape(left.shape)
    data = (((right ^ noise) << 4) | (left ^ noise)).astype(np.uint8).tobytes()
    inflate = zlib.decompressobj()
    try:
        raw = inflate.decompress(data, PNG_PAYLOAD_BYTES)  # a zlib bomb stops at the cap
    except zlib.error:
        return None
    if inflate.unconsumed_tail:
        raise ValueError(f"its pixels inflate to more than {mb(PNG_PAYLOAD_BYTES)}")
    try:
        return from_json(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None


# ----------------------------------------------------------------- caption image
def caption_image(preview: Image.Image, title: str, footer: tuple[str, str, str]) -> Image.Image:
    """The preview with A1111's overlay: darkened top and bottom, the title, and a three-part footer."""
    im = preview.convert("RGBA")
    w, h = im.size
    alpha = ((1 + np.cos(np.linspace(0, 2 * np.pi, h))) / 2 * 200).astype(np.uint8)  # dark ends, clear middle
    shade = Image.fromarray(np.repeat(alpha[:, None], w, axis=1), "L")
    im = Image.alpha_composite(im, Image.merge("RGBA", (*[Image.new("L", (w, h), 0)] * 3, shade)))
    draw = ImageDraw.Draw(im)
    size = max(8, min(72, int(w * 0.75 / max(1, len(title)) * 1.6)))
    font = ImageFont.load_default(size=size)
    draw.text((w // 32, w // 32), title, fill=(255, 255, 255, 230), font=font)
    small = ImageFont.load_default(size=max(8, min(72, size // 2)))
    left, centre, right = footer
    y = h - w // 32
    draw.text((w // 32, y), left, fill=(255, 255, 255, 230), font=small, anchor="ls")
    draw.text((w // 2, y), centre, fill=(255, 255, 255, 230), font=small, anchor="ms")
    draw.text((w - w // 32, y), right, fill=(255, 255, 255, 230), font=small, anchor="rs")
    return im.convert("RGB")


# ----------------------------------------------------------------- files
def save_png_embedding(path: str | Path, preview: Image.Image, data: dict, shorthash: str | None = None) -> Path:
    """Write `data` (an A1111 `.pt` dict) into a PNG built around `preview`, both as text chunk and pixels."""
    path = Path(path)
    vectors = next(iter(data["string_to_param"].values()))
    raw = to_json(data)
    low, high = encode_blocks(zlib.compress(raw, 9), preview.height, vectors[0])
    footer = (
        str(data.get("sd_checkpoint_name") or ""),
        f"[{shorthash}]" if shorthash else "",
        f"{vectors.shape[0]}v {data.get('step') or 0}s",
    )
    caption = np.asarray(caption_image(preview, f"<{data.get('name', path.stem)}>", footer))
    gap = np.zeros((preview.height, 1, 3), dtype=np.uint8)
    canvas = Image.fromarray(np.concatenate([low, gap, caption, gap, high], axis=1))
    info = PngImagePlugin.PngInfo()
    info.add_text(KEY, base64.b64encode(raw).decode("ascii"))
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG", pnginfo=info)
    return path


def _text_chunk(im: Image.Image) -> dict | None:
    """The dict of the `sd-ti-embedding` chunk, if it comes before the pixels (A1111 writes it there)."""
    text = im.info.get(KEY)
    if not isinstance(text, str | bytes) or len(text) > PNG_PAYLOAD_BYTES * 4 // 3 + 4:
        return None
    return from_json(base64.b64decode(text))


class NotAnEmbedding(UserError):
    """A file that holds no embedding: a plain picture or a LoRA without a bundled one (folder scans skip them,
    as A1111 does)."""


def _open(path: str | Path) -> Image.Image:
    im = Image.open(path)
    if im.width * im.height > PNG_PIXELS:
        im.close()
        raise NotAnEmbedding(
            f"{path}: an image of {im.width}x{im.height} pixels; embedding images are at most {PNG_PIXELS} pixels"
        )
    return im


def png_name(path: str | Path) -> str | None:
    """The concept name in an image's text chunk, read without decoding pixels; None when it has none."""
    try:
        with _open(path) as im:
            data = _text_chunk(im)
    except (UserError, OSError, ValueError, SyntaxError, RecursionError, Image.DecompressionBombError):
        return None
    return str(data["name"]) if isinstance(data, dict) and "name" in data else None


def read_png_embedding(path: str | Path) -> dict | None:
    """The embedding dict of an image file (text chunk first, then pixels), or None for a plain image."""
    with _open(path) as im:
        data = _text_chunk(im)
        return data if data is not None else decode_pixels(im)
