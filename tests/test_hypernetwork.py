"""Hypernetworks: A1111 file compatibility, K/V transformation, attach/detach, training."""

import itertools
import os
from collections import OrderedDict
from functools import partial

import pytest
import torch
from torch import nn

from lit_ti import io
from lit_ti.errors import UserError
from lit_ti.methods import HypernetworkMethod
from lit_ti.modules.hypernetwork import Hypernetwork, HypernetworkProcessor, attach, detach

A1111_META = {
    "layer_structure",
    "activation_func",
    "is_layer_norm",
    "weight_initialization",
    "sd_checkpoint",
    "sd_checkpoint_name",
    "activate_output",
    "use_dropout",
    "dropout_structure",
    "last_layer_dropout",
    "optional_info",
    "name",
    "step",
}


def a1111_module(dim, structure, act, layer_norm, dropout, activate_output, gen):
    """A state dict laid out by the webui's rules (written here from the spec), and the forward it implies."""
    state, ops, idx = OrderedDict(), [], 0
    for i in range(len(structure) - 1):
        d_in, d_out = int(dim * structure[i]), int(dim * structure[i + 1])
        w, b = torch.randn(d_out, d_in, generator=gen) * 0.1, torch.randn(d_out, generator=gen) * 0.1
        state[f"linear.{idx}.weight"], state[f"linear.{idx}.bias"] = w, b
        ops.append(lambda x, w=w, b=b: x @ w.T + b)
        idx += 1
        if act != "linear" and (i < len(structure) - 2 or activate_output):
            ops.append({"relu": torch.relu, "swish": nn.functional.hardswish, "tanh": torch.tanh}[act])
            idx += 1
        if layer_norm:
            g, beta = 1 + torch.randn(d_out, generator=gen) * 0.1, torch.randn(d_out, generator=gen) * 0.1
            state[f"linear.{idx}.weight"], state[f"linear.{idx}.bias"] = g, beta
            ops.append(lambda x, g=g, beta=beta: nn.functional.layer_norm(x, x.shape[-1:], g, beta))
            idx += 1
        if dropout and dropout[i + 1] > 0:
            idx += 1  # eval: identity, but it takes an index slot

    def forward(x, strength=1.0):
        h = x
        for op in ops:
            h = op(h)
        return x + h * strength

    return state, forward


COMBOS = list(itertools.product(["linear", "relu", "swish", "tanh"], [False, True], [None, [0, 0.3, 0]], [False, True]))


@pytest.mark.parametrize(("act", "layer_norm", "dropout", "activate_output"), COMBOS)
def test_hand_built_a1111_file_loads_and_transforms_k_and_v(tmp_path, act, layer_norm, dropout, activate_output):
    gen = torch.Generator().manual_seed(0)
    structure = [1, 2, 1]
    data, expected = {}, {}
    for dim in (8, 16):
        pair = [a1111_module(dim, structure, act, layer_norm, dropout, activate_output, gen) for _ in range(2)]
        data[dim] = (pair[0][0], pair[1][0])
        expected[dim] = (pair[0][1], pair[1][1])
    data.update(
        layer_structure=[1.0, 2.0, 1.0],
        activation_func=act,
        is_layer_norm=layer_norm,
        weight_initialization="Normal",
        activate_output=activate_output,
        use_dropout=dropout is not None,
        dropout_structure=dropout or [0, 0, 0],
        last_layer_dropout=bool(dropout),
        name="hand",
        step=5,
    )
    torch.save(data, tmp_path / "hand.pt")
    hn, meta = io.load_hypernetwork(tmp_path / "hand.pt")
    hn.eval()
    hn.set_strength(0.7)
    assert hn.sizes == [8, 16] and meta["step"] == 5
    for dim in (8, 16):
        x = torch.randn(2, 5, dim, generator=gen)
        for module, reference in zip(hn.pair(dim), expected[dim]):
            assert torch.allclose(module(x), reference(x, 0.7), atol=1e-6)


def test_legacy_novelai_file_with_linear1_linear2(tmp_path):
    gen = torch.Generator().manual_seed(1)
    data, refs = {}, {}
    for dim in (8, 16):
        states = []
        for _ in range(2):
            w1, b1 = torch.randn(2 * dim, dim, generator=gen), torch.randn(2 * dim, generator=gen)
            w2, b2 = torch.randn(dim, 2 * dim, generator=gen), torch.randn(dim, generator=gen)
            states.append({"linear1.weight": w1, "linear1.bias": b1, "linear2.weight": w2, "linear2.bias": b2})
        data[dim] = tuple(states)
    torch.save(data, tmp_path / "old.pt")  # width keys only: no metadata at all
    hn, _ = io.load_hypernetwork(tmp_path / "old.pt")
    hn.eval()
    for dim in (8, 16):
        x = torch.randn(3, dim, generator=gen)
        for module, s in zip(hn.pair(dim), data[dim]):
            h = (x @ s["linear1.weight"].T + s["linear1.bias"]) @ s["linear2.weight"].T + s["linear2.bias"]
            refs[dim] = x + h
            assert torch.allclose(module(x), refs[dim], atol=1e-4)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_our_file_round_trips_with_a1111_metadata(tmp_path, suffix):
    hn = Hypernetwork(
        [32, 64],
        layer_structure=[1, 1.5, 1],
        activation_func="relu",
        weight_init="XavierNormal",
        add_layer_norm=True,
        dropout_structure=[0, 0.2, 0],
    )
    path = io.save_hypernetwork(tmp_path / f"hn{suffix}", hn, name="hn", step=7, sd_checkpoint="abc123")
    back, meta = io.load_hypernetwork(path)
    assert back.settings["layer_structure"] == [1, 1.5, 1] and back.settings["dropout_structure"] == [0, 0.2, 0]
    theirs, ours = back.state_dict(), hn.state_dict()
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)
    assert meta["step"] == 7 and meta["sd_checkpoint"] == "abc123"
    if suffix == ".pt":
        raw = torch.load(path, weights_only=True)
        assert set(raw) == {32, 64} | A1111_META
        assert raw["activation_func"] == "relu" and raw["is_layer_norm"] is True and raw["use_dropout"] is True
        k_state, v_state = raw[32]
        # Linear 0, ReLU 1, LayerNorm 2, Dropout 3 | Linear 4 (no activation on the output), LayerNorm 5
        assert list(k_state) == [f"linear.{i}.{p}" for i in (0, 2, 4, 5) for p in ("weight", "bias")]
        assert k_state["linear.0.weight"].shape == (48, 32) and v_state["linear.4.weight"].shape == (32, 48)


def test_code_executing_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({768: Evil()}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="evil.pt"):
        io.load_hypernetwork(tmp_path / "evil.pt")
    assert not marker.exists()


@torch.no_grad()
def test_strength_zero_and_detach_leave_the_unet_bit_identical(backbone):
    unet = backbone.unet
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, unet.config.cross_attention_dim)
    before = unet(x, t, ctx).sample
    original = dict(unet.attn_processors)
    widths = [unet.config.cross_attention_dim, *unet.config.block_out_channels]
    hn = Hypernetwork(sorted(set(widths)), weight_init="XavierNormal").eval()
    saved = attach(unet, hn)
    try:
        assert all(isinstance(p, HypernetworkProcessor) for p in unet.attn_processors.values())
        hn.set_strength(0.0)
        assert torch.equal(unet(x, t, ctx).sample, before)
        hn.set_strength(1.0)
        assert not torch.allclose(unet(x, t, ctx).sample, before, atol=1e-4)
    finally:
        detach(unet, saved)
    assert all(unet.attn_processors[k] is v for k, v in original.items())
    assert torch.equal(unet(x, t, ctx).sample, before)


def test_self_attention_switch(backbone):
    unet = backbone.unet
    hn = Hypernetwork([unet.config.cross_attention_dim])
    saved = attach(unet, hn, self_attention=False)
    try:
        kinds = {name.split(".")[-2]: type(p).__name__ for name, p in unet.attn_processors.items()}
        assert kinds["attn2"] == "HypernetworkProcessor" and kinds["attn1"] != "HypernetworkProcessor"
    finally:
        detach(unet, saved)


@pytest.fixture
def fit_hn(fit):
    return partial(fit, method_cls=HypernetworkMethod, base_kw={"name": "zz-thing"})


def test_fit_trains_only_the_hypernetwork_and_writes_a1111_files(tmp_path, concept_dir, fit_hn):
    method, trainer = fit_hn(tmp_path, concept_dir, max_steps=4, every=2, optimizer=partial(torch.optim.AdamW, lr=1e-3))
    assert trainer.global_step == 4
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["state_dict"] and all(k.startswith("hypernetwork.") for k in ckpt["state_dict"])
    raw = torch.load(tmp_path / "zz-thing.pt", weights_only=True)
    widths = {method.unet.config.cross_attention_dim, *method.unet.config.block_out_channels}
    assert {k for k in raw if isinstance(k, int)} == widths
    assert raw["name"] == "zz-thing" and raw["step"] == 4 and set(raw) >= A1111_META
    assert (tmp_path / "hypernetworks" / "zz-thing-2.pt").is_file()
    trained = method.hypernetwork.state_dict()
    fresh = Hypernetwork(sorted(widths)).state_dict()
    assert any(not torch.equal(trained[k], fresh[k]) for k in trained)  # it learned
    for part in ("vae", "text_encoder"):
        assert all(not p.requires_grad for p in getattr(method, part).parameters())


def test_style_measure_separates_plain_and_styled_renders(tmp_path):
    from PIL import Image

    from lit_ti.toy import classifier as toy_classifier
    from lit_ti.toy.style import calibrate, in_style
    from lit_ti.toy.world import write_style

    result = calibrate(n=48)
    assert result["plain_rate"] < 0.35 and result["topleft_rate"] == 1.0  # plain: a quadrant by chance
    assert result["topleft_accuracy"] >= 0.9  # the judge still reads shape and colour
    folder = write_style("topleft", tmp_path / "style", n=3)
    captions = sorted(p.read_text() for p in folder.glob("*.txt"))
    assert len(captions) == 3 and not any("left" in c for c in captions)

    night = calibrate("night", n=48)
    assert 0.15 < night["plain_rate"] < 0.5 and night["night_rate"] == 1.0  # plain: black by chance
    assert night["night_accuracy"] >= 0.9
    folder = write_style("night", tmp_path / "night", n=12)
    captions = [p.read_text() for p in sorted(folder.glob("*.txt"))]
    assert any("white background" in c or "gray background" in c for c in captions)  # captions keep theirs
    images = toy_classifier.to_tensor([Image.open(p) for p in sorted(folder.glob("*.png"))])
    assert in_style(images, "night").all()


def test_style_is_judged_on_captions_that_do_not_ask_for_it():
    from lit_ti.toy.style import eval_prompts

    night = eval_prompts(40, "night")
    assert len(night) == 40 and not any("black background" in caption for caption, _ in night)
    topleft = eval_prompts(40, "topleft")  # captions never name a position: every scene counts
    assert len(topleft) == 40 and any("black background" in caption for caption, _ in topleft)
    assert eval_prompts(40, "night") == night  # fixed prompts: runs are comparable


@torch.no_grad()
def test_trained_file_attaches_to_a_diffusers_pipeline(tmp_path, concept_dir, fit_hn):
    from lit_ti.methods.hypernetwork import attach_file
    from lit_ti.models import TinyBackbone

    lr = partial(torch.optim.AdamW, lr=1e-2)
    fit_hn(tmp_path, concept_dir, max_steps=2, every=0, optimizer=lr, weight_initialization="XavierNormal")
    pipe = TinyBackbone().load().pipeline()

    def generate():
        out = pipe("a red circle", num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np")
        return torch.from_numpy(out.images)

    plain = generate()
    hn, original = attach_file(pipe.unet, tmp_path / "zz-thing.safetensors", strength=1.0)
    styled = generate()
    hn.set_strength(0.0)
    assert torch.equal(generate(), plain)
    detach(pipe.unet, original)
    assert not torch.allclose(styled, plain, atol=1e-4)
    assert torch.equal(generate(), plain)


def test_resume_and_bf16_accumulation(tmp_path, concept_dir, fit_hn):
    lr = partial(torch.optim.AdamW, lr=1e-3)
    # resumed at an epoch boundary (4 images, batch 1): mid-epoch resume restarts the epoch's shuffle
    straight, _ = fit_hn(tmp_path / "a", concept_dir, max_steps=8, every=4, optimizer=lr)
    fit_hn(tmp_path / "b", concept_dir, max_steps=4, every=4, optimizer=lr)
    resumed, trainer = fit_hn(
        tmp_path / "c", concept_dir, max_steps=8, every=4, optimizer=lr, ckpt_path=tmp_path / "b/checkpoints/last.ckpt"
    )
    assert trainer.global_step == 8
    a, b = straight.hypernetwork.state_dict(), resumed.hypernetwork.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), "interrupted + resumed run differs"

    method, trainer = fit_hn(
        tmp_path / "d", concept_dir, max_steps=2, every=0, optimizer=lr, precision="bf16-mixed", accumulate=2
    )
    assert method.unet.dtype == torch.bfloat16 and trainer.global_step == 2
    assert all(p.dtype == torch.float32 for p in method.hypernetwork.parameters())
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
