"""SD3 / SD3.5 embedding files: the `clip_l` + `clip_g` + `t5xxl` parts at the real encoders' widths, read back
by re-implementations of ComfyUI's, A1111's and OneTrainer's loaders, matched to the model they fit, and refused
in one line when damaged."""

import pytest
import torch

NAME = "toy-concept"

REAL_WIDTHS = {"clip_l": 768, "clip_g": 1280, "t5xxl": 4096}  # SD3 / SD3.5's encoders


def comfyui_vectors(data: dict, key: str, width: int) -> torch.Tensor | None:
    """ComfyUI's `load_embed` choice of tensor for one encoder (comfy/sd1_clip.py: `string_to_param`, else the
    encoder's key (`clip_l`, `clip_g`, `t5xxl`), else the first tensor), then its shape gate in
    `set_up_textual_embeddings`: vectors of another width are "ignored" with a shape-mismatch warning."""
    if "string_to_param" in data:
        tensor = next(iter(data["string_to_param"].values()))
    elif key in data:
        tensor = data[key]
    else:
        tensor = next(iter(data.values()))
    tensor = tensor.unsqueeze(0) if tensor.dim() == 1 else tensor
    return tensor if tensor.shape[-1] == width else None


def a1111_sd3_width(data) -> int | None:
    """A1111's SD3 embedding reading (textual_inversion.py's SDXL branch, which SD3 shares since PR #16164):
    a plain dict with `clip_l` and `clip_g`, every value detached as a tensor; the width it compares with the
    model's (768 + 1280 for SD3, from `Sd3ClipLG.encode_embedding_init_text`), or None if it would not read it.
    Its T5 reads the prompt's words and never an embedding."""
    if type(data) is not dict or not {"clip_l", "clip_g"} <= set(data):
        return None
    if not all(isinstance(v, torch.Tensor) for v in data.values()):
        return None
    return data["clip_l"].shape[-1] + data["clip_g"].shape[-1]


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_sd3_files_at_real_widths_load_in_comfyui_a1111_and_onetrainer(tmp_path, suffix, webui_accepts):
    from safetensors.torch import load_file, save_file

    from lit_ti import io

    vectors = {key: torch.randn(3, width) for key, width in REAL_WIDTHS.items()}
    path = io.save_embedding(tmp_path / f"x{suffix}", vectors, step=7)
    data = load_file(path) if suffix == ".safetensors" else torch.load(path, weights_only=True)
    for key, width in REAL_WIDTHS.items():  # ComfyUI: each encoder finds its own part
        assert torch.equal(comfyui_vectors(data, key, width), vectors[key])
    assert a1111_sd3_width(data) == 768 + 1280
    assert torch.equal(data["t5"], vectors["t5xxl"])  # OneTrainer's key
    if suffix == ".pt":
        assert webui_accepts(path)
    # a file written with OneTrainer's key only: ComfyUI falls back to `clip_l` and ignores it (OneTrainer #514);
    # lit_ti reads it
    onetrainer = {"clip_l": vectors["clip_l"], "clip_g": vectors["clip_g"], "t5": vectors["t5xxl"]}
    assert comfyui_vectors(onetrainer, "t5xxl", 4096) is None
    save_file({**onetrainer, "clip_l_out": torch.randn(768)}, tmp_path / "ot.safetensors")
    back = io.read_embedding(tmp_path / "ot.safetensors")[0].vectors
    assert set(back) == set(REAL_WIDTHS) and torch.equal(back["t5xxl"], vectors["t5xxl"])


def test_which_files_fit_which_model():
    from lit_ti.io.embeddings import from_file

    sd1 = {"text_encoder": 768}
    sdxl = {"text_encoder": 768, "text_encoder_2": 1280}
    sd3 = {**sdxl, "text_encoder_3": 4096}
    full = {key: torch.zeros(2, width) for key, width in REAL_WIDTHS.items()}
    clips = {k: full[k] for k in ("clip_l", "clip_g")}
    assert set(from_file(full, sd3)) == set(sd3)
    assert set(from_file(clips, sd3)) == set(sdxl)  # trained without T5: T5 prompts leave the name out
    assert set(from_file({"t5xxl": full["t5xxl"]}, sd3)) == {"text_encoder_3"}
    assert set(from_file(full, sdxl)) == set(sdxl)  # SD3 without T5 (or SDXL) uses the CLIP parts
    assert from_file({"clip_l": full["clip_l"]}, sdxl) is None  # without T5 both CLIP parts are needed
    assert from_file(torch.zeros(2, 768), sd3) is None and from_file(full, sd1) is None
    assert from_file({**full, "t5xxl": torch.zeros(2, 2048)}, sd3) is None  # a part of another width


def test_generate_renders_with_an_sd3_concept(tmp_path, generate, pixels):
    from lit_ti import io

    vectors = {k: 3 * torch.randn(2, w) for k, w in {"clip_l": 32, "clip_g": 48, "t5xxl": 96}.items()}
    io.save_embedding(tmp_path / "emb" / f"{NAME}.safetensors", vectors)
    common = ("model=tiny_sd3", "steps=2", "seed=1", f"embeddings_dir={tmp_path / 'emb'}")
    with_concept = generate(*common, f"prompt=a photo of {NAME}")
    without = generate(*common, "prompt=a photo of")
    assert with_concept[0].size == (64, 64)
    assert abs(pixels(with_concept) - pixels(without)).max() > 0  # the concept's vectors reach the image


@pytest.mark.parametrize(
    "data",
    [
        {"clip_l": {"nested": torch.zeros(2, 768)}, "clip_g": torch.zeros(2, 1280)},
        {"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(3, 1280)},  # different vector counts
        {"clip_l": torch.zeros(2, 768), "t5": "not a tensor"},
        {"t5xxl": torch.full((2, 4096), float("nan"))},
    ],
    ids=["nested", "counts", "text", "nan"],
)
def test_damaged_sd3_files_are_refused_in_one_line(tmp_path, data):
    from lit_ti import io
    from lit_ti.errors import UserError
    from lit_ti.io.pickles import save_pt

    save_pt(data, tmp_path / "bad.pt")
    with pytest.raises(UserError, match="bad.pt"):
        io.read_embedding(tmp_path / "bad.pt")
