"""Latent caching: batches streamed from disk, and the on-disk cache's hits, misses and invalidation."""

import pytest
import torch
from PIL import Image

from lit_ti.data import ConceptDataModule
from lit_ti.data.latents import vae_fingerprint


class CountingEncoder:
    """Stand-in VAE: 8×8 average pooling (mean), std 0.5; counts the images it encodes and the largest batch."""

    def __init__(self, scale: float = 1.0):
        self.vae = torch.nn.Conv2d(3, 4, 1)  # only its weights matter: they are the fingerprint
        torch.nn.init.constant_(self.vae.weight, scale)
        torch.nn.init.zeros_(self.vae.bias)
        self.images = 0
        self.largest = 0
        self.scale = scale

    def __call__(self, pixels):
        self.images += pixels.shape[0]
        self.largest = max(self.largest, pixels.shape[0])
        mean = torch.nn.functional.avg_pool2d(pixels, 8).repeat(1, 2, 1, 1)[:, :4] * self.scale
        return mean, torch.full_like(mean, 0.5)


def _dm(folder, cache, **kw):
    return ConceptDataModule(str(folder), name="zz", cache_dir=str(cache), **{"latent_sampling": "random", **kw})


def _cache(dm, enc, **kw):
    dm.cache_latents(enc, resolution=32, batch_size=2, vae=enc.vae, **kw)
    return dm


def _files(cache):
    return {p: p.stat().st_mtime_ns for p in cache.rglob("*.safetensors")}


def test_batches_are_streamed_never_the_whole_folder(concept_dir, tmp_path):
    enc = CountingEncoder()
    dm = ConceptDataModule(str(concept_dir), name="zz", flip_p=0.5)
    dm.cache_latents(enc, resolution=32, batch_size=2)
    assert enc.images == 8 and enc.largest == 2  # 4 images × 2 views, 2 at a time
    assert dm.pixel_list is None and dm.std is None  # only latents are kept ("once": the sample itself)


@pytest.mark.parametrize(("resolution", "largest"), [(32, 4), (256, 4), (512, 1), (768, 1)])
def test_the_vae_never_takes_more_than_one_512px_image_at_once(concept_dir, resolution, largest):
    """The one-off VAE pass must not need more memory than training: 8 images at 512 px peaked at 8.2 GiB
    on a GPU where the SD1.5 step needs 3.2 GiB. Small sizes still batch (4 images here)."""
    enc = CountingEncoder()
    ConceptDataModule(str(concept_dir), name="zz").cache_latents(enc, resolution=resolution, batch_size=8)
    assert enc.images == 4 and enc.largest == largest


def test_second_run_hits_and_equals_the_first(concept_dir, tmp_path):
    cache = tmp_path / "cache"
    first = _cache(_dm(concept_dir, cache, flip_p=0.5), enc := CountingEncoder())
    assert enc.images == 8 and len(_files(cache)) == 8  # one file per image and view
    again = _cache(_dm(concept_dir, cache, flip_p=0.5), enc2 := CountingEncoder())
    assert enc2.images == 0  # no VAE pass at all
    assert all(torch.equal(a, b) for a, b in zip(first.mean, again.mean))
    assert all(torch.equal(a, b) for a, b in zip(first.std, again.std))


def test_a_changed_image_is_the_only_miss(concept_dir, tmp_path):
    cache = tmp_path / "cache"
    _cache(_dm(concept_dir, cache), CountingEncoder())
    before = _files(cache)
    Image.new("RGB", (48, 48), (1, 2, 3)).save(concept_dir / "001-a square thing.png")
    dm = _cache(_dm(concept_dir, cache), enc := CountingEncoder())
    assert enc.images == 1 and len(_files(cache)) == len(before) + 1
    assert torch.allclose(dm.mean[1][0, 0], torch.full((4, 4), 1 / 127.5 - 1))  # the new image's latents


def test_every_setting_that_changes_latents_misses(concept_dir, tmp_path):
    cache = tmp_path / "cache"
    _cache(_dm(concept_dir, cache), CountingEncoder())
    for kw, enc, misses in [
        ({"crop": "squash"}, CountingEncoder(), 4),
        ({"resolution": 48}, CountingEncoder(), 4),
        ({}, CountingEncoder(scale=2.0), 4),  # another VAE (other weights)
        ({"flip_p": 0.5}, CountingEncoder(), 4),  # only the mirrored views are new
        ({"buckets": True, "bucket_step": 8, "bucket_min_side": 16}, CountingEncoder(), 2),  # 2 leave the square
    ]:
        _cache(_dm(concept_dir, cache, **kw), enc)
        assert enc.images == misses, kw
    _cache(_dm(concept_dir, cache, latent_sampling="deterministic"), enc := CountingEncoder())
    assert enc.images == 0  # sampling is applied after the cache: it holds mean and std


def test_a_damaged_cache_file_is_a_miss_and_is_rewritten(concept_dir, tmp_path):
    cache = tmp_path / "cache"
    first = _cache(_dm(concept_dir, cache), CountingEncoder())
    victim = sorted(_files(cache))[0]
    victim.write_bytes(b"\x00garbage")
    again = _cache(_dm(concept_dir, cache), enc := CountingEncoder())
    assert enc.images == 1 and victim.stat().st_size > 100
    assert all(torch.equal(a, b) for a, b in zip(first.mean, again.mean))
    assert not list(cache.rglob("*.tmp"))  # written atomically, no temp files left


def test_vae_fingerprint_sees_weights_and_config():
    a, b = torch.nn.Conv2d(3, 4, 1), torch.nn.Conv2d(3, 4, 1)
    b.load_state_dict(a.state_dict())
    assert vae_fingerprint(a) == vae_fingerprint(b)
    with torch.no_grad():
        b.weight[0, 0, 0, 0] += 1e-6
    assert vae_fingerprint(a) != vae_fingerprint(b)


def test_vae_fingerprint_is_the_same_in_every_process():
    """A new process (other hash seed, other module path) must find the cache: keys may not depend on either."""
    import os
    import subprocess
    import sys

    code = (
        "import torch; from diffusers import AutoencoderKL; from lit_ti.data.latents import vae_fingerprint; "
        "torch.manual_seed(0); v = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, layers_per_block=1); "
        "print(vae_fingerprint(v))"
    )
    prints = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout.strip()
        for seed in ("1", "2", "3")
    }
    assert len(prints) == 1 and len(next(iter(prints))) == 64
