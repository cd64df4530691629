"""Pivotal tuning's files read back: a rank/alpha file round-trips bit-exactly, damaged or foreign files are one
line, and the LoRA acts as trained in diffusers' `load_lora_weights` and in lit_ti's own `generate.py` (A1111's key
rules: test_pivotal_files.py)."""

import pytest
import torch

from lit_ti import io
from lit_ti.errors import UserError
from lit_ti.io.loras import LoraModule
from lit_ti.methods import PivotalTuning
from lit_ti.models import TinyBackbone
from lit_ti.modules import lora
from tests.conftest import NAME


def randomise(method: PivotalTuning, seed: int = 0) -> None:
    """Non-zero LoRA weights (a fresh adapter's up weights are zero and change nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in method.lora.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


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


@pytest.mark.slow  # six generate.py runs, ~30 s
def test_generate_applies_the_lora_its_bundled_embedding_and_its_timestep_gate(tmp_path, generate, pixels):
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
    always, half = (generate(*common, f"lora={path}", f"lora_max_timestep={t}") for t in (1000, 500))
    assert not (pixels(always) - pixels(on)).any()  # every sampling timestep is below 1000
    assert (pixels(half) - pixels(on)).any() and (pixels(half) - pixels(off)).any()
    assert "Lora max timestep: 500" in half[0].info["parameters"]
    assert "Lora max timestep" not in on[0].info["parameters"]


def test_a_lora_gated_by_timestep_acts_only_below_it_at_any_strength_and_is_ungated_after():
    """`applied_at(strength, max_timestep)` (generate.py's and toy_eval's `lora_max_timestep`): UNet calls at or
    above the gate get the base model, calls below it the LoRA at the strength in use; `base_model()` inside
    the block still switches it off everywhere; after the block every timestep has the LoRA again."""
    method = PivotalTuning(TinyBackbone(), name=NAME, rank=2)
    method.configure_model()
    randomise(method)
    g = torch.Generator().manual_seed(0)
    noisy, states = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)

    def predict(t: int) -> torch.Tensor:
        with torch.no_grad():
            return method.unet(noisy, torch.tensor([t]), states).sample

    with method.base_model():
        off = {t: predict(t) for t in (100, 499, 500, 900)}
    on = {t: predict(t) for t in off}
    assert all(not torch.allclose(on[t], off[t]) for t in off)  # the LoRA acts at every timestep
    with method.applied_at(1.0, max_timestep=500):
        assert torch.equal(predict(100), on[100]) and torch.equal(predict(499), on[499])
        assert torch.equal(predict(500), off[500]) and torch.equal(predict(900), off[900])
        with method.base_model():
            assert torch.equal(predict(100), off[100])
        assert torch.equal(predict(100), on[100])
    with method.applied_at(0.5, max_timestep=500):
        half = predict(100)
        assert torch.equal(predict(900), off[900])
    assert not torch.allclose(half, on[100]) and not torch.allclose(half, off[100])
    assert all(torch.equal(predict(t), on[t]) for t in off)  # ungated and at strength 1 again
    with torch.no_grad(), method.applied_at(1.0, max_timestep=500):  # a batch of two timesteps: each its own
        both = method.unet(noisy.repeat(2, 1, 1, 1), torch.tensor([100, 900]), states.repeat(2, 1, 1)).sample
    assert torch.allclose(both[:1], on[100], atol=1e-5) and torch.allclose(both[1:], off[900], atol=1e-5)
    with pytest.raises(RuntimeError), method.applied_at(1.0, max_timestep=500):  # a call that fails half-way
        method.unet(noisy, torch.tensor([900]), states[:, :, :5])
    assert torch.equal(predict(900), on[900]) and "forward" not in vars(method.unet)


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
