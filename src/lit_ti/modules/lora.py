"""LoRA adapters on the frozen backbone's attention projections, through `peft` (as diffusers' own trainers
attach them): no Lightning here, and no file layouts (those are `io/loras.py`).

peft wraps each targeted `nn.Linear` in a `LoraLayer` whose output is `W x + B(A(dropout(x))) × alpha / r`
(`A = lora_A` `[r, in]`, Kaiming-initialised; `B = lora_B` `[out, r]`, zero-initialised, so a fresh adapter
changes nothing). The adapter weights are kept in float32 whatever the frozen weights' dtype: peft casts the
input to the adapter's dtype and the sum back.
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from lit_ti.io.loras import LoraFile, LoraModule, kohya_name

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # every attention block's projections (self and cross)
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")  # CLIP's self-attention
ADAPTER = "lit_ti"  # the adapter's name inside peft's layers


def file_path(model: str, path: str) -> str:
    """A module's path as LoRA files name it: transformers 5 dropped the `text_model.` level of CLIP text
    encoders, which every kohya, A1111 and diffusers file has (`text_model.encoder.layers.0.self_attn.q_proj`)."""
    return f"text_model.{path}" if model != "unet" and not path.startswith("text_model.") else path


def lora_config(rank: int, alpha: float, dropout: float, targets) -> LoraConfig:
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets))


def attach(model: nn.Module, config: LoraConfig, adapter: str = ADAPTER) -> dict[str, LoraLayer]:
    """Wrap `model`'s target layers in place; `{module path: LoraLayer}` of what was adapted (float32)."""
    inject_adapter_in_model(config, model, adapter_name=adapter)
    found = layers(model, adapter)
    for layer in found.values():
        layer.lora_A[adapter].float()
        layer.lora_B[adapter].float()
    return found


def layers(model: nn.Module, adapter: str = ADAPTER) -> dict[str, LoraLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer) and adapter in m.lora_A}


def weights(
    found: dict[str, LoraLayer], dtype: torch.dtype = torch.float32, adapter: str = ADAPTER
) -> dict[str, LoraModule]:
    """`{module path: LoraModule}` of the live adapter (detached, on the CPU, in `dtype`; alpha too, as kohya's
    files hold it)."""
    out = {}
    for path, layer in found.items():
        alpha = torch.tensor(float(layer.lora_alpha[adapter]), dtype=dtype)
        down, up = (m[adapter].weight.detach().to("cpu", dtype) for m in (layer.lora_A, layer.lora_B))
        out[path] = LoraModule(down, up, alpha)
    return out


def set_strength(model: nn.Module, strength: float, adapter: str = ADAPTER) -> None:
    """Scale every adapted layer's update by `strength` (A1111's `<lora:name:strength>`); 1 = as trained."""
    for layer in layers(model, adapter).values():
        layer.set_scale(adapter, strength)


@contextmanager
def switched_off(models: list[nn.Module], strength: float = 1.0, adapter: str = ADAPTER) -> Iterator[None]:
    """The models' adapters at strength 0 inside the block (the base model), back at `strength` after it."""
    for model in models:
        set_strength(model, 0.0, adapter)
    try:
        yield
    finally:
        for model in models:
            set_strength(model, strength, adapter)


@contextmanager
def zeroed(found: list[LoraLayer], adapter: str = ADAPTER) -> Iterator[None]:
    """The layers' adapters at scale 0 inside the block, back at whatever scale they had after it."""
    scales = [layer.scaling[adapter] for layer in found]
    for layer in found:
        layer.scaling[adapter] = 0.0
    try:
        yield
    finally:
        for layer, scale in zip(found, scales, strict=True):
            layer.scaling[adapter] = scale


@contextmanager
def below_timestep(unet: nn.Module, max_timestep: int | None, adapter: str = ADAPTER) -> Iterator[None]:
    """Inside the block, the UNet's adapters act only for samples at timesteps below `max_timestep` (None: at
    every timestep). A sample's layout (size, place, background) is decided at high noise; a LoRA kept out of
    those steps leaves it to the prompt and still draws the concept's details below. The gate zeroes whatever
    strength is in use for one call at a time, so `switched_off` and `set_strength` inside the block still hold.
    A batch that mixes timesteps (an evaluation's fixed draws; never a sampling step) runs twice, with and
    without the adapters, and each sample takes the output its own timestep asks for."""
    if max_timestep is None:
        yield
        return
    found = list(layers(unet, adapter).values())
    had, forward = "forward" in vars(unet), unet.forward  # an instance's own forward (another gate) comes back

    def gated(*args, **kwargs):
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
        below = torch.as_tensor(timestep).reshape(-1) < max_timestep  # [1] or [B]
        if bool(below.all()):
            return forward(*args, **kwargs)
        with zeroed(found, adapter):
            off = forward(*args, **kwargs)
        if not bool(below.any()):
            return off
        on = forward(*args, **kwargs)
        first_on, first_off = (out[0] if isinstance(out, tuple) else out.sample for out in (on, off))
        mixed = torch.where(below.to(first_on.device).view(-1, *[1] * (first_on.dim() - 1)), first_on, first_off)
        return (mixed, *on[1:]) if isinstance(on, tuple) else type(on)(sample=mixed)

    unet.forward = gated
    try:
        yield
    finally:
        if had:
            unet.forward = forward
        else:
            del unet.forward


def detach(model: nn.Module, adapter: str = ADAPTER) -> None:
    """Put the original layers back (peft's wrappers hold them as `base_layer`)."""
    for path, layer in layers(model, adapter).items():
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer.get_base_layer())


def attach_file(models: dict[str, nn.Module], lora: LoraFile, sdxl: bool, strength: float = 1.0) -> Callable[[], None]:
    """Put a kohya-layout LoRA onto `models` (`{"unet": ..., "text_encoder": ...}`) at `strength`; returns the
    function that takes it off again. Module names are resolved as the webui's diffusers backend does: each
    model's module paths with `.` -> `_` under the model's kohya prefix."""
    by_name = {
        kohya_name(model, file_path(model, path), sdxl): (model, path, module)
        for model, root in models.items()
        for path, module in root.named_modules()
        if isinstance(module, nn.Linear)
    }
    unknown = sorted(set(lora.modules) - set(by_name))
    if unknown:
        raise ValueError(f"{len(unknown)} LoRA module(s) match no linear layer of this model, e.g. {unknown[0]}")
    for name, m in lora.modules.items():
        layer = by_name[name][2]
        if (m.down.shape[1], m.up.shape[0]) != (layer.in_features, layer.out_features):
            raise ValueError(
                f"{name} maps {m.down.shape[1]} -> {m.up.shape[0]} features, this model's layer "
                f"{layer.in_features} -> {layer.out_features}"
            )
    attached = []
    try:
        for model, root in models.items():
            mine = {by_name[n][1]: m for n, m in lora.modules.items() if by_name[n][0] == model}
            if not mine:
                continue
            first = next(iter(mine.values()))
            config = LoraConfig(
                r=first.rank,
                lora_alpha=float(first.alpha),
                target_modules=sorted(mine),
                rank_pattern={p: m.rank for p, m in mine.items() if m.rank != first.rank},
                alpha_pattern={p: float(m.alpha) for p, m in mine.items() if float(m.alpha) != float(first.alpha)},
            )
            found = attach(root, config)
            attached.append(root)
            device = next(root.parameters()).device
            with torch.no_grad():
                for path, layer in found.items():
                    layer.lora_A[ADAPTER].weight.copy_(mine[path].down.to(device))
                    layer.lora_B[ADAPTER].weight.copy_(mine[path].up.to(device))
            set_strength(root, strength)
    except BaseException:
        for root in attached:
            detach(root)
        raise

    def undo() -> None:
        for root in attached:
            detach(root)

    return undo


def to_kohya(
    found: dict[str, dict[str, LoraLayer]], sdxl: bool, dtype: torch.dtype = torch.float32
) -> dict[str, LoraModule]:
    """`{model: {path: LoraLayer}}` -> `{kohya module name: LoraModule}` (the file's modules, in `dtype`)."""
    return {
        kohya_name(model, file_path(model, path), sdxl): m
        for model, paths in found.items()
        for path, m in weights(paths, dtype).items()
    }


def to_diffusers(
    found: dict[str, dict[str, LoraLayer]], dtype: torch.dtype = torch.float32
) -> dict[str, dict[str, LoraModule]]:
    """`{model: {path: LoraLayer}}` -> `{model: {file path: LoraModule}}` (the diffusers file's modules)."""
    return {model: {file_path(model, p): m for p, m in weights(paths, dtype).items()} for model, paths in found.items()}
