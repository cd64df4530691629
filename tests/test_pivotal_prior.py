"""Prior images (`data.prior_dir`, DreamBooth's class images): every training sample is paired with one, drawn
from the sample's own seed, and pivotal tuning's LoRA is also trained to denoise it under its own caption."""

import pytest
import torch
from PIL import Image

from lit_ti.data import ConceptDataModule
from lit_ti.errors import UserError
from lit_ti.methods import PivotalTuning, TextualInversion
from lit_ti.models import TinyBackbone
from tests.conftest import NAME, make_concept_dir


def pooled(pixels):
    """A stand-in VAE: 8×8 average pooling to 4 channels, std 1."""
    mean = torch.nn.functional.avg_pool2d(pixels, 8)[:, [0, 1, 2, 0]]
    return mean, torch.ones_like(mean)


@pytest.fixture
def prior_dir(tmp_path):
    """Three prior images: two with sidecar captions, one without (its file name has no words)."""
    folder = tmp_path / "prior"
    folder.mkdir()
    for i, colour in enumerate([(10, 10, 10), (128, 128, 128), (240, 240, 240)]):
        Image.new("RGB", (40, 56), colour).save(folder / f"{i:03d}.png")
        if i < 2:
            (folder / f"{i:03d}.txt").write_text(f"a large grey square, shade {i}\n", encoding="utf-8")
    return folder


def samples(dm: ConceptDataModule, items) -> list[dict]:
    dataset = dm.train_dataloader().dataset
    return [dataset[item] for item in items]


def test_each_sample_gets_a_prior_image_from_its_own_seed_and_keeps_its_own_draws(concept_dir, prior_dir):
    items = [(i, 1000 + 7 * i) for i in range(12)]
    kw = dict(dir=str(concept_dir), name=NAME, latent_sampling="deterministic", buckets=True, bucket_step=8)
    plain = ConceptDataModule(**kw)
    prior = ConceptDataModule(**kw, prior_dir=str(prior_dir), prior_prompt="a photo of a square")
    for dm in (plain, prior):
        dm.cache_latents(pooled, resolution=32)
    assert len(set(plain.sizes)) > 1  # the concept's images are in several buckets ...
    without, with_prior = samples(plain, items), samples(prior, items)
    for a, b in zip(without, with_prior):
        assert a["prompt"] == b["prompt"] and a["noise_seed"] == b["noise_seed"]
        assert torch.equal(a["latents"], b["latents"])  # the sample's own draws are those of a run without
        assert b["prior_latents"].shape == (4, 4, 4)  # ... the prior images at the square size, one shape
    assert {s["prior_prompt"] for s in with_prior} == {
        "a large grey square, shade 0",  # sidecar captions as written, never filled into the template
        "a large grey square, shade 1",
        "a photo of a square",  # data.prior_prompt for the image without one
    }
    again = samples(prior, items)
    assert [s["prior_prompt"] for s in again] == [s["prior_prompt"] for s in with_prior]
    assert all(torch.equal(a["prior_latents"], b["prior_latents"]) for a, b in zip(again, with_prior))
    assert len({s["prior_noise_seed"] for s in with_prior}) == len(items)
    batch = next(iter(prior.train_dataloader()))
    moved = PivotalTuning(TinyBackbone(), name=NAME).transfer_batch_to_device(batch, torch.device("cpu"), 0)
    assert moved["prior_latents"].shape[1:] == (4, 4, 4) and moved["prior_noise_seed"].device.type == "cpu"


def test_prior_images_need_a_caption_or_prior_prompt(tmp_path, concept_dir, prior_dir):
    with pytest.raises(UserError, match=r"^data.prior_dir: 1 image\(s\) have no caption.*000-|data.prior_prompt"):
        ConceptDataModule(dir=str(concept_dir), name=NAME, prior_dir=str(prior_dir)).setup()
    with pytest.raises(UserError, match="^data.prior_dir: .*is not a folder"):
        ConceptDataModule(dir=str(concept_dir), name=NAME, prior_dir=str(tmp_path / "missing")).setup()
    with pytest.raises(UserError, match="^data.prior_prompt="):
        ConceptDataModule(dir=str(concept_dir), name=NAME, prior_dir=str(prior_dir), prior_prompt=3)


def a_pivotal_batch(method: PivotalTuning) -> dict:
    side = method.backbone.resolution // method.backbone.vae_scale_factor
    g = torch.Generator().manual_seed(1)
    return {
        "latents": torch.randn(2, 4, side, side, generator=g),
        "prompt": [f"a photo of {NAME}", f"a large {NAME}"],
        "noise_seed": torch.tensor([5, 6]),
        "prior_latents": torch.randn(2, 4, side, side, generator=g),
        "prior_prompt": ["a photo of a cat", "a large dog"],
        "prior_noise_seed": torch.tensor([7, 8]),
    }


def test_the_prior_term_is_the_prior_images_denoising_loss_and_trains_only_the_lora():
    from lit_ti import losses

    torch.manual_seed(0)
    # lora_max_timestep narrows only the concept's timesteps: the prior term keeps the method's whole range
    method = PivotalTuning(TinyBackbone(), name=NAME, prior_weight=3.0, lora_max_timestep=2)
    method.configure_model()
    with torch.no_grad():
        for p in method.lora.parameters():
            p.normal_(0, 0.3)
    method.log_now, batch = False, a_pivotal_batch(method)
    method.switch_step = 10**6  # the embedding phase: no term (the LoRA is not trained yet)
    out = method.shared_step(batch)
    assert method.step_loss(out) is out["loss"]
    method.switch_step = 0
    out = method.shared_step(batch)
    term = method.step_loss(out) - out["loss"]
    latents = batch["prior_latents"]
    noise, t = losses.draw_noise(latents, batch["prior_noise_seed"], *method.timestep_range)
    pred = method.call_unet(method.objective.noisy(latents, noise, t), t, method.encode_prompts(batch["prior_prompt"]))
    expected = torch.nn.functional.mse_loss(pred, method.objective.target(latents, noise, t))
    assert float(expected.detach()) > 1e-3 and torch.allclose(term, 3.0 * expected, rtol=1e-4)
    method.zero_grad()
    term.backward()
    assert any(float(p.grad.abs().max()) > 0 for p in method.lora.parameters())
    assert all(p.grad is None or not p.grad.any() for p in method.bank.parameters())  # no name in the captions


def test_a_fit_logs_the_prior_term_and_methods_without_it_refuse_prior_images(tmp_path, concept_dir, fit):
    prior = make_concept_dir(tmp_path / "prior", n=3)
    dm_kw = {"prior_dir": str(prior), "prior_prompt": "a photo of a thing"}
    _, trainer = fit(tmp_path / "run", concept_dir, method_cls=PivotalTuning, ti_steps=2, max_steps=5, dm_kw=dm_kw)
    assert float(trainer.callback_metrics["train/loss_prior"]) > 0
    with pytest.raises(UserError, match="^data.prior_dir: TextualInversion trains only through the concept's token"):
        fit(tmp_path / "ti", concept_dir, method_cls=TextualInversion, dm_kw=dm_kw)
