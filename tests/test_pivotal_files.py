"""Pivotal tuning's LoRA settings that change its files: which UNet layers are adapted (`lora_targets`), the files'
dtype (`lora_dtype`), and SD1 / SDXL bundles read by the A1111 webui's key rules (re-implemented in
tests/a1111_lora.py)."""

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file

from lit_ti import io
from lit_ti.errors import UserError
from lit_ti.io.loras import kohya_name
from lit_ti.methods import PivotalTuning
from lit_ti.models import TinyBackbone
from lit_ti.modules import lora
from tests.conftest import NAME
from tests.ldm_layout import hf_clip_state, open_clip_state, unet_keys

CROSS_KV = ["attn2.to_k", "attn2.to_v"]


def randomise(found: dict, seed: int = 1) -> None:
    """Non-zero adapters (a fresh adapter's up weights are zero and change nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layers in found.values():
            for layer in layers.values():
                for m in (layer.lora_A[lora.ADAPTER], layer.lora_B[lora.ADAPTER]):
                    m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.3)


def lora_bytes(path) -> int:
    """Bytes of a safetensors file's tensor data, bundled embeddings left out."""
    with safe_open(path, "pt") as f:
        keys = [k for k in f.keys() if not k.startswith("bundle_emb.")]  # noqa: SIM118 (safe_open has no iterator)
        return sum(f.get_tensor(k).nbytes for k in keys)


def test_lora_targets_adapt_only_the_named_layers(tmp_path):
    method = PivotalTuning(TinyBackbone(), name=NAME, lora_targets=CROSS_KV)
    method.configure_model()
    paths = set(method.adapted["unet"])
    linears = [p for p, m in method.unet.named_modules() if p.endswith(("attn2.to_k", "attn2.to_v"))]
    assert paths == set(linears) and len(paths) > 2  # every cross-attention's K and V, in every block
    assert not any(p.endswith(("attn1.to_k", "attn2.to_q", "to_out.0")) for p in paths)
    assert method.identity()["lora"]["targets"] == CROSS_KV  # resuming with other targets is refused
    method.export(tmp_path, step=1, formats=["pt"])
    assert set(io.read_lora(tmp_path / f"{NAME}-lora.safetensors").modules) == set(method.lora)
    assert len(method.lora) == len(paths)
    default = PivotalTuning(TinyBackbone(), name=NAME)
    assert "targets" not in default.identity()["lora"]  # the default's checkpoints are as before the option


@pytest.mark.parametrize("targets", [["attn3.to_k"], [], ["to_k."]], ids=["no-such-layer", "empty", "dot"])
def test_a_bad_lora_target_is_one_line_naming_the_key(targets):
    with pytest.raises(UserError, match="method.lora_targets"):
        PivotalTuning(TinyBackbone(), name=NAME, lora_targets=targets).configure_model()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_a_half_precision_lora_file_holds_that_dtype_and_loads_in_diffusers(tmp_path, dtype):
    name = str(dtype).removeprefix("torch.")
    method = PivotalTuning(TinyBackbone(), name=NAME, rank=2, alpha=3.0, text_encoder_lora=True, lora_dtype=name)
    method.configure_model()
    randomise(method.adapted)
    method.export(tmp_path / "half", step=1, formats=["safetensors"])
    full = PivotalTuning(TinyBackbone(), name=NAME, rank=2, alpha=3.0, text_encoder_lora=True)
    full.configure_model()
    full.export(tmp_path / "full", step=1, formats=["safetensors"])
    for suffix in ("-lora.safetensors", "-lora-diffusers.safetensors"):
        with safe_open(tmp_path / "half" / f"{NAME}{suffix}", "pt") as f:
            keys = [k for k in f.keys() if not k.startswith("bundle_emb.")]  # noqa: SIM118 (no iterator)
            dtypes = {f.get_slice(k).get_dtype() for k in keys}
        assert dtypes == {{torch.float16: "F16", torch.bfloat16: "BF16"}[dtype]}, suffix
        half, single = (lora_bytes(tmp_path / d / f"{NAME}{suffix}") for d in ("half", "full"))
        assert 2 * half == single  # the LoRA's tensors take half the bytes (the bundled embedding stays float32)
    bundle = io.read_lora(tmp_path / "half" / f"{NAME}-lora.safetensors")
    assert torch.equal(bundle.embeddings[NAME], method.bank.get(NAME)["text_encoder"].detach())  # not rounded
    assert all(m.down.dtype == m.up.dtype == m.alpha.dtype == dtype for m in bundle.modules.values())
    # diffusers casts the file to the pipeline's float32 adapters: the output is the live model's, to rounding
    pipe = TinyBackbone().load().pipeline()
    g = torch.Generator().manual_seed(0)
    noisy, t, states = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500]), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        base = pipe.unet(noisy, t, states).sample
        pipe.load_lora_weights(tmp_path / "half", weight_name=f"{NAME}-lora-diffusers.safetensors")
        loaded, live = pipe.unet(noisy, t, states).sample, method.unet(noisy, t, states).sample
    change = (live - base).abs().max()
    assert change > 1e-3 and (loaded - live).abs().max() < 0.05 * change


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
    randomise(found)
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


def sdxl_unet() -> UNet2DConditionModel:
    """SDXL's UNet topology, narrow: levels without / with / with attention, 2 layers per block, several
    transformer blocks per attention (the webui's block numbering assumes SD's 2 down / 3 up layers)."""
    return UNet2DConditionModel(
        block_out_channels=(16, 32, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=2,
        transformer_layers_per_block=(1, 2, 3),
        attention_head_dim=(2, 4, 4),
        use_linear_projection=True,
        cross_attention_dim=80,  # SDXL's two encoders' widths side by side (32 + 48)
        norm_num_groups=8,
        sample_size=8,
    )


def test_the_webui_rules_resolve_every_key_of_an_sdxl_bundle(a1111_lora):
    """Every key of an SDXL bundle (UNet, both text encoders, the bundled pair) reaches a layer of the webui's
    SDXL model: the layer names of an original SDXL checkpoint (the layout the single-file tests load)."""
    bb = TinyBackbone(size="sdxl_tiny").load()
    unet = sdxl_unet()
    ldm = {"diffusion_model_" + k.rsplit(".", 1)[0].replace(".", "_") for k in unet_keys(unet).values()}
    clip_l = {"0_transformer_" + k.rsplit(".", 1)[0].replace(".", "_") for k in hf_clip_state(bb.text_encoder)}
    bigg = {k.rsplit(".", 1)[0].replace(".", "_") for k in open_clip_state(bb.text_encoder_2, "1_model.")}
    fused = frozenset(n for n in bigg if n.endswith("_attn"))  # OpenCLIP's nn.MultiheadAttention
    assert len(fused) == bb.text_encoder_2.config.num_hidden_layers
    found = {
        "unet": lora.attach(unet, lora.lora_config(3, 1.5, 0.0, lora.UNET_TARGETS)),
        "text_encoder": lora.attach(bb.text_encoder, lora.lora_config(3, 1.5, 0.0, lora.TEXT_TARGETS)),
        "text_encoder_2": lora.attach(bb.text_encoder_2, lora.lora_config(3, 1.5, 0.0, lora.TEXT_TARGETS)),
    }
    randomise(found)
    modules = lora.to_kohya(found, sdxl=True)
    assert {n.split("_")[1] for n in modules} == {"unet", "te1", "te2"}
    sd = {f"{n}.{p}": t for n, m in modules.items() for p, t in zip(io.loras.PARTS, (m.down, m.up, m.alpha))}
    pair = {"clip_l": torch.randn(2, 32), "clip_g": torch.randn(2, 48)}
    sd |= {f"bundle_emb.{NAME}.{k}": v for k, v in pair.items()}
    webui, bundles = a1111_lora.a1111_load_lora(sd, ldm | clip_l | bigg, fused)
    assert len(webui) == len(modules)  # every module matched one webui layer (bigG's q/k/v: its fused attention)
    for model, layers in found.items():
        for path, layer in layers.items():
            key = a1111_lora.convert_diffusers_name_to_compvis(
                kohya_name(model, lora.file_path(model, path), True), True
            )
            key = key.replace("lora_te1_text_model", "0_transformer_text_model")
            got = webui[key]
            torch.testing.assert_close(got["updown"] * got["scale"], layer.get_delta_weight(lora.ADAPTER))
    transformer_blocks = {k.split("_transformer_blocks_")[0] for k in webui if "_transformer_blocks_" in k}
    assert transformer_blocks == {  # SDXL's attention blocks: input 4, 5, 7, 8, middle 1, output 0-5
        f"diffusion_model_{b}_1" for b in ("input_blocks_4", "input_blocks_5", "input_blocks_7", "input_blocks_8")
    } | {"diffusion_model_middle_block_1"} | {f"diffusion_model_output_blocks_{i}_1" for i in range(6)}
    embedded = a1111_lora.embedding_from_data(bundles[NAME])
    assert all(torch.equal(embedded[k], pair[k]) for k in pair)
