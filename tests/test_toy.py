"""The toy world, its classifier and the shipped base model (the evaluator: test_toy_evaluation.py)."""

import json
import random
import sys
from functools import partial

import lightning as L
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from lit_ti.methods import TextualInversion
from lit_ti.models import DiffusersFolder
from lit_ti.toy import classifier, pretrain
from lit_ti.toy.evaluation import evaluate
from lit_ti.toy.world import (
    BACKGROUNDS,
    COLOURS,
    HELD_OUT,
    NOVEL_SHAPES,
    SHAPES,
    SIZES,
    Scene,
    concept_parts,
    oracle_words,
    random_scene,
    render,
    seen_concepts,
    write_concept,
)
from lit_ti.train import _asset
from tests.conftest import compose

TOY = _asset("toy_base")


def test_world_is_deterministic_and_captioned(tmp_path):
    folder = write_concept("purple_star", tmp_path / "ps", n=3, seed=1)
    again = write_concept("purple_star", tmp_path / "ps2", n=3, seed=1)
    assert sorted(p.name for p in folder.iterdir()) == [
        "0000.png",
        "0000.txt",
        "0001.png",
        "0001.txt",
        "0002.png",
        "0002.txt",
    ]
    assert (folder / "0000.png").read_bytes() == (again / "0000.png").read_bytes()
    caption = (folder / "0000.txt").read_text()
    assert "purple star on a" in caption
    named = write_concept("purple_star", tmp_path / "named", n=3, seed=1, named=True)  # toy_prompts=captions
    assert (named / "0002.png").read_bytes() == (folder / "0002.png").read_bytes()
    assert (named / "0000.txt").read_text() == caption.replace("purple star", "[name]")
    assert Image.open(folder / "0000.png").size == (64, 64)
    scene = Scene("cross", "red", "black", "small", 0.5, 0.5)
    assert scene.caption() == "a small red cross on a black background" and scene.caption("object") == "a red cross"
    with pytest.raises(ValueError, match="unknown toy concept"):
        concept_parts("pink_blob")


def test_held_out_concepts_are_built_from_seen_parts():
    seen = seen_concepts()
    assert not set(HELD_OUT) & set(seen)
    for concept in HELD_OUT:
        colour, shape = concept_parts(concept)
        assert any(c.startswith(colour + "_") for c in seen) and any(c.endswith("_" + shape) for c in seen)
    rng = random.Random(0)
    assert all(random_scene(rng).concept in seen for _ in range(200))


def test_shipped_classifier_reads_renders():
    judge = classifier.load()
    assert classifier.accuracy(judge, n=300, seed=7) >= 0.95
    shapes = [render(Scene(s, "blue", "white", "large", 0.5, 0.5)) for s in SHAPES]
    assert judge.read(classifier.to_tensor(shapes)) == [f"blue_{s}" for s in SHAPES]


def test_novel_shapes_are_outside_the_base_models_world_and_judged_by_their_own_classifier(tmp_path):
    """A shape the base never saw (the test pivotal tuning is for): not in any concept pretraining renders,
    judged only by the second classifier, which reads the known shapes as the shipped one does; its recovery's
    "true words" are the nearest known shape's."""
    assert NOVEL_SHAPES and not set(NOVEL_SHAPES) & set(SHAPES)
    rng = random.Random(0)
    assert not any(random_scene(rng).shape in NOVEL_SHAPES for _ in range(500))  # pretraining's scenes
    assert not any(c.split("_")[1] in NOVEL_SHAPES for c in seen_concepts() + list(HELD_OUT))
    assert oracle_words("red_ring") == "red circle" and oracle_words("purple_star") == "purple star"
    write_concept("red_ring", tmp_path / "ring", n=1)
    assert (tmp_path / "ring" / "0000.txt").read_text().split(" on ")[0].endswith("red ring")

    shipped, novel = classifier.judge("purple_star"), classifier.judge("red_ring")
    assert shipped.shapes == SHAPES and novel.shapes == SHAPES + NOVEL_SHAPES
    assert classifier.accuracy(novel, n=300, seed=7) >= 0.95
    both = [Scene(s, c, bg, "large", 0.5, 0.5) for s in SHAPES + NOVEL_SHAPES for c in COLOURS for bg in BACKGROUNDS]
    read = novel.read(classifier.to_tensor([render(s) for s in both]))
    assert sum(r == s.concept for r, s in zip(read, both)) >= 0.95 * len(both)
    rings = [s for s in both if s.shape in NOVEL_SHAPES]
    assert all(r == s.concept for r, s in zip(novel.read(classifier.to_tensor([render(s) for s in rings])), rings))
    assert not any(r.endswith(NOVEL_SHAPES) for r in shipped.read(classifier.to_tensor([render(s) for s in rings])))
    classifier.save(novel, tmp_path / "judge.safetensors")  # the file names the shapes its head reads
    assert classifier.load(tmp_path / "judge.safetensors").shapes == novel.shapes


def test_shipped_base_model_loads_generically_and_fits_the_budget():
    from pathlib import Path

    size = sum(f.stat().st_size for f in Path(TOY).rglob("*") if f.is_file())
    assert size <= 20 * 2**20
    bb = DiffusersFolder(TOY).load()
    assert len(bb.tokenizer) == 49408 and bb.resolution == 64
    recipe = json.loads((Path(TOY) / "recipe.json").read_text())
    assert recipe["sample_accuracy"] >= 0.8


@torch.no_grad()
def test_base_model_draws_what_it_is_told():
    bb = DiffusersFolder(TOY).load()
    from diffusers import DDIMScheduler

    pipe = bb.pipeline(DDIMScheduler.from_config(bb.scheduler.config))
    wanted = ["red_circle", "blue_square", "yellow_star", "green_cross", "purple_triangle", "orange_circle"]
    images = pipe(
        [f"a {c.replace('_', ' ')}" for c in wanted],
        num_inference_steps=15,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    read = classifier.load().read(images * 2 - 1)
    assert sum(a == b for a, b in zip(read, wanted)) >= 4, read


def test_toy_data_trains_on_the_latents_the_base_model_knows():
    """Vectors started at the true words stay at the true words' held-out loss when trained on the toy data as
    configured (the VAE means the toy UNet was trained on); on one VAE sample per image (A1111's `once`) they
    drift off it, which capped every toy result until the toy data switched to the means."""
    ratios = {}
    for mode, extra in (("configured", []), ("once", ["data.latent_sampling=once"])):
        L.seed_everything(0, verbose=False)
        datamodule = instantiate(compose("toy_concept=orange_cross", *extra).data)
        method = TextualInversion(
            DiffusersFolder(TOY),
            name="toy-concept",
            num_vectors=2,
            init_text="orange cross",
            optimizer=partial(torch.optim.AdamW, lr=0.01, weight_decay=0.0),
        )
        trainer = L.Trainer(
            accelerator="cpu",
            max_steps=50,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(method, datamodule)
        r = evaluate(method, "orange_cross", {k: v.detach().clone() for k, v in method.bank.vectors.items()}, samples=0)
        ratios[mode] = r["loss_learned"] / r["loss_oracle"]
    assert ratios["configured"] < 1.03, ratios
    assert ratios["once"] > 1.05, ratios


def test_toy_masks_weight_the_whole_object_and_nothing_far_from_it(tmp_path, monkeypatch):
    """`toy_masks=true`: every render of the folder data=toy trains on has a subject mask that the loss uses:
    weight 1 on every pixel of the object and on a ring's hole (the hole is the concept), 0 far from it."""
    from lit_ti.toy.style import OBJECT_DISTANCE, background

    monkeypatch.chdir(tmp_path)  # the toy folders render into outputs/toy_data under the working directory

    def fit(*overrides: str):  # two steps on the toy model, whose VAE is 4x (SD's are 8x)
        dm = instantiate(compose("toy_concept=red_ring", "toy_images=4", *overrides).data)
        method = TextualInversion(DiffusersFolder(TOY), name="toy-concept", init_text="red circle")
        trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False)
        trainer.fit(method, dm)
        return dm

    dm = fit("toy_masks=true")
    assert dm.weight_list is not None and len(dm.weight_list) == 4
    rng = random.Random("red_ring-0")  # write_concept's scenes, in order
    for i, weight in enumerate(dm.weight_list):
        scene = random_scene(rng, "red_ring")
        x = classifier.to_tensor([render(scene)])  # [1, 3, 64, 64] in [-1, 1]
        att = torch.from_numpy(np.asarray(Image.open(f"{dm.dir}/{i:04d}_att.png"), dtype=np.float32))
        assert set(att.unique().tolist()) == {0.0, 127.0}
        drawn = (x - background(x)).abs().sum(1)[0] > OBJECT_DISTANCE  # [64, 64]
        ys, xs = torch.meshgrid(torch.arange(64.0) + 0.5, torch.arange(64.0) + 0.5, indexing="ij")
        dist = ((xs - scene.x * 64) ** 2 + (ys - scene.y * 64) ** 2).sqrt() / (SIZES[scene.size] * 64)
        assert (att[drawn] == 127).all() and (att[dist < 1] == 127).all(), (i, scene)  # object and hole
        assert (att[dist > 1.3] == 0).all(), (i, scene)
        assert weight.shape[-2:] == dm.mean[i].shape[-2:] == (16, 16), weight.shape  # [V, 1, h, w]
        assert weight.amax() == 1 and weight.amin() == 0
    unmasked = fit()
    assert unmasked.weight_list is None and unmasked.dir != dm.dir


def test_recipe_short_version_writes_a_loadable_model(tmp_path, monkeypatch):
    out = tmp_path / "toy"
    argv = [
        "pretrain",
        str(out),
        "--images",
        "32",
        "--vae-steps",
        "2",
        "--unet-steps",
        "2",
        "--batch",
        "8",
        "--eval-samples",
        "2",
        "--device",
        "cpu",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    pretrain.main()
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["unet_steps"] == 2 and recipe["size_mib"] <= 20
    bb = DiffusersFolder(str(out)).load()
    assert bb.vae.config.scaling_factor > 0 and len(bb.tokenizer) == 49408
