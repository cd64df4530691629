"""Pivotal tuning (`method=pivotal`): the two phases, what checkpoints hold, what each family's run writes, and
the settings it refuses. The files themselves: test_pivotal_loaders.py (read back, diffusers, generate.py) and
test_pivotal_files.py (the settings that change them, the webui's key rules)."""

import re

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from lit_ti import io
from lit_ti.callbacks import EarlyStop, PreviewImages
from lit_ti.errors import UserError
from lit_ti.io.png_embeddings import NotAnEmbedding
from lit_ti.methods import PivotalTuning
from lit_ti.models import TinyBackbone
from tests.conftest import NAME

PIVOTAL = dict(method_cls=PivotalTuning, ti_steps=2, lora_lr=0.01)


class Snapshots(L.Callback):
    """The bank's vectors and the LoRA's up weights after every optimizer step."""

    def __init__(self) -> None:
        self.bank, self.up = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.bank.append(torch.cat([p.detach().clone() for p in pl_module.bank.parameters()]))
        self.up.append(torch.cat([m["up"].weight.detach().flatten() for m in pl_module.lora.values()]))


@pytest.mark.parametrize(("after", "ti_steps"), [(0.0, 2), (0.5, 0.5)], ids=["frozen-after-2", "half-rate-after-half"])
def test_the_embedding_trains_first_then_the_lora(tmp_path, concept_dir, fit, after, ti_steps):
    snaps = Snapshots()
    kw = {**PIVOTAL, "ti_steps": ti_steps}  # 2 steps, or half of the run's 4
    method, _ = fit(
        tmp_path, concept_dir, max_steps=4, every=100, extra_callbacks=[snaps], embedding_lr_after=after, **kw
    )
    assert all(float(up.abs().max()) == 0 for up in snaps.up[:2])  # steps 1-2: the LoRA is untouched
    assert not torch.equal(snaps.bank[0], snaps.bank[1])  # while the embedding trains
    assert float(snaps.up[3].abs().max()) > 0 and not torch.equal(snaps.up[2], snaps.up[3])  # then the LoRA trains
    assert torch.equal(snaps.bank[1], snaps.bank[3]) == (after == 0)  # the embedding frozen, or at a lower rate
    assert {k.split(".", 1)[0] for k in method.state_dict()} == {"bank", "lora"}  # checkpoints: only what trains
    assert len(method.state_dict()) == 1 + 2 * len(method.lora)


def test_previews_apply_the_lora_gated_by_timestep(tmp_path, concept_dir, fit):
    """`callbacks.preview.lora_max_timestep`: the preview is sampled with the LoRA only below the gate, as
    generate.py applies it (every DDIM timestep is below 1000, none of 4 steps' is below 1)."""
    method, trainer = fit(tmp_path, concept_dir, max_steps=4, every=100, **PIVOTAL)
    shot = {}
    for gate in (None, 1000, 1):
        preview = PreviewImages(str(tmp_path / f"gate-{gate}"), num_inference_steps=4, lora_max_timestep=gate)
        shot[gate] = np.asarray(Image.open(preview.render(trainer, method, 4)))
    assert (shot[None] == shot[1000]).all()
    assert (shot[None] != shot[1]).any()


class LearnedFrom(EarlyStop):
    """callbacks.early_stop whose rule finds the tensors learned at every measurement from `min_steps` on (or
    never); it counts its `val/loss` measurements during training."""

    def __init__(self, min_steps: int, ever: bool = True) -> None:
        super().__init__(draws=1, every_n_steps=1, min_steps=min_steps)
        self.ever, self.during = ever, 0

    def stops(self, snapshots) -> bool:
        return self.ever

    def measure(self, trainer, pl_module) -> float:
        self.during += trainer.training
        return super().measure(trainer, pl_module)


@pytest.mark.parametrize("ever", [True, False], ids=["learned-at-2", "never-learned"])
def test_auto_switches_when_learned_and_the_lora_gets_its_steps(tmp_path, concept_dir, fit, ever):
    """`ti_steps: auto`: the early-stop verdict ends the embedding phase, not the run; the LoRA then trains
    `lora_steps` and the run ends. Never learned, the LoRA still gets its steps before `max_steps`."""
    snaps, rule = Snapshots(), LearnedFrom(2, ever)
    kw = {**PIVOTAL, "ti_steps": "auto", "lora_steps": 3}
    method, trainer = fit(tmp_path, concept_dir, max_steps=8, every=100, extra_callbacks=[snaps, rule], **kw)
    switch = 2 if ever else 5  # learned after step 2, or the latest switch: max_steps - lora_steps
    assert method.switch_step == switch and trainer.global_step == (5 if ever else 8)
    assert all(float(up.abs().max()) == 0 for up in snaps.up[:switch])  # the LoRA untouched until the switch
    assert not torch.equal(snaps.bank[switch - 2], snaps.bank[switch - 1])  # the embedding trains until then
    assert float(snaps.up[switch].abs().max()) > 0  # then the LoRA trains, the embedding frozen
    assert all(torch.equal(snaps.bank[switch - 1], b) for b in snaps.bank[switch:])
    assert rule.reason is None  # the verdict did not end the run
    assert rule.during == (2 if ever else 8)  # and the rule measured no more once it had given it


def test_auto_resumes_after_the_switch_exactly(tmp_path, concept_dir, fit):
    kw = {**PIVOTAL, "ti_steps": "auto", "lora_steps": 3, "dropout": 0.1}
    common = dict(max_steps=8, every=4, **kw)
    straight, _ = fit(tmp_path / "straight", concept_dir, extra_callbacks=[LearnedFrom(2)], **common)
    checkpoint = next((tmp_path / "straight" / "checkpoints").glob("*step=4.ckpt"))  # inside the LoRA phase
    resumed, trainer = fit(
        tmp_path / "resumed", concept_dir, ckpt_path=checkpoint, extra_callbacks=[LearnedFrom(2)], **common
    )
    assert resumed.switch_step == 2 and trainer.global_step == 5
    a, b = straight.state_dict(), resumed.state_dict()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


def test_auto_without_early_stop_or_early_stop_without_auto_is_one_line(tmp_path, concept_dir, fit):
    with pytest.raises(UserError, match=r"method.ti_steps=auto.*callbacks.early_stop"):
        fit(tmp_path / "a", concept_dir, max_steps=2, every=100, **{**PIVOTAL, "ti_steps": "auto"})
    with pytest.raises(UserError, match=r"method.ti_steps=2 with callbacks.early_stop.*ti_steps=auto"):
        fit(tmp_path / "b", concept_dir, max_steps=2, every=100, extra_callbacks=[LearnedFrom(1)], **PIVOTAL)


@pytest.mark.parametrize(
    ("size", "te", "prefixes"),
    [
        ("tiny", True, {"lora_unet", "lora_te"}),
        ("sd2_tiny", False, {"lora_unet"}),
        ("sdxl_tiny", True, {"lora_unet", "lora_te1", "lora_te2"}),
    ],
    ids=["sd1", "sd2", "sdxl"],
)
def test_every_family_writes_a_bundle_that_reads_back(tmp_path, concept_dir, fit, size, te, prefixes):
    kw = dict(PIVOTAL, ti_steps=1)
    method, _ = fit(
        tmp_path, concept_dir, max_steps=2, every=100, backbone_kw={"size": size}, text_encoder_lora=te, **kw
    )
    bundle = io.read_lora(tmp_path / f"{NAME}-lora.safetensors")
    assert {"_".join(name.split("_")[:2]) for name in bundle.modules} == prefixes
    assert set(bundle.modules) == set(method.lora)  # every adapted layer, under the checkpoint's names
    live = method.bank.get(NAME)
    embedded = bundle.embeddings[NAME]
    if size == "sdxl_tiny":
        assert torch.equal(embedded["clip_l"], live["text_encoder"].detach()) and torch.equal(
            embedded["clip_g"], live["text_encoder_2"].detach()
        )
    else:
        assert torch.equal(embedded, live["text_encoder"].detach())
    # the embedding reader sees the bundle (generate.py's folder scan) and the plain files agree with it
    assert [e.name for e in io.read_embedding(tmp_path / f"{NAME}-lora.safetensors")] == [NAME]
    with pytest.raises(NotAnEmbedding):
        io.read_embedding(tmp_path / f"{NAME}-lora-diffusers.safetensors")


def test_precision_and_accumulation(tmp_path, concept_dir, fit):
    kw = {**PIVOTAL, "ti_steps": 1}
    method, trainer = fit(tmp_path, concept_dir, max_steps=2, every=100, precision="bf16-mixed", accumulate=2, **kw)
    assert trainer.global_step == 2
    assert all(p.dtype == torch.float32 for p in method.lora.parameters())  # trained in fp32 under bf16
    assert method.unet_dtype == torch.bfloat16
    assert float(torch.cat([m["up"].weight.flatten() for m in method.lora.values()]).abs().max()) > 0


def test_lora_max_timestep_narrows_the_concepts_timesteps_in_the_lora_phase_only():
    method = PivotalTuning(TinyBackbone(), name=NAME, min_timestep=100, lora_max_timestep=300)
    method.configure_model()
    batch = {"latents": torch.randn(256, 4, 8, 8), "noise_seed": torch.arange(256)}
    method.switch_step = 10**6  # the embedding phase: the method's range [100, 1000)
    _, t = method.draw_noise(batch)
    assert int(t.min()) >= 100 and int(t.max()) >= 900
    method.switch_step = 0  # the LoRA phase: [100, 300)
    _, t = method.draw_noise(batch)
    assert int(t.min()) >= 100 and 280 <= int(t.max()) < 300
    with pytest.raises(UserError, match=r"^method.lora_max_timestep=100: must be above method.min_timestep=100"):
        PivotalTuning(TinyBackbone(), name=NAME, min_timestep=100, lora_max_timestep=100)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("rank", 0, "method.rank"),
        ("alpha", 0, "method.alpha"),
        ("dropout", 1.5, "method.dropout"),
        ("ti_steps", -1, "method.ti_steps"),
        ("ti_steps", 1.5, "method.ti_steps"),
        ("ti_steps", "when-ready", "method.ti_steps"),
        ("lora_steps", 0, "method.lora_steps"),
        ("lora_lr", 0, "method.lora_lr"),
        ("embedding_lr_after", 2, "method.embedding_lr_after"),
        ("lora_dtype", "fp16", "method.lora_dtype"),
        ("lora_targets", "", "method.lora_targets"),
        ("lora_max_timestep", 0, "method.lora_max_timestep"),
        ("lora_max_timestep", 2.5, "method.lora_max_timestep"),
        ("name", "my.cat", "without '.'"),
    ],
)
def test_bad_settings_are_one_line_naming_the_key(key, value, message):
    with pytest.raises(UserError, match=message):
        PivotalTuning(TinyBackbone(), **{"name": NAME, key: value})


def test_sd3_is_refused_in_one_line_before_anything_is_attached():
    from lit_ti.models import TinySD3

    method = PivotalTuning(TinySD3(), name=NAME)
    with pytest.raises(UserError, match=r"^method=pivotal: SD3"):
        method.configure_model()
    assert len(method.lora) == 0


def test_the_toy_pivotal_experiment_switches_when_learned_and_ends_after_the_lora(tmp_path, caplog):
    """`experiment=toy_pivotal` as shipped (ti_steps: auto with early stopping), shortened: a run ends
    `lora_steps` after its switch, with every file written."""
    import json

    import lit_ti.train
    from tests.conftest import compose

    fast = ["callbacks.early_stop.every_n_steps=2", "callbacks.early_stop.min_steps=2", "callbacks.early_stop.window=2"]
    cfg = compose(
        "experiment=toy_pivotal",
        f"paths.output_dir={tmp_path}",
        "trainer.max_steps=16",
        "method.lora_steps=3",
        "callbacks.toy_eval=null",
        "callbacks.preview=null",
        *fast,
    )
    with caplog.at_level("INFO"):
        lit_ti.train.main(cfg)
    switch = int(re.search(r"the LoRA trains from step (\d+) for 3 steps", caplog.text).group(1))
    assert 2 <= switch <= 13
    assert json.loads((tmp_path / "metrics.json").read_text())["step"] == switch + 3
    assert {"toy-concept-lora.safetensors", "toy-concept.safetensors"} <= {p.name for p in tmp_path.iterdir()}
