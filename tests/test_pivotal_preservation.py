"""Pivotal tuning's preservation term (`method.preservation_word`): while the LoRA trains, the batch's prompts
with the concept's name replaced by a class word are run with the LoRA on and off, and the LoRA is taught to
leave the base model's prediction for them unchanged."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lit_ti.errors import UserError
from lit_ti.methods import PivotalTuning
from lit_ti.models import TinyBackbone
from lit_ti.modules import lora
from lit_ti.modules.text_conditioning import name_pattern, replace_names
from tests.conftest import NAME

WORD = "cat"


def method_with_lora(**kw) -> PivotalTuning:
    """A built pivotal method whose LoRA is non-zero (a fresh adapter changes nothing) and trains now."""
    method = PivotalTuning(TinyBackbone(), name=NAME, **kw)
    method.configure_model()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in method.lora.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    method.switch_step, method.log_now = 0, False
    return method


def a_batch(method: PivotalTuning) -> dict:
    side = method.backbone.resolution // method.backbone.vae_scale_factor
    prompts = [f"a photo of {NAME}", f"{NAME.upper()} on grass, {NAME}-like"]
    return {"latents": torch.randn(2, 4, side, side, generator=torch.Generator().manual_seed(1)), "prompt": prompts}


class Recorder:
    """Wraps `encode_prompts`, keeping every prompt list it is called with."""

    def __init__(self, method: PivotalTuning) -> None:
        self.calls, self.encode = [], method.encode_prompts
        method.encode_prompts = self

    def __call__(self, prompts):
        self.calls.append(list(prompts))
        return self.encode(prompts)


def test_the_term_is_the_lora_s_change_to_the_class_prompts_and_trains_only_the_lora():
    torch.manual_seed(0)
    method = method_with_lora(preservation_word=WORD, preservation_weight=2.0)
    seen = Recorder(method)
    out = method.shared_step(a_batch(method))
    total = method.step_loss(out)
    classed = [f"a photo of {WORD}", f"{WORD} on grass, {NAME}-like"]  # only whole-word names are replaced
    assert seen.calls[1:] == [classed, classed]  # the base model's target, then the LoRA's prediction
    cond = method.encode_prompts(classed)
    with torch.no_grad():
        with lora.switched_off([method.backbone.unet]):
            base = method.call_unet(out["noisy"], out["timesteps"], cond)
        adapted = method.call_unet(out["noisy"], out["timesteps"], cond)
    expected = torch.nn.functional.mse_loss(adapted, base)
    assert float(expected) > 1e-4  # the random LoRA changes the class prompts' prediction
    assert torch.allclose(total - out["loss"], 2.0 * expected, rtol=1e-4)
    method.bank.zero_grad(), method.lora.zero_grad()
    (total - out["loss"]).backward()
    assert any(float(p.grad.abs().max()) > 0 for p in method.lora.parameters())
    assert all(p.grad is None or not p.grad.any() for p in method.bank.parameters())  # the name is not there


@pytest.mark.parametrize(
    "kw", [{"preservation_word": None}, {"preservation_word": WORD, "switch": None}], ids=["off", "before-switch"]
)
def test_no_term_when_off_or_before_the_lora_trains(kw):
    switch = kw.pop("switch", 0)
    method = method_with_lora(**kw)
    method.switch_step = switch
    seen = Recorder(method)
    out = method.shared_step(a_batch(method))
    assert method.step_loss(out) is out["loss"] and len(seen.calls) == 1  # no extra UNet or text encoder call


def test_a_fit_logs_the_term_in_the_lora_phase_and_pulls_the_lora_towards_the_base(tmp_path, concept_dir, fit):
    """Same seed, same data: the run with a strong term ends with a LoRA that changes the class prompts less."""

    def change(method) -> float:
        cond = method.encode_prompts([f"a photo of {WORD}"] * 2)
        latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
        t = torch.tensor([300, 700])
        with torch.no_grad():
            with lora.switched_off([method.backbone.unet]):
                base = method.call_unet(latents, t, cond)
            return float(torch.nn.functional.mse_loss(method.call_unet(latents, t, cond), base))

    common = dict(method_cls=PivotalTuning, ti_steps=2, lora_lr=0.05, max_steps=8, every=100)
    plain, _ = fit(tmp_path / "plain", concept_dir, **common)
    kept, trainer = fit(tmp_path / "kept", concept_dir, preservation_word=WORD, preservation_weight=50.0, **common)
    assert "train/loss_preservation" in trainer.callback_metrics
    assert change(plain) > 0 and change(kept) < 0.5 * change(plain)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("preservation_word", f"a {NAME}", "without the concept's name"),
        ("preservation_word", 3, "method.preservation_word"),
        ("preservation_weight", -1, "method.preservation_weight"),
    ],
)
def test_bad_settings_are_one_line_naming_the_key(key, value, message):
    with pytest.raises(UserError, match=message):
        PivotalTuning(TinyBackbone(), **{"name": NAME, key: value})


NAMES = st.sampled_from(["zz-thing", "zz-thing-neg", "Ab", "x"])
PIECES = st.lists(st.one_of(NAMES, st.sampled_from(["a", "photo", ",", "of", "zz", "thing", "-", " ", "  "])))


@given(pieces=PIECES, names=st.lists(NAMES, min_size=1, max_size=3, unique=True), word=st.sampled_from(["cat", ""]))
def test_replacing_leaves_no_name_the_tokenizer_would_find(pieces, names, word):
    prompt = " ".join(pieces)
    replaced = replace_names(prompt, names, word)
    assert name_pattern(names).search(replaced) is None or name_pattern(names).search(word)
    if not word:  # dropping a name leaves the other words, in order, single-spaced
        assert replaced == " ".join(name_pattern(names).sub(" ", prompt).split())
