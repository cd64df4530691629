"""Pivotal tuning (`method=pivotal`): the two phases, what checkpoints hold, and the files other tools load
(A1111's LoRA loader rules, diffusers' `load_lora_weights`, lit_ti's own `generate.py`)."""

import re

import lightning as L
import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

from lit_ti import io
from lit_ti.callbacks import EarlyStop
from lit_ti.errors import UserError
from lit_ti.io.loras import LoraModule, kohya_name
from lit_ti.io.png_embeddings import NotAnEmbedding
from lit_ti.methods import PivotalTuning
from lit_ti.models import TinyBackbone
from lit_ti.modules import lora
from tests.conftest import NAME
from tests.ldm_layout import unet_keys

PIVOTAL = dict(method_cls=PivotalTuning, ti_steps=2, lora_lr=0.01)


class Snapshots(L.Callback):
    """The bank's vectors and the LoRA's up weights after every optimizer step."""

    def __init__(self) -> None:
        self.bank, self.up = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.bank.append(torch.cat([p.detach().clone() for p in pl_module.bank.parameters()]))
        self.up.append(torch.cat([m["up"].weight.detach().flatten() for m in pl_module.lora.values()]))


def randomise(method: PivotalTuning, seed: int = 0) -> None:
    """Non-zero LoRA weights (a fresh adapter's up weights are zero and change nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in method.lora.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


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


def test_a_rank_alpha_file_round_trips_bit_exactly(tmp_path):
    g = torch.Generator().manual_seed(0)
    modules = {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": LoraModule(
            torch.randn(3, 32, generator=g), torch.randn(32, 3, generator=g), torch.tensor(1.5)
        ),
        "lora_te_text_model_encoder_layers_0_self_attn_k_proj": LoraModule(
            torch.randn(8, 16, generator=g).half(), torch.randn(16, 8, generator=g).half(), torch.tensor(4.0).half()
        ),
    }
    vectors = {
        "zz-a": torch.randn(2, 32, generator=g),
        "zz-b": {"clip_l": torch.randn(1, 8), "clip_g": torch.randn(1, 12)},
    }
    path = io.save_lora(tmp_path / "zz-a-lora.safetensors", modules, embeddings=vectors, metadata={"step": 7})
    back = io.read_lora(path)
    assert back.modules.keys() == modules.keys()
    for name, m in modules.items():
        got = back.modules[name]
        for a, b in ((m.down, got.down), (m.up, got.up), (m.alpha, got.alpha)):
            assert a.dtype == b.dtype and torch.equal(a, b)
        assert got.rank == m.rank
    assert torch.equal(back.embeddings["zz-a"], vectors["zz-a"])
    assert all(torch.equal(back.embeddings["zz-b"][k], vectors["zz-b"][k]) for k in ("clip_l", "clip_g"))
    assert back.metadata["ss_network_dim"] == "Dynamic" and back.metadata["step"] == "7"


def test_damaged_or_foreign_lora_files_are_one_line(tmp_path):
    from safetensors.torch import save_file

    save_file({"x.lora_down.weight": torch.randn(2, 4)}, tmp_path / "half.safetensors")
    save_file(
        {"unet.a.lora_A.weight": torch.randn(2, 4), "unet.a.lora_B.weight": torch.randn(4, 2)},
        tmp_path / "peft.safetensors",
    )
    save_file(
        {
            "x.lora_down.weight": torch.full((2, 4), float("nan")),
            "x.lora_up.weight": torch.randn(4, 2),
            "x.alpha": torch.tensor(1.0),
        },
        tmp_path / "nan.safetensors",
    )
    (tmp_path / "torn.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    for name, message in [("half", "needs"), ("peft", "load_lora_weights"), ("nan", "NaN"), ("torn", "cannot be read")]:
        with pytest.raises(UserError, match=message):
            io.read_lora(tmp_path / f"{name}.safetensors")
    (tmp_path / "x.pt").write_bytes(b"")
    with pytest.raises(UserError, match="unsupported lora file type"):
        io.read_lora(tmp_path / "x.pt")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_the_webui_loader_rules_match_every_module_and_read_the_bundle(tmp_path, a1111_lora, dtype):
    """A1111's key conversion assumes SD's layout (2 layers per block), so the UNet here has SD's topology; the
    file is read back as the webui reads it, in each dtype `method.lora_dtype` writes."""
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=2,
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
        sample_size=8,
    )
    text = TinyBackbone().load().text_encoder
    # the webui's layer names: its LDM module paths, `.` -> `_` (SD1's CLIP sits under `transformer`, and is
    # transformers 4's, with the `text_model.` level that transformers 5 dropped)
    ldm = {"diffusion_model_" + k.rsplit(".", 1)[0].replace(".", "_") for k in unet_keys(unet).values()}
    clip = {"transformer_" + lora.file_path("text_encoder", n).replace(".", "_") for n, _ in text.named_modules()}
    found = {
        "unet": lora.attach(unet, lora.lora_config(3, 1.5, 0.0, lora.UNET_TARGETS)),
        "text_encoder": lora.attach(text, lora.lora_config(3, 1.5, 0.0, lora.TEXT_TARGETS)),
    }
    randomise_layers(found)
    vectors = torch.randn(2, 32)
    modules = lora.to_kohya(found, sdxl=False, dtype=dtype)
    path = io.save_lora(tmp_path / "a-lora.safetensors", modules, embeddings={NAME: vectors})
    sd = load_file(path)  # what the webui's read_state_dict gives its loader
    assert {t.dtype for k, t in sd.items() if not k.startswith("bundle_emb.")} == {dtype}
    webui, bundles = a1111_lora.a1111_load_lora(sd, ldm | clip)
    assert len(webui) == sum(len(f) for f in found.values())  # every module matched one webui layer
    deltas = {}
    for model, layers in found.items():
        for path, layer in layers.items():
            deltas[kohya_name(model, lora.file_path(model, path), False)] = layer.get_delta_weight(lora.ADAPTER)
    by_webui = sorted((k, v["updown"] * v["scale"]) for k, v in webui.items())
    ours = sorted((a1111_lora.convert_diffusers_name_to_compvis(k, False), v) for k, v in deltas.items())
    for (k1, a), (k2, b) in zip(by_webui, ours, strict=True):
        assert k1 == k2 and torch.allclose(a, b, atol=1e-6 if dtype == torch.float32 else 3e-3)  # peft's update
    assert torch.equal(a1111_lora.embedding_from_data(bundles[NAME]), vectors)


def randomise_layers(found) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layers in found.values():
            for layer in layers.values():
                for m in (layer.lora_A[lora.ADAPTER], layer.lora_B[lora.ADAPTER]):
                    m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.3)


def test_diffusers_loads_the_lora_and_embedding_as_trained(tmp_path):
    method = PivotalTuning(TinyBackbone(), name=NAME, num_vectors=2, rank=2, alpha=3.0, text_encoder_lora=True)
    method.configure_model()
    randomise(method)
    method.export(tmp_path, step=1, formats=["safetensors"])
    ids = torch.randint(0, 1000, (1, 77), generator=torch.Generator().manual_seed(1))
    pipe = TinyBackbone().load().pipeline()
    g = torch.Generator().manual_seed(0)
    noisy, t, states = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500]), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        base = pipe.unet(noisy, t, states).sample
        pipe.load_lora_weights(tmp_path, weight_name=f"{NAME}-lora-diffusers.safetensors")
        loaded = pipe.unet(noisy, t, states).sample
        live = method.unet(noisy, t, states).sample
        text, text_live = pipe.text_encoder(ids)[0], method.text_encoder(ids)[0]
    assert (loaded - base).abs().max() > 1e-3  # the LoRA changes the output
    assert torch.allclose(loaded, live, atol=1e-5)  # exactly as lit_ti's live model does (alpha included)
    assert torch.allclose(text, text_live, atol=1e-5)  # the text encoder's adapters too
    pipe.load_textual_inversion(str(tmp_path / f"{NAME}.safetensors"), token=NAME)  # next to the LoRA
    ids = pipe.tokenizer.convert_tokens_to_ids([NAME, f"{NAME}_1"])  # diffusers' tokens for 2 vectors
    rows = pipe.text_encoder.get_input_embeddings().weight[ids].detach()
    assert torch.equal(rows, method.bank.get(NAME)["text_encoder"].detach())


@pytest.mark.slow  # four generate.py runs, ~20 s
def test_generate_applies_the_lora_and_its_bundled_embedding(tmp_path, generate, pixels):
    method = PivotalTuning(TinyBackbone(), name="zz-star", rank=2)
    method.configure_model()
    randomise(method)
    method.export(tmp_path / "run", step=1, formats=["pt"])
    path = tmp_path / "run" / "zz-star-lora.safetensors"
    common = ("model=tiny", "prompt='a zz-star'")
    plain, off, on = (
        generate(*common, *extra) for extra in ([], [f"lora={path}", "lora_strength=0"], [f"lora={path}"])
    )
    assert (pixels(on) - pixels(off)).any()  # the LoRA acts
    assert (pixels(off) - pixels(plain)).any()  # the bundled embedding is used even at strength 0
    assert "Lora: zz-star-lora, Lora strength: 1.0" in on[0].info["parameters"]
    only_embedding = generate(*common, f"embeddings=[{tmp_path / 'run' / 'zz-star.pt'}]")
    assert not (pixels(only_embedding) - pixels(off)).any()  # bundle and separate file: the same concept


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
        ("name", "my.cat", "without '.'"),
    ],
)
def test_bad_settings_are_one_line_naming_the_key(key, value, message):
    with pytest.raises(UserError, match=message):
        PivotalTuning(TinyBackbone(), **{"name": NAME, key: value})


def test_a_lora_for_another_family_is_refused_in_one_line(tmp_path):
    from lit_ti.generate import apply_lora

    method = PivotalTuning(TinyBackbone(), name=NAME)
    method.configure_model()
    method.export(tmp_path, step=1, formats=["pt"])
    other = TinyBackbone(size="sd2_tiny").load()  # same module names, other widths
    before = [n for n, _ in other.unet.named_modules()]
    with pytest.raises(UserError, match="another model family"):
        apply_lora(other, tmp_path / f"{NAME}-lora.safetensors", 1.0)
    assert [n for n, _ in other.unet.named_modules()] == before  # nothing was left attached


def test_generate_puts_the_lora_on_as_trained_and_takes_it_off_again(tmp_path):
    from lit_ti.generate import apply_lora

    method = PivotalTuning(TinyBackbone(), name=NAME, text_encoder_lora=True)
    method.configure_model()
    randomise(method)
    method.export(tmp_path, step=1, formats=["pt"])
    bb = TinyBackbone().load()
    before = {k: v.clone() for k, v in bb.unet.state_dict().items()}
    undo = apply_lora(bb, tmp_path / f"{NAME}-lora.safetensors", 1.0)
    assert len(lora.layers(bb.unet)) + len(lora.layers(bb.text_encoder)) == len(method.lora)
    g = torch.Generator().manual_seed(0)
    noisy, t, states = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([300]), torch.randn(1, 77, 32, generator=g)
    ids = torch.randint(0, 1000, (1, 77), generator=g)
    with torch.no_grad():  # the file on a fresh model acts as the live adapters (UNet and text encoder)
        assert torch.allclose(bb.unet(noisy, t, states).sample, method.unet(noisy, t, states).sample, atol=1e-5)
        assert torch.allclose(bb.text_encoder(ids)[0], method.text_encoder(ids)[0], atol=1e-5)
    undo()
    assert not lora.layers(bb.unet) and not lora.layers(bb.text_encoder)
    after = bb.unet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


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
