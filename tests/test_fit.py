"""Short fits of textual inversion on the tiny backbone (CPU)."""

from functools import partial

import lightning as L
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_ti import io
from lit_ti.data import ConceptDataModule
from lit_ti.methods import TextualInversion
from lit_ti.models import TinyBackbone
from tests.conftest import FIT_METHOD, NAME


def test_fit_trains_only_the_bank_and_writes_every_output(tmp_path, concept_dir, fit):
    method, trainer = fit(tmp_path, concept_dir, max_steps=6)
    assert trainer.global_step == 6

    fresh = TinyBackbone().load()
    for part in ("unet", "vae", "text_encoder"):
        before, after = getattr(fresh, part).state_dict(), getattr(method, part).state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before), f"frozen {part} changed"
        assert all(not p.requires_grad for p in getattr(method, part).parameters())
    init = io.load_embedding(tmp_path / "embeddings" / f"{NAME}-3.pt")[f"{NAME}-3"]
    final = io.load_embedding(tmp_path / f"{NAME}.pt")[NAME]
    assert final.shape == (2, 32)
    assert not torch.equal(init, final)
    assert torch.equal(final, method.bank.get(NAME)["text_encoder"].detach())
    assert torch.equal(io.load_embedding(tmp_path / f"{NAME}.safetensors")[NAME], final)

    assert sorted(p.name for p in (tmp_path / "previews").iterdir()) == [f"{NAME}-3.png", f"{NAME}-6.png"]
    rows = (tmp_path / "textual_inversion_loss.csv").read_text().splitlines()
    assert rows[0] == "step,epoch,epoch_step,loss,learn_rate" and len(rows) == 7
    assert rows[1].startswith("1,0,0,")
    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    assert {"train/loss", "train/lr", f"train/emb_norm/{NAME}"} <= set(events.Tags()["scalars"])
    [tag] = [t for t in events.Tags()["images"] if t.startswith("preview/")]  # tagged with its prompt
    shown = events.Images(tag)
    assert [e.step for e in shown] == [3, 6]  # the grid enlarges the images and writes prompt and step above them
    assert shown[-1].width >= 256 and shown[-1].height > shown[-1].width // 2


def test_checkpoint_holds_only_what_trains(tmp_path, concept_dir, fit):
    fit(tmp_path, concept_dir, max_steps=3)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert list(ckpt["state_dict"]) == ["bank.vectors.text_encoder__0"]
    assert (tmp_path / "checkpoints" / "last.ckpt").stat().st_size < 100_000
    assert ckpt["optimizer_states"][0]["state"][0]["exp_avg"].shape == (2, 32)


def test_resume_continues_at_the_step_with_optimizer_state(tmp_path, concept_dir, fit):
    straight, _ = fit(tmp_path / "a", concept_dir, max_steps=8, every=4)
    fit(tmp_path / "b", concept_dir, max_steps=4, every=4)
    ckpt = tmp_path / "b" / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=False)

    seen = {}

    class Probe(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if not seen:
                seen["step"] = trainer.global_step
                seen["exp_avg"] = trainer.optimizers[0].state_dict()["state"][0]["exp_avg"].clone()

    L.seed_everything(0, verbose=False)
    resumed = TextualInversion(TinyBackbone(), **FIT_METHOD)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=8,
        logger=False,
        callbacks=[Probe()],
        enable_progress_bar=False,
        enable_checkpointing=False,
    )
    trainer.fit(resumed, datamodule=ConceptDataModule(dir=str(concept_dir), name=NAME), ckpt_path=ckpt)
    assert seen["step"] == 4 and trainer.global_step == 8
    assert torch.equal(seen["exp_avg"], saved["optimizer_states"][0]["state"][0]["exp_avg"])
    a, b = straight.bank.get(NAME)["text_encoder"], resumed.bank.get(NAME)["text_encoder"]
    assert torch.allclose(a, b, atol=1e-6), "interrupted + resumed run differs from the straight run"


def test_lr_schedule_string_sets_rates_and_ends_training(tmp_path, concept_dir, fit):
    _, trainer = fit(tmp_path, concept_dir, max_steps=10, lr_schedule="0.02:2, 0.001:4", every=0)
    assert trainer.global_step == 4  # the schedule ends before max_steps, as in A1111
    rows = [r.split(",") for r in (tmp_path / "textual_inversion_loss.csv").read_text().splitlines()[1:]]
    assert [float(r[4]) for r in rows] == pytest.approx([0.02, 0.02, 0.001, 0.001])  # rate used by each step


def test_bf16_mixed_and_accumulation_on_cpu(tmp_path, concept_dir, fit):
    method, trainer = fit(tmp_path, concept_dir, max_steps=2, precision="bf16-mixed", accumulate=2, every=0)
    assert method.unet.dtype == torch.bfloat16 and method.text_encoder.dtype == torch.bfloat16
    assert method.bank.vectors["text_encoder__0"].dtype == torch.float32
    assert trainer.global_step == 2 and trainer.fit_loop.epoch_loop.batch_progress.total.completed == 4
    rows = (tmp_path / "textual_inversion_loss.csv").read_text().splitlines()
    assert len(rows) == 3 and all(float(r.split(",")[3]) > 0 for r in rows[1:])


def test_gradient_clipping_goes_through_the_trainer(tmp_path, concept_dir, fit):
    """AdamW normalises step sizes, so use plain SGD to see the clipped gradient norm in the update."""
    sgd = partial(torch.optim.SGD, lr=1.0)
    free, _ = fit(tmp_path / "free", concept_dir, max_steps=1, every=0, optimizer=sgd)
    clipped, _ = fit(
        tmp_path / "clip",
        concept_dir,
        max_steps=1,
        every=0,
        optimizer=sgd,
        trainer_kw={"gradient_clip_val": 1e-4, "gradient_clip_algorithm": "norm"},
    )
    init = TinyBackbone().load()
    start = clipped.initial_vectors(init, "square thing", 2)["text_encoder"]
    moved = float((clipped.bank.get(NAME)["text_encoder"].detach() - start).norm())
    assert moved == pytest.approx(1e-4, rel=1e-2)
    assert float((free.bank.get(NAME)["text_encoder"].detach() - start).norm()) > 10 * moved


def test_v_prediction_backbone_trains(tmp_path, concept_dir):
    L.seed_everything(0, verbose=False)
    method = TextualInversion(TinyBackbone(prediction_type="v_prediction"), name=NAME)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False, enable_checkpointing=False
    )
    trainer.fit(method, datamodule=ConceptDataModule(dir=str(concept_dir), name=NAME))
    assert method.backbone.prediction_type == "v_prediction"
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


@torch.no_grad()
def test_written_file_loads_into_diffusers_and_changes_the_image(tmp_path, concept_dir, fit):
    method, _ = fit(tmp_path, concept_dir, max_steps=6, every=0)
    pipe = TinyBackbone().load().pipeline()  # the same backbone, fresh
    prompt = f"a photo of {NAME}"

    def generate():
        return pipe(prompt, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images

    without = generate()
    pipe.load_textual_inversion(str(tmp_path / f"{NAME}.pt"))
    with_token = generate()
    assert not torch.allclose(torch.from_numpy(without), torch.from_numpy(with_token), atol=1e-3)
    # diffusers conditions exactly as training did
    theirs, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
    assert torch.allclose(theirs, method.encode_prompts([prompt]).states, atol=1e-5)


def extra_guard(trainer):
    from lit_ti.callbacks import NanGuard

    return next(c for c in trainer.callbacks if isinstance(c, NanGuard))


class Poisoned(TextualInversion):
    """A loss that turns NaN on the steps listed in `bad` (every step when `bad` is None)."""

    bad: frozenset | None = frozenset({2, 3})

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.bad is None or self.global_step in self.bad:
            loss = loss * float("nan")
        return loss


def test_nan_steps_are_skipped_and_never_written(tmp_path, concept_dir, fit):
    from lit_ti.callbacks import NanGuard

    method, trainer = fit(
        tmp_path, concept_dir, max_steps=6, every=3, method_cls=Poisoned, extra_callbacks=[NanGuard(3)]
    )
    assert trainer.global_step == 6
    assert extra_guard(trainer).skipped == 2
    for path in [tmp_path / f"{NAME}.pt", tmp_path / "embeddings" / f"{NAME}-3.pt"]:
        assert torch.isfinite(io.load_embedding(path)[path.stem]).all()
    start = method.initial_vectors(method.backbone, "square thing", 2)["text_encoder"]
    assert not torch.equal(method.bank.get(NAME)["text_encoder"].detach(), start)  # the good steps trained


def test_only_nan_steps_stop_training_with_the_initial_vectors(tmp_path, concept_dir, fit):
    from lit_ti.callbacks import NanGuard

    class AlwaysBad(Poisoned):
        bad = None

    method, trainer = fit(
        tmp_path, concept_dir, max_steps=20, every=0, method_cls=AlwaysBad, extra_callbacks=[NanGuard(3)]
    )
    assert trainer.global_step == 3  # stopped after 3 bad steps in a row
    start = method.initial_vectors(method.backbone, "square thing", 2)["text_encoder"]
    assert torch.equal(io.load_embedding(tmp_path / f"{NAME}.pt")[NAME], start)
    with pytest.raises(ValueError, match="non-finite"):
        io.save_embedding(tmp_path / "bad.pt", torch.full((2, 32), float("nan")))


def test_timestep_range_bounds_every_draw():
    """min/max_timestep hold for both noise paths: per-sample seeds (the datamodule's) and the global RNG."""
    from lit_ti.errors import UserError

    method = TextualInversion(TinyBackbone(), **FIT_METHOD, min_timestep=700, max_timestep=710)
    method.configure_model()
    latents = torch.zeros(64, 4, 8, 8)
    for batch in ({"latents": latents, "noise_seed": torch.arange(64)}, {"latents": latents}):
        _, timesteps = method.draw_noise(batch)
        assert timesteps.shape == (64,)
        assert int(timesteps.min()) >= 700 and int(timesteps.max()) < 710
        assert len(set(timesteps.tolist())) > 5  # still drawn, not pinned to one value
    with pytest.raises(UserError, match="min_timestep=500, method.max_timestep=400"):
        TextualInversion(TinyBackbone(), **FIT_METHOD, min_timestep=500, max_timestep=400)
    too_far = TextualInversion(TinyBackbone(), **FIT_METHOD, max_timestep=5000)
    with pytest.raises(UserError, match="max_timestep=5000: the scheduler has 1000 timesteps"):
        too_far.configure_model()
