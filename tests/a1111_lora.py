"""The A1111 webui's LoRA loader key rules (extensions-builtin/Lora: networks.py `load_network` and
`convert_diffusers_name_to_compvis`, network.py/network_lora.py's scale, `network_apply_weights`' fused-q/k/v
rule), re-stated to test our files against them. Imported only by conftest.py, which hands `a1111_load_lora` to
tests as a fixture.

The webui names a model's layers by their original-layout (LDM) module paths with `.` -> `_`: SD1/SD2's UNet
`diffusion_model_*`, SD1's CLIP `transformer_text_model_*`, SD2's OpenCLIP `model_transformer_resblocks_*`;
SDXL numbers its two encoders `0_transformer_text_model_*` (CLIP-L) and `1_model_transformer_resblocks_*`
(OpenCLIP bigG, whose q/k/v are one fused `nn.MultiheadAttention`)."""

import re

import torch

RESNET_SUFFIX = {"conv1": "in_layers_2", "conv2": "out_layers_3", "time_emb_proj": "emb_layers_1"}
RESNET_SUFFIX |= {"conv_shortcut": "skip_connection"}
X_PROJ = re.compile(r"(.*)_([qkv]_proj)$")  # networks.py's re_x_proj: a q/k/v LoRA onto a fused attention


def convert_diffusers_name_to_compvis(key: str, is_sd2: bool) -> str:
    """The webui's renaming of diffusers-style kohya names to its own (LDM) module names."""

    def match(pattern: str):
        m = re.match(pattern, key)
        return None if m is None else [int(g) if re.match(r"\d+", g) else g for g in m.groups()]

    if m := match(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)"):
        suffix = RESNET_SUFFIX.get(m[3], m[3]) if m[1] == "resnets" else m[3]
        return f"diffusion_model_input_blocks_{1 + m[0] * 3 + m[2]}_{1 if m[1] == 'attentions' else 0}_{suffix}"
    if m := match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)"):
        suffix = RESNET_SUFFIX.get(m[2], m[2]) if m[0] == "resnets" else m[2]
        return f"diffusion_model_middle_block_{1 if m[0] == 'attentions' else m[1] * 2}_{suffix}"
    if m := match(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)"):
        suffix = RESNET_SUFFIX.get(m[3], m[3]) if m[1] == "resnets" else m[3]
        return f"diffusion_model_output_blocks_{m[0] * 3 + m[2]}_{1 if m[1] == 'attentions' else 0}_{suffix}"
    if m := match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)"):
        if is_sd2:
            return f"model_transformer_resblocks_{m[0]}_{open_clip_suffix(m[1])}"
        return f"transformer_text_model_encoder_layers_{m[0]}_{m[1]}"
    if m := match(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)"):  # SDXL's second encoder
        return f"1_model_transformer_resblocks_{m[0]}_{open_clip_suffix(m[1])}"
    return key


def open_clip_suffix(rest: str) -> str:
    return rest.replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj").replace("self_attn", "attn")


def a1111_load_lora(sd: dict[str, torch.Tensor], layer_names: set[str], fused: frozenset = frozenset()) -> tuple:
    """What the webui makes of a LoRA state dict on a model whose network layers are `layer_names` (its
    `network_layer_mapping` keys; `fused`: those of them that are `nn.MultiheadAttention`s): `({layer:
    {"updown": [out, in], "scale": alpha / r}}, {bundled name: embedding data as create_embedding_from_data
    receives it})`. Unmatched keys raise (the webui would print them and skip them: a silent loss), and so does
    a fused attention that does not get all of q/k/v/out (the webui then applies none of them)."""
    is_sd2 = "model_transformer_resblocks" in "\n".join(layer_names)  # KeyConvert's test (true for SDXL too)
    matched: dict[str, dict[str, torch.Tensor]] = {}
    onto_fused: dict[str, set[str]] = {}
    bundles: dict[str, dict] = {}
    for key_network, weight in sd.items():
        without_parts, _, network_part = key_network.partition(".")
        if without_parts == "bundle_emb":
            emb_name, vec_name = network_part.split(".", 1)
            emb = bundles.setdefault(emb_name, {})
            if vec_name.split(".")[0] == "string_to_param":
                emb["string_to_param"] = {vec_name.split(".", 1)[1]: weight}
            else:
                emb[vec_name] = weight
            continue
        key = convert_diffusers_name_to_compvis(without_parts, is_sd2)
        found = key in layer_names
        if not found and (m := X_PROJ.match(key)) and m[1] in layer_names:  # onto the fused attention
            assert m[1] in fused, f"{key_network}: a q/k/v LoRA onto {m[1]}, which is no fused attention"
            onto_fused.setdefault(m[1], set()).add(m[2])
            found = True
        if not found and "lora_unet" in without_parts:  # SDXL files with LDM names
            key = without_parts.replace("lora_unet", "diffusion_model")
        elif not found and "lora_te1_text_model" in without_parts:
            key = without_parts.replace("lora_te1_text_model", "0_transformer_text_model")
        if not found and key not in layer_names:
            raise KeyError(f"the webui finds no layer for {key_network} (tried {key})")
        matched.setdefault(key, {})[network_part] = weight
    for attention, parts in onto_fused.items():  # network_apply_weights: q, k, v and out, or nothing at all
        if parts != {"q_proj", "k_proj", "v_proj"} or f"{attention}_out_proj" not in matched:
            raise KeyError(f"{attention}: the webui applies q/k/v/out together; this file has {sorted(parts)}")
    modules = {}
    for key, w in matched.items():
        assert {"lora_up.weight", "lora_down.weight"} <= set(w), (key, sorted(w))  # ModuleTypeLora's test
        up, down = w["lora_up.weight"], w["lora_down.weight"]
        dim = down.shape[0]
        scale = w["alpha"].item() / dim if "alpha" in w else 1.0  # NetworkModule.calc_scale
        modules[key] = {"updown": up.float() @ down.float(), "scale": scale}
    return modules, bundles


def embedding_from_data(data: dict) -> torch.Tensor | dict[str, torch.Tensor]:
    """textual_inversion.create_embedding_from_data's branches for what a bundle gives it."""
    if "string_to_param" in data:
        params = data["string_to_param"]
        assert len(params) == 1, "embedding file has multiple terms in it"
        return next(iter(params.values()))
    if "clip_g" in data and "clip_l" in data:
        return dict(data)
    raise AssertionError(f"the webui cannot make an embedding of {sorted(data)}")
