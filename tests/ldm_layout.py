"""Test helper: a diffusers backbone written as an original-layout (LDM / A1111) single-file checkpoint.

The inverse of the renaming diffusers' `from_single_file` does, for the parts SD1.x, SD2.x and SDXL
checkpoints have: `model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE), `cond_stage_model.transformer.*`
(SD1 CLIP), `cond_stage_model.model.*` (SD2 OpenCLIP ViT-H, fused q/k/v) or
`conditioner.embedders.0.transformer.*` + `conditioner.embedders.1.model.*` (SDXL CLIP-L + OpenCLIP bigG). Written here rather than shipped: users have the files; tests need to make
them.
"""

from pathlib import Path

import torch
from safetensors.torch import save_file

RESNET = [
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
]
UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}


def _resnet(rest: str) -> str:
    for new, old in RESNET:
        rest = rest.replace(new, old)
    return rest


def unet_keys(unet) -> dict[str, str]:
    """diffusers UNet key -> LDM key."""
    cfg = unet.config
    per = cfg.layers_per_block + 1  # LDM input/output blocks per diffusers block (resnets + down/upsampler)
    out = {}
    for key in unet.state_dict():
        parts = key.split(".")
        top = ".".join(parts[:-1])  # the module, without weight/bias
        if top in UNET_TOP:
            out[key] = f"{UNET_TOP[top]}.{parts[-1]}"
        elif parts[0] == "down_blocks":
            b, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            if kind == "resnets":
                out[key] = f"input_blocks.{1 + b * per + j}.0.{_resnet(rest)}"
            elif kind == "attentions":
                out[key] = f"input_blocks.{1 + b * per + j}.1.{rest}"
            else:  # downsamplers.0.conv.*
                out[key] = f"input_blocks.{1 + b * per + cfg.layers_per_block}.0.op.{parts[-1]}"
        elif parts[0] == "mid_block":
            kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            if kind == "resnets":
                out[key] = f"middle_block.{2 * j}.{_resnet(rest)}"
            else:
                out[key] = f"middle_block.1.{rest}"
        elif parts[0] == "up_blocks":
            b, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            if kind == "resnets":
                out[key] = f"output_blocks.{b * per + j}.0.{_resnet(rest)}"
            elif kind == "attentions":
                out[key] = f"output_blocks.{b * per + j}.1.{rest}"
            else:  # upsamplers.0.conv.*: after the attention when the block has one
                has_attn = "CrossAttn" in cfg.up_block_types[b]
                out[key] = f"output_blocks.{b * per + cfg.layers_per_block}.{2 if has_attn else 1}.conv.{parts[-1]}"
        else:
            raise KeyError(f"no LDM name for UNet key {key}")
    return out


def vae_state(vae) -> dict[str, torch.Tensor]:
    """The VAE's weights under LDM names (attention projections as 1x1 convolutions)."""
    n = len(vae.config.block_out_channels)
    out = {}
    for key, value in vae.state_dict().items():
        k = key.replace("conv_norm_out", "norm_out")
        parts = k.split(".")
        if parts[1] == "down_blocks":
            i, kind = parts[2], parts[3]
            k = f"{parts[0]}.down.{i}." + (
                f"block.{parts[4]}." + ".".join(parts[5:]) if kind == "resnets" else "downsample." + ".".join(parts[5:])
            )
        elif parts[1] == "up_blocks":
            i, kind = n - 1 - int(parts[2]), parts[3]
            k = f"{parts[0]}.up.{i}." + (
                f"block.{parts[4]}." + ".".join(parts[5:]) if kind == "resnets" else "upsample." + ".".join(parts[5:])
            )
        elif parts[1] == "mid_block" and parts[2] == "resnets":
            k = f"{parts[0]}.mid.block_{int(parts[3]) + 1}." + ".".join(parts[4:])
        elif parts[1] == "mid_block":  # attentions.0
            rest = ".".join(parts[4:])
            for new, old in [
                ("group_norm", "norm"),
                ("to_q", "q"),
                ("to_k", "k"),
                ("to_v", "v"),
                ("to_out.0", "proj_out"),
            ]:
                rest = rest.replace(new, old)
            k = f"{parts[0]}.mid.attn_1.{rest}"
            if value.dim() == 2:
                value = value[:, :, None, None]
        out["first_stage_model." + k.replace("conv_shortcut", "nin_shortcut")] = value
    return out


def hf_clip_state(encoder) -> dict[str, torch.Tensor]:
    """The encoder's weights as original checkpoints name them (`text_model.*`; transformers 5 drops it)."""
    return {
        k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}": v
        for k, v in encoder.state_dict().items()
    }


def open_clip_state(encoder, prefix: str, unused_layer: bool = False) -> dict[str, torch.Tensor]:
    """A CLIP text model under OpenCLIP names (fused in_proj, transposed text_projection).

    unused_layer: also write one more residual block after the last, as SD2 files hold all 24 of OpenCLIP
        ViT-H's blocks while SD2 uses 23 (diffusers skips the 24th); its weights repeat the last block's.
    """
    sd = hf_clip_state(encoder)
    width = encoder.config.hidden_size
    projection = sd["text_projection.weight"].T if "text_projection.weight" in sd else torch.eye(width)
    out = {
        prefix + "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
        prefix + "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
        prefix + "ln_final.weight": sd["text_model.final_layer_norm.weight"],
        prefix + "ln_final.bias": sd["text_model.final_layer_norm.bias"],
        prefix + "text_projection": projection.to(sd["text_model.final_layer_norm.weight"].dtype).contiguous(),
    }
    n = encoder.config.num_hidden_layers
    for i in range(n + 1 if unused_layer else n):
        src, dst = f"text_model.encoder.layers.{min(i, n - 1)}.", f"{prefix}transformer.resblocks.{i}."
        for new, old in [
            ("layer_norm1", "ln_1"),
            ("layer_norm2", "ln_2"),
            ("mlp.fc1", "mlp.c_fc"),
            ("mlp.fc2", "mlp.c_proj"),
        ]:
            for p in ("weight", "bias"):
                out[f"{dst}{old}.{p}"] = sd[f"{src}{new}.{p}"]
        for p in ("weight", "bias"):
            out[f"{dst}attn.out_proj.{p}"] = sd[f"{src}self_attn.out_proj.{p}"]
            out[f"{dst}attn.in_proj_{p}"] = torch.cat([sd[f"{src}self_attn.{q}_proj.{p}"] for q in "qkv"])
    if unused_layer:  # its own copies: safetensors refuses tensors that share memory
        out.update({k: v.clone() for k, v in out.items() if f".resblocks.{n}." in k})
    return out


def write_single_file(backbone, path: Path, family: str | None = None, dtype: torch.dtype = torch.float32) -> Path:
    """Save `backbone` as one original-layout `.safetensors` file of `family` (`sd1`, `sd2`, `sdxl`; null =
    `sdxl` for a two-encoder backbone, else `sd1`), every tensor in `dtype` (most user files are fp16)."""
    family = family or ("sdxl" if backbone.is_sdxl else "sd1")
    unet_sd = backbone.unet.state_dict()
    state = {f"model.diffusion_model.{ldm}": unet_sd[key] for key, ldm in unet_keys(backbone.unet).items()}
    state.update(vae_state(backbone.vae))
    if family == "sd2":
        state.update(open_clip_state(backbone.text_encoder, "cond_stage_model.model.", unused_layer=True))
    else:
        prefix = "conditioner.embedders.0.transformer." if family == "sdxl" else "cond_stage_model.transformer."
        state.update({prefix + k: v for k, v in hf_clip_state(backbone.text_encoder).items()})
    if family == "sdxl":
        state.update(open_clip_state(backbone.text_encoder_2, "conditioner.embedders.1.model."))
    save_file({k: v.detach().to(dtype).contiguous() for k, v in state.items()}, path)
    return path
