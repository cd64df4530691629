"""Builders of the bad and odd inputs test_bad_input.py feeds to a run: each returns a data folder (or writes one
file) that a user could plausibly hand to `python train.py`."""

import io as _io
import os
import shutil
import struct
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from lit_ti.io import save_embedding
from lit_ti.train import _asset
from tests.conftest import make_concept_dir


def good(folder: Path) -> Path:
    return make_concept_dir(folder, n=3)


def png_bytes(size=(32, 32), mode="RGB", colour=(200, 40, 40)) -> bytes:
    buf = _io.BytesIO()
    Image.new(mode, size, colour).save(buf, "PNG")
    return buf.getvalue()


def jpeg_bytes(im: Image.Image, **kw) -> bytes:
    buf = _io.BytesIO()
    im.save(buf, "JPEG", **kw)
    return buf.getvalue()


def bomb_png() -> bytes:
    """A valid PNG header that claims 40000 x 40000 pixels (a decompression bomb), with a tiny body."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 40000, 40000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def exif_rotated() -> bytes:
    im = Image.new("RGB", (48, 32), (30, 30, 200))
    im.paste((255, 255, 255), (0, 0, 12, 32))  # white strip on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: viewers turn it 90 degrees clockwise
    return jpeg_bytes(im, exif=exif.tobytes(), quality=95)


def with_file(name: str | bytes, data: bytes | None = None, make=None):
    """A good folder plus one extra file."""

    def build(folder: Path) -> Path:
        good(folder)
        path = os.path.join(os.fsencode(folder), name) if isinstance(name, bytes) else folder / name
        if make is not None:
            make(path)
        else:
            with open(path, "wb") as f:
                f.write(data)
        return folder

    return build


def captioned(*captions: str):
    """A good folder whose images have these captions (the last one repeated)."""

    def build(folder: Path) -> Path:
        good(folder)
        for k, path in enumerate(sorted(folder.glob("*.png"))):
            path.with_suffix(".txt").write_text(captions[min(k, len(captions) - 1)], encoding="utf-8")
        return folder

    return build


def only(name: str, data: bytes):
    def build(folder: Path) -> Path:
        folder.mkdir(parents=True)
        (folder / name).write_bytes(data)
        return folder

    return build


def image(mode: str, colour, **info):
    def make(path):
        im = Image.new(mode, (40, 40), colour)
        if mode == "P":
            im.putpalette([0, 0, 0, 250, 20, 20] * 128)
        im.save(path, **info)

    return make


def truncated(fmt: str) -> bytes:
    buf = _io.BytesIO()
    im = Image.effect_noise((64, 64), 60).convert("RGB")
    im.save(buf, fmt)
    data = buf.getvalue()
    return data[: len(data) * 6 // 10]


def dangling_link(path):
    os.symlink("/no/such/target.png", path)


def no_permission(path):
    if os.geteuid() == 0:
        pytest.skip("root reads files whatever their mode")
    Path(path).write_bytes(png_bytes())
    os.chmod(path, 0)


def cmyk(path):
    Image.new("CMYK", (40, 40), (0, 200, 200, 0)).save(path, "JPEG")


def sixteen_bit(path):
    Image.new("I;16", (40, 40), 40000).save(path)


def template_file(text: str | None):
    def build(folder: Path) -> Path:
        good(folder)
        if text is not None:
            (folder.parent / "template.txt").write_text(text)
        return folder

    return build


def wide_embedding(folder: Path) -> Path:
    good(folder)
    save_embedding(folder.parent / "wide.safetensors", torch.randn(2, 999))
    return folder


def hostile_pickle(folder: Path) -> Path:
    good(folder)

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {folder.parent / 'PWNED'}",))

    torch.save({"string_to_param": {"*": Evil()}}, folder.parent / "evil.pt")
    return folder


def incomplete_model(missing: str):
    def build(folder: Path) -> Path:
        good(folder)
        shutil.copytree(_asset("toy_base"), folder.parent / "model")
        shutil.rmtree(folder.parent / "model" / missing)
        return folder

    return build
