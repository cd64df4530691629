"""A1111 embeddings inside PNG images: text chunk and pixel blocks, against an encoder written from the spec."""

import base64
import json
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from lit_ti import io
from lit_ti.errors import UserError
from lit_ti.io.png_embeddings import KEY, lcg
from tests.conftest import NAME


def test_lcg_matches_the_webui_self_test():
    stream = lcg(100_100)
    assert list(stream[:8]) == [253, 242, 127, 44, 157, 27, 239, 133]
    assert int(stream[100:].astype(np.int64).sum()) == 12_731_374


def spec_png(path, vectors: torch.Tensor, name: str, height: int = 40, text_chunk: bool = False) -> None:
    """An independent writer, straight from the spec: zero-padded nibble blocks (the pre-2023 webui), random
    high nibbles where the webui draws its dots, a random caption image, black separator columns."""
    data = {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": {"TORCHTENSOR": vectors.numpy().tolist()}},
        "name": name,
        "step": 7,
        "sd_checkpoint": None,
        "sd_checkpoint_name": None,
    }
    raw = json.dumps(data).encode()
    payload = np.frombuffer(zlib.compress(raw, 9), dtype=np.uint8)
    n, h = len(payload), height
    m1 = n + (h - n % h)
    total = m1 + (3 * h - m1 % (3 * h))
    seed, stream = 0, []
    for _ in range(total):
        seed = (1664525 * seed + 1013904223) % 2**32
        stream.append(seed % 255)
    noise = (np.array(stream, dtype=np.uint8) & 0x0F).reshape(h, -1, 3)
    rng = np.random.default_rng(0)
    blocks = []
    for nibbles in (payload & 0x0F, payload >> 4):
        padded = np.zeros(total, dtype=np.uint8)
        padded[:n] = nibbles
        dots = rng.integers(0, 16, (h, total // (3 * h), 3), dtype=np.uint8) << 4
        blocks.append(padded.reshape(h, -1, 3) ^ noise ^ dots)
    caption = rng.integers(1, 256, (h, 30, 3), dtype=np.uint8)
    gap = np.zeros((h, 1, 3), dtype=np.uint8)
    info = PngImagePlugin.PngInfo()
    if text_chunk:
        info.add_text(KEY, base64.b64encode(raw).decode())
    Image.fromarray(np.concatenate([blocks[0], gap, caption, gap, blocks[1]], axis=1)).save(path, pnginfo=info)


@pytest.mark.parametrize("text_chunk", [False, True])
def test_reads_images_written_from_the_spec(tmp_path, text_chunk):
    vectors = torch.randn(3, 32)
    spec_png(tmp_path / "shared.png", vectors, "their-style", text_chunk=text_chunk)
    loaded = io.load_embedding(tmp_path / "shared.png")
    assert list(loaded) == ["their-style"]  # named by its data, as the webui does
    assert torch.equal(loaded["their-style"], vectors)


def test_round_trip_text_chunk_and_pixels_alone(tmp_path):
    vectors = torch.randn(4, 32) * 0.03
    preview = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    path = io.save_image_embedding(tmp_path / "mine-10.png", preview, vectors, step=10, sd_checkpoint="abc123")
    with Image.open(path) as im:
        assert KEY in im.text and im.height == 64 and im.width > 64 + 2
        pixels_only = im.convert("RGB")
    pixels_only.save(tmp_path / "stripped.png")  # what a chat app leaves: no text chunk
    for file in (path, tmp_path / "stripped.png"):
        (entry,) = io.read_embedding(file)
        assert entry.name == "mine-10" and entry.step == 10 and entry.sd_checkpoint == "abc123"
        assert torch.equal(entry.vectors, vectors)


def test_plain_images_and_lossy_damage_are_user_errors(tmp_path):
    Image.new("RGB", (32, 32), (120, 30, 30)).save(tmp_path / "plain.png")
    with pytest.raises(UserError, match="without an embedding"):
        io.load_embedding(tmp_path / "plain.png")


def test_previews_during_training_carry_the_embedding(tmp_path, concept_dir, fit):
    fit(tmp_path, concept_dir, max_steps=3, every=3)
    png = io.load_embedding(tmp_path / "image_embeddings" / f"{NAME}-3.png")
    pt = io.load_embedding(tmp_path / "embeddings" / f"{NAME}-3.pt")
    assert list(png) == [f"{NAME}-3"]
    assert torch.equal(png[f"{NAME}-3"], pt[f"{NAME}-3"])  # float32 survives the JSON round trip exactly
