"""Aspect-ratio buckets: kohya's grid, crops bounded by the aspect rounding, one bucket per batch, exact resume
and DDP equivalence with buckets, and short fits of all three methods on a mixed portrait/landscape folder."""

import itertools
from functools import partial

import lightning as L
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image

from lit_ti.callbacks import ValidationLoss
from lit_ti.data import ConceptDataModule
from lit_ti.data import buckets as bk
from lit_ti.data.images import resize
from lit_ti.data.sampler import EpochSampler
from lit_ti.methods import DreamArtist, HypernetworkMethod, TextualInversion
from lit_ti.models import TinyBackbone

GRID = dict(resolution=512, step=64, min_side=256, max_side=1024)  # kohya's defaults at 512 px
SMALL = dict(buckets=True, bucket_step=16, bucket_min_side=32, bucket_max_side=128)  # at the tiny 64 px


def test_grid_follows_kohyas_rules():
    grid = bk.bucket_sizes(**GRID)
    assert (512, 512) in grid and (256, 1024) in grid and (1024, 256) in grid and (576, 448) in grid
    assert all(w % 64 == 0 and h % 64 == 0 and min(w, h) >= 256 and max(w, h) <= 1024 for w, h in grid)
    assert all(w * h <= 512 * 512 for w, h in grid)  # never more pixels than the square
    assert sorted((h, w) for w, h in grid) == grid  # portrait and landscape alike
    assert bk.resolve_sides(512, 64, None, None) == (256, 1024)
    assert bk.nearest((2000, 1000), grid) == (704, 320) and bk.nearest((768, 320), grid) == (768, 320)


def _worst_half_gap(grid) -> float:
    """The largest crop share nearest-aspect rounding can leave: half of the widest gap between neighbours."""
    aspects = sorted({w / h for w, h in grid})
    return max(1 - (a / b) ** 0.5 for a, b in itertools.pairwise(aspects))


@settings(max_examples=300, deadline=None)
@given(w=st.integers(200, 4000), h=st.integers(200, 4000))
def test_no_image_is_cropped_by_more_than_the_bucket_rounding(w, h):
    grid = bk.bucket_sizes(**GRID)
    aspects = [bw / bh for bw, bh in grid]
    bucket = bk.nearest((w, h), grid)
    share = bk.crop_share((w, h), bucket)
    assert share == min(bk.crop_share((w, h), b) for b in grid)  # no bucket would crop less
    if min(aspects) <= w / h <= max(aspects):
        assert share <= _worst_half_gap(grid) + 1e-9
    assert share <= bk.crop_share((w, h), (512, 512)) + 1e-9  # never worse than the old square crop


@pytest.mark.parametrize("scale", [1, 1.5, 3])
def test_an_image_with_a_buckets_aspect_keeps_every_edge(scale):
    """Pixels, not geometry: a frame one pixel inside the border survives the resize (nothing is cropped)."""
    grid = bk.bucket_sizes(**GRID)
    for bw, bh in [(320, 704), (768, 320), (512, 512)]:
        w, h = int(bw * scale), int(bh * scale)
        im = Image.new("RGB", (w, h), (0, 0, 0))
        s = max(2, int(4 * scale))
        for box in [(0, 0, w, s), (0, h - s, w, h), (0, 0, s, h), (w - s, 0, w, h)]:
            im.paste((255, 255, 255), box)
        bucket = bk.nearest((w, h), grid)
        assert bucket == (bw, bh)
        out = resize(im, bucket, "center")
        assert out.size == bucket
        for x, y in [(bw // 2, 0), (bw // 2, bh - 1), (0, bh // 2), (bw - 1, bh // 2)]:
            assert out.getpixel((x, y))[0] > 150, (bucket, x, y)


# --- the sampler ----------------------------------------------------------------------------------------------
GROUPS = [0] * 7 + [1] * 3 + [2] * 1 + [0] * 2  # 13 samples in 3 buckets, of 9, 3 and 1


def _batches(sampler, b):
    items = list(sampler)
    return [items[k : k + b] for k in range(0, len(items), b)]


def test_every_batch_comes_from_one_bucket_and_every_sample_is_seen():
    b = 4
    sampler = EpochSampler(len(GROUPS), seed=3, groups=GROUPS, batch=b)
    assert len(sampler) == 12 + 4 + 4  # each bucket padded to whole batches with its own samples
    for _epoch in range(3):
        batches = _batches(sampler, b)
        assert all(len({GROUPS[i] for i, _ in batch}) == 1 for batch in batches)
        assert {i for batch in batches for i, _ in batch} == set(range(len(GROUPS)))
    assert sampler.epoch(0) != sampler.epoch(1) and sampler.epoch(1) == EpochSampler(
        13, 3, groups=GROUPS, batch=4
    ).epoch(1)


def test_ranks_together_take_the_single_process_batch_with_buckets():
    b, world = 2, 3
    single = list(EpochSampler(len(GROUPS), seed=5, groups=GROUPS, batch=b * world))
    shards = [
        list(EpochSampler(len(GROUPS), 5, rank=r, world_size=world, groups=GROUPS, batch=b * world))
        for r in range(world)
    ]
    assert all(len(s) == len(single) // world for s in shards)
    for step in range(len(shards[0]) // b):
        together = [x for s in shards for x in s[step * b : (step + 1) * b]]
        assert sorted(together) == sorted(single[step * b * world : (step + 1) * b * world])
        assert len({GROUPS[i] for i, _ in together}) == 1  # the global batch is from one bucket


def test_shards_resume_at_the_global_position_with_buckets():
    kw = dict(groups=GROUPS, batch=4)
    full = [list(EpochSampler(13, seed=1, rank=r, world_size=2, **kw)) for r in range(2)]
    resumed = [list(EpochSampler(13, seed=1, start=lambda: (0, 8), rank=r, world_size=2, **kw)) for r in range(2)]
    assert resumed == [f[4:] for f in full]


# --- training on a mixed folder ---------------------------------------------------------------------------------
@pytest.fixture
def mixed_dir(tmp_path):
    """Portrait, landscape and square images with captions, at the aspects of four of the tiny grid's buckets."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    for i, (w, h) in enumerate([(60, 100), (100, 60), (64, 64), (40, 120), (96, 160), (70, 70)]):
        im = Image.new("RGB", (w, h), (40 * i, 200 - 30 * i, 90))
        im.paste((255, 255, 255), (4, 4, w // 2, h // 2))
        im.save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(f"a thing, colour {i}, shape {w}x{h}", encoding="utf-8")
    return folder


class Shapes(L.Callback):
    def __init__(self):
        self.shapes = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.shapes.append(tuple(batch["latents"].shape))


METHODS = {
    "ti": (TextualInversion, dict(num_vectors=2, init_text="thing")),
    "dreamartist": (DreamArtist, dict(num_vectors=2, neg_num_vectors=2, reconstruction=True)),
    "hypernetwork": (HypernetworkMethod, dict(optimizer=partial(torch.optim.AdamW, lr=1e-3))),
}


def _fit(root, data, method, steps, ckpt_path=None, every=None, **dm_kw):
    L.seed_everything(0, verbose=False)
    cls, kw = METHODS[method]
    module = cls(TinyBackbone(), name="zz-thing", **kw)
    dm = ConceptDataModule(
        str(data), name="zz-thing", batch_size=2, flip_p=0.5, latent_sampling="random", **{**SMALL, **dm_kw}
    )
    shapes = Shapes()
    callbacks = [shapes, ValidationLoss(draws=1)]  # scores images of every bucket one by one
    if every:
        callbacks.append(ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=every, save_top_k=-1))
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=bool(every),
    )
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    assert float(trainer.callback_metrics["val/loss"]) > 0
    return module, dm, shapes.shapes


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_mixed_folder_trains_in_buckets(tmp_path, mixed_dir, method):
    _module, dm, shapes = _fit(tmp_path, mixed_dir, method, steps=3)
    assert dm.sizes == [(48, 80), (80, 48), (64, 64), (32, 96), (48, 80), (64, 64)]  # whole images, no crop
    assert len(shapes) == 3 and all(s[0] == 2 for s in shapes)  # full batches, each of one size
    assert all(m.shape[-2:] == (h // 8, w // 8) for m, (w, h) in zip(dm.mean, dm.sizes))  # [V, 4, h, w]
    if method == "dreamartist":  # the pixel-space loss gets its images at their bucket's size
        assert all(p.shape[-2:] == (h, w) for p, (w, h) in zip(dm.pixel_list, dm.sizes))


def test_resume_with_buckets_equals_an_uninterrupted_run(tmp_path, mixed_dir):
    straight, _, shapes = _fit(tmp_path / "a", mixed_dir, "ti", steps=8)
    assert len(set(shapes)) > 1  # batches of several buckets were trained
    _fit(tmp_path / "b", mixed_dir, "ti", steps=3, every=3)
    resumed, _, _ = _fit(
        tmp_path / "b", mixed_dir, "ti", steps=8, ckpt_path=tmp_path / "b" / "ckpt" / "epoch=0-step=3.ckpt"
    )
    a, b = straight.bank.get("zz-thing")["text_encoder"], resumed.bank.get("zz-thing")["text_encoder"]
    assert (a - b).abs().max() <= 1e-6
