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


# ---------------------------------------------------------------- SD3 / SD3.5 (MMDiT) single files
SD3_TOP = {  # diffusers MMDiT module -> original (SD3 reference / ComfyUI) name
    "pos_embed.proj": "x_embedder.proj",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "context_embedder": "context_embedder",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}
SD3_BLOCK = {  # per joint block: diffusers module -> original module
    "attn.to_out.0": "x_block.attn.proj",
    "attn.to_add_out": "context_block.attn.proj",
    "attn.norm_q": "x_block.attn.ln_q",
    "attn.norm_k": "x_block.attn.ln_k",
    "attn.norm_added_q": "context_block.attn.ln_q",
    "attn.norm_added_k": "context_block.attn.ln_k",
    "attn2.to_out.0": "x_block.attn2.proj",
    "attn2.norm_q": "x_block.attn2.ln_q",
    "attn2.norm_k": "x_block.attn2.ln_k",
    "norm1.linear": "x_block.adaLN_modulation.1",
    "norm1_context.linear": "context_block.adaLN_modulation.1",
    "ff.net.0.proj": "x_block.mlp.fc1",
    "ff.net.2": "x_block.mlp.fc2",
    "ff_context.net.0.proj": "context_block.mlp.fc1",
    "ff_context.net.2": "context_block.mlp.fc2",
}
SD3_QKV = {
    "x_block.attn.qkv": "attn.to_{}",
    "context_block.attn.qkv": "attn.add_{}_proj",
    "x_block.attn2.qkv": "attn2.to_{}",
}


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    """diffusers orders the final adaLN's outputs (scale, shift), the original (shift, scale)."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a])


def sd3_transformer_state(transformer) -> dict[str, torch.Tensor]:
    """The MMDiT's weights under the original names (`model.diffusion_model.*`): q/k/v fused, the last
    block's context adaLN and the final adaLN in (shift, scale) order."""
    sd, last = transformer.state_dict(), transformer.config.num_layers - 1
    out = {"pos_embed": sd.pop("pos_embed.pos_embed")}
    for key in list(sd):
        module, param = key.rsplit(".", 1)
        if module in SD3_TOP:
            value = sd.pop(key)
            out[f"{SD3_TOP[module]}.{param}"] = _swap_halves(value) if module == "norm_out.linear" else value
    for i in range(transformer.config.num_layers):
        block = f"transformer_blocks.{i}."
        for fused, separate in SD3_QKV.items():
            for param in ("weight", "bias"):
                names = [f"{block}{separate.format(q)}.{param}" for q in "qkv"]
                if all(n in sd for n in names):
                    out[f"joint_blocks.{i}.{fused}.{param}"] = torch.cat([sd.pop(n) for n in names])
        for key in [k for k in sd if k.startswith(block)]:
            module, param = key[len(block) :].rsplit(".", 1)
            value = sd.pop(key)
            if module == "norm1_context.linear" and i == last:
                value = _swap_halves(value)
            out[f"joint_blocks.{i}.{SD3_BLOCK[module]}.{param}"] = value
    assert not sd, f"no original name for {sorted(sd)[:3]}"
    return {f"model.diffusion_model.{k}": v for k, v in out.items()}


def sd3_encoder_files(backbone) -> dict[str, dict[str, torch.Tensor]]:
    """Each text encoder as ComfyUI's separate files hold it: `clip_l`, `clip_g` (transformers' `text_model.*`
    layout) and `t5` (`encoder.*` and `shared.weight`, without the tied `encoder.embed_tokens` copy)."""
    files = {"clip_l": hf_clip_state(backbone.text_encoder), "clip_g": hf_clip_state(backbone.text_encoder_2)}
    if backbone.text_encoder_3 is not None:
        t5 = backbone.text_encoder_3.state_dict()
        files["t5"] = {k: v for k, v in t5.items() if k != "encoder.embed_tokens.weight"}
    return files


SD3_ENCODER_PREFIX = {
    "clip_l": "text_encoders.clip_l.transformer.",
    "clip_g": "text_encoders.clip_g.transformer.",
    "t5": "text_encoders.t5xxl.transformer.",
}


def write_sd3_single_file(backbone, folder: Path, inside=("clip_l", "clip_g", "t5"), dtype=torch.float32) -> dict:
    """Save an SD3-shaped `backbone` as `folder/model.safetensors` (MMDiT + VAE + the encoders in `inside`,
    SD3 layout) and every text encoder as its own ComfyUI-style file `folder/<clip_l|clip_g|t5>.safetensors`.
    Returns {"path": ..., "clip_l": ..., "clip_g": ..., "t5": ...} (t5 only when the backbone has one)."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {**sd3_transformer_state(backbone.unet), **vae_state(backbone.vae)}
    files = {"path": folder / "model.safetensors"}
    for key, encoder in sd3_encoder_files(backbone).items():
        if key in inside:
            state.update({SD3_ENCODER_PREFIX[key] + k: v for k, v in encoder.items()})
        files[key] = folder / f"{key}.safetensors"
        save_file({k: v.detach().to(dtype).contiguous() for k, v in encoder.items()}, files[key])
    save_file({k: v.detach().to(dtype).contiguous() for k, v in state.items()}, files["path"])
    return files
