"""SDXL: one concept owns a CLIP-L and an OpenCLIP-bigG part, both trained, written as `clip_l` + `clip_g`."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lit_ti import io
from lit_ti.models import TinyBackbone
from lit_ti.modules.embedding_bank import EmbeddingBank
from lit_ti.modules.text_conditioning import PromptEncoder, init_vectors


def a1111_sdxl_width(data) -> int | None:
    """A1111's SDXL embedding detection and shape gating: the width it would compare with the model's
    (768 + 1280 = 2048 on real SDXL), or None if it would not read the file as SDXL."""
    if type(data) is not dict or not {"clip_l", "clip_g"} <= set(data):
        return None
    if not all(isinstance(v, torch.Tensor) for v in data.values()):  # it calls .detach() on every value
        return None
    if data["clip_l"].shape[0] != data["clip_g"].shape[0]:
        return None
    return data["clip_l"].shape[1] + data["clip_g"].shape[1]


def test_sdxl_files_at_real_widths_pass_a1111s_check(tmp_path, webui_accepts):
    vectors = {"clip_l": torch.randn(3, 768), "clip_g": torch.randn(3, 1280)}
    for suffix in (".pt", ".safetensors"):
        path = io.save_embedding(tmp_path / f"xl{suffix}", vectors, step=5, sd_checkpoint="0123456789")
        data = torch.load(path, weights_only=True) if suffix == ".pt" else load_file(path)
        assert a1111_sdxl_width(data) == 2048
    assert webui_accepts(tmp_path / "xl.pt")


SMOKE = ("model=tiny", "model.size=sdxl_tiny", "trainer.max_steps=3")


def test_sdxl_ti_trains_both_encoders_and_loads_into_diffusers(tmp_path, cli, webui_accepts):
    cli.train_ok(
        tmp_path,
        *SMOKE,
        "callbacks.toy_eval=null",
        "callbacks.preview.every_n_steps=3",
        "callbacks.preview.num_inference_steps=2",
    )
    assert list((tmp_path / "previews").glob("*.png"))  # sampled through diffusers' SDXL pipeline
    bb = TinyBackbone(size="sdxl_tiny").load()  # the run's model: same seed, same weights
    widths = {"clip_l": 32, "clip_g": 48}

    # the community / A1111 SDXL layout: exactly the two tensors, [n, width] each, in both formats
    tensors = load_file(tmp_path / "toy-concept.safetensors")
    pt = torch.load(tmp_path / "toy-concept.pt", weights_only=True)
    assert type(pt) is dict and set(pt) == set(tensors) == {"clip_l", "clip_g"}
    for key, width in widths.items():
        assert tensors[key].shape == (2, width) and torch.equal(pt[key], tensors[key])
    start = {
        "clip_l": init_vectors(bb.tokenizer, bb.text_encoder, "*", 2),
        "clip_g": init_vectors(bb.tokenizer_2, bb.text_encoder_2, "*", 2),
    }
    for key in widths:  # both parts trained
        assert (tensors[key] - start[key]).abs().max() > 1e-4, key
    assert io.read_embedding(tmp_path / "toy-concept.safetensors")[0].vectors.keys() == widths.keys()
    assert a1111_sdxl_width(pt) == a1111_sdxl_width(tensors) == 32 + 48  # this model's two widths
    assert webui_accepts(tmp_path / "toy-concept.pt")

    # diffusers' SDXL pipeline, each part loaded into its encoder, encodes the prompt exactly as training did
    pipe = bb.pipeline()
    pipe.load_textual_inversion(
        tensors["clip_l"], token="toy-concept", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
    )
    pipe.load_textual_inversion(
        tensors["clip_g"], token="toy-concept", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
    )
    prompt = "a toy-concept on a plain background"
    with torch.no_grad():
        states, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
        bank = EmbeddingBank()
        bank.add("toy-concept", {"text_encoder": tensors["clip_l"], "text_encoder_2": tensors["clip_g"]})
        ours = PromptEncoder(TinyBackbone(size="sdxl_tiny").load(), bank)([prompt])
    assert states.shape == ours.states.shape == (1, 77, 80)
    assert torch.allclose(states, ours.states, atol=1e-5)
    assert torch.allclose(pooled, ours.pooled, atol=1e-5)


def test_sdxl_dreamartist_writes_two_sdxl_pairs(tmp_path, cli):
    cli.train_ok(
        tmp_path, *SMOKE, "experiment=dreamartist_character", "callbacks.preview=null", "callbacks.toy_eval=null"
    )
    for stem, n in (("toy-concept", 3), ("toy-concept-neg", 6)):
        tensors = load_file(tmp_path / f"{stem}.safetensors")
        assert {k: tuple(v.shape) for k, v in tensors.items()} == {"clip_l": (n, 32), "clip_g": (n, 48)}


def test_sdxl_hypernetwork_sits_at_the_sdxl_context_width(tmp_path, cli):
    cli.train_ok(
        tmp_path, *SMOKE, "experiment=hypernetwork_style", "callbacks.preview=null", "callbacks.toy_style_eval=null"
    )
    raw = torch.load(tmp_path / "toy-night.pt", weights_only=True)
    assert 32 + 48 in raw  # the concatenated CLIP-L + bigG context (2048 on real SDXL)


def test_sdxl_diffusers_folder_and_generate_with_an_sdxl_embedding(tmp_path, capsys, generate, pixels):
    from lit_ti.models import DiffusersFolder

    bb = TinyBackbone(size="sdxl_tiny").load()
    bb.pipeline().save_pretrained(tmp_path / "sdxl")
    loaded = DiffusersFolder(str(tmp_path / "sdxl")).load()
    assert loaded.is_sdxl and len(loaded.tokenizer_2) == 49408 and loaded.tokenizer_2.pad_token == "!"
    assert all(torch.equal(a, b) for a, b in zip(loaded.text_encoder_2.parameters(), bb.text_encoder_2.parameters()))

    g = torch.Generator().manual_seed(0)
    sdxl = {"clip_l": torch.randn(2, 32, generator=g), "clip_g": torch.randn(2, 48, generator=g)}
    io.save_embedding(tmp_path / "emb" / "zz-thing.safetensors", sdxl)
    io.save_embedding(tmp_path / "emb" / "zz-old.pt", torch.randn(1, 32, generator=g))  # an SD1 file: skipped
    model = ["model=diffusers", f"model.path={tmp_path / 'sdxl'}", "size=64"]
    plain = generate(*model, "prompt='a zz-thing'")
    with pytest.warns(UserWarning, match="zz-old.*do not fit"):
        used = generate(*model, "prompt='a zz-thing, zz-old'", f"embeddings_dir={tmp_path / 'emb'}")
    assert "concepts used: zz-thing" in capsys.readouterr().out
    assert np.abs(pixels(plain) - pixels(used)).max() > 0
