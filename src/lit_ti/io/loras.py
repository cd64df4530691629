"""LoRA files (pivotal tuning's exports), read and written: pure functions, explicit key names.

Two layouts, both `.safetensors`, told apart by their keys:

* **kohya / A1111** (`save_lora`, `read_lora`): per adapted module `<prefix>_<module path with _>.lora_down.weight`
  `[r, in]`, `.lora_up.weight` `[out, r]` and `.alpha` (a 0-dim tensor; the update is up @ down × alpha / r).
  Prefixes: `lora_unet`, `lora_te` (SD1/SD2's text encoder) or `lora_te1` / `lora_te2` (SDXL's two). The
  embedding trained with it rides along as A1111's bundle (its LoRA loader, PR #13568):
  `bundle_emb.<name>.string_to_param.*` `[n, d]`, or SDXL's `bundle_emb.<name>.clip_l` / `.clip_g`.
  The webui registers a bundled embedding as `<name>`; ComfyUI ignores bundles, so the embedding is also
  written as its own file (`io.save_embedding`). kohya's `ss_network_*` metadata names rank and alpha.
* **diffusers / peft** (`save_diffusers_lora`): `<model>.<module path>.lora_A.weight` / `.lora_B.weight`
  (`model`: `unet`, `text_encoder`, `text_encoder_2`), with the `LoraConfig` of each model in the
  `lora_adapter_metadata` header entry (prefixed `<model>.`), as `save_lora_weights` writes it, so
  `pipe.load_lora_weights` restores rank and alpha exactly.

Files are checked against `io.limits` (`lora`) before anything is loaded, non-finite tensors are refused,
and every write goes through a temp file and a rename.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from lit_ti.errors import UserError
from lit_ti.io import formats
from lit_ti.io.atomic import atomic_path
from lit_ti.io.limits import check_safetensors

BUNDLE = "bundle_emb"  # A1111's prefix of embeddings inside a LoRA file
PARTS = ("lora_down.weight", "lora_up.weight", "alpha")  # a kohya module's tensors, in this order
PEFT_PARTS = ("lora_A.weight", "lora_B.weight")
KOHYA = {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2"}
KOHYA_SDXL = {**KOHYA, "text_encoder": "lora_te1"}  # SDXL files number their two text encoders
METADATA_KEY = "lora_adapter_metadata"  # diffusers' header entry for the LoraConfigs
Vectors = Tensor | dict[str, Tensor]  # [n, d], or SDXL's {"clip_l": [n, 768], "clip_g": [n, 1280]}


@dataclass
class LoraModule:
    """One adapted linear layer: its update is `up @ down * alpha / rank` (× the strength at generation)."""

    down: Tensor  # [r, in]  (peft's lora_A)
    up: Tensor  # [out, r]  (peft's lora_B)
    alpha: Tensor  # 0-dim

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass
class LoraFile:
    modules: dict[str, LoraModule]  # kohya module name (`lora_unet_down_blocks_0_..._to_q`) -> weights
    embeddings: dict[str, Vectors] = field(default_factory=dict)  # bundled: name -> [n, d] or SDXL's pair
    metadata: dict[str, str] = field(default_factory=dict)


def kohya_name(model: str, path: str, sdxl: bool) -> str:
    """`("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")` -> `lora_unet_down_blocks_0_..._to_q`."""
    return f"{(KOHYA_SDXL if sdxl else KOHYA)[model]}_{path.replace('.', '_')}"


def is_lora(keys) -> bool:
    """Whether a safetensors file's tensor names are a LoRA's (either layout, or a bundle)."""
    return any(k.startswith(f"{BUNDLE}.") or k.endswith((".lora_down.weight", ".lora_A.weight")) for k in keys)


def bundled_embeddings(data: dict[str, Tensor]) -> dict[str, Vectors]:
    """The embeddings A1111's LoRA loader finds in a file, unchecked (`io.read_embedding` checks them):
    `bundle_emb.<name>.<rest>` grouped by `<name>`; `<rest>` = `string_to_param.<token>` gives `[n, d]`, any
    other `<rest>` is a key of a dict (SDXL's `clip_l` / `clip_g`)."""
    found: dict[str, dict[str, Tensor]] = {}
    for key, tensor in data.items():
        head, _, rest = key.partition(".")
        if head == BUNDLE:
            name, _, part = rest.partition(".")
            found.setdefault(name, {})[part.split(".", 1)[0]] = tensor
    return {name: parts.get("string_to_param", parts) for name, parts in found.items()}


def _cpu(t: Tensor) -> Tensor:
    return t.detach().to("cpu").contiguous()


def _finite(path: Path, tensors: dict[str, Tensor]) -> None:
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"{path}: refusing to write non-finite (NaN/Inf) tensors ({bad[0]}, ...)")


def _check_path(path: Path) -> None:
    fmt = formats.BY_SUFFIX.get(path.suffix.lower())
    if fmt is None or formats.LORA not in fmt.writes:
        raise ValueError(f"{path}: unknown LoRA format; use {', '.join(formats.exportable(formats.LORA))}")


def save_lora(
    path: str | Path,
    modules: dict[str, LoraModule],
    embeddings: dict[str, Vectors] | None = None,
    metadata: dict[str, object] | None = None,
) -> Path:
    """kohya/A1111 layout with the `embeddings` bundled; tensors are written in their own dtype (bit-exact)."""
    path = Path(path)
    _check_path(path)
    tensors: dict[str, Tensor] = {}
    for name, m in modules.items():
        for part, t in zip(PARTS, (m.down, m.up, m.alpha)):
            tensors[f"{name}.{part}"] = _cpu(t)
    for name, vectors in (embeddings or {}).items():
        if "." in name:
            raise ValueError(f"bundled embedding name {name!r}: A1111 splits keys at '.'")
        if isinstance(vectors, dict):
            tensors |= {f"{BUNDLE}.{name}.{k}": _cpu(v).float() for k, v in vectors.items()}
        else:
            tensors[f"{BUNDLE}.{name}.string_to_param.*"] = _cpu(vectors).float()
    _finite(path, tensors)
    ranks = {m.rank for m in modules.values()}
    alphas = {float(m.alpha) for m in modules.values()}
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(ranks.pop()) if len(ranks) == 1 else "Dynamic",
        "ss_network_alpha": str(alphas.pop()) if len(alphas) == 1 else "Dynamic",
        **{k: str(v) for k, v in (metadata or {}).items() if v is not None},
    }
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=meta)
    return path


def read_lora(path: str | Path) -> LoraFile:
    """A kohya/A1111 LoRA file (modules and bundled embeddings); one UserError for anything else."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such LoRA file")
    formats.format_of(path, formats.LORA)
    try:
        check_safetensors(path, "lora")
        data = load_file(path, device="cpu")
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise UserError(
            f"{path}: cannot be read as a LoRA ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from None
    modules: dict[str, dict[str, Tensor]] = {}
    for key, tensor in data.items():
        name, _, part = key.partition(".")
        if name == BUNDLE:
            continue
        if part not in PARTS:
            hint = " (a diffusers-layout LoRA: load it with pipe.load_lora_weights)" if key.endswith(PEFT_PARTS) else ""
            raise UserError(
                f"{path}: {key!r} is not a kohya LoRA key (<module>.lora_down/lora_up.weight, .alpha){hint}"
            )
        modules.setdefault(name, {})[part] = tensor
    out = {}
    for name, parts in modules.items():
        if set(parts) != set(PARTS):
            raise UserError(f"{path}: module {name!r} has {sorted(parts)}; a LoRA module needs {', '.join(PARTS)}")
        down, up, alpha = (parts[p] for p in PARTS)
        if down.dim() != 2 or up.dim() != 2 or up.shape[1] != down.shape[0] or alpha.numel() != 1:
            raise UserError(
                f"{path}: module {name!r}: down {list(down.shape)}, up {list(up.shape)}, alpha {list(alpha.shape)} do "
                "not make a linear LoRA (down [r, in], up [out, r], alpha a number)"
            )
        out[name] = LoraModule(down, up, alpha.reshape(()))
    bad = [k for k, t in data.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise UserError(f"{path}: {bad[0]!r} holds NaN or infinite values; use an earlier copy")
    embeddings = bundled_embeddings(data)
    if not out and not embeddings:
        raise UserError(f"{path}: holds no LoRA module and no bundled embedding")
    return LoraFile(out, embeddings, dict(meta))


def save_diffusers_lora(
    path: str | Path, layers: dict[str, dict[str, LoraModule]], configs: dict[str, dict], metadata=None
) -> Path:
    """diffusers/peft layout: `layers` = `{model: {module path: LoraModule}}`, `configs` = `{model: LoraConfig
    as a dict}` (rank and alpha travel there: peft files hold no alpha tensors)."""
    path = Path(path)
    _check_path(path)
    tensors = {
        f"{model}.{module}.{part}": _cpu(t)
        for model, modules in layers.items()
        for module, m in modules.items()
        for part, t in zip(PEFT_PARTS, (m.down, m.up))
    }
    _finite(path, tensors)
    packed = {
        f"{model}.{k}": sorted(v) if isinstance(v, set) else v for model, c in configs.items() for k, v in c.items()
    }
    meta = {"format": "pt", METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True, default=str)}
    meta |= {k: str(v) for k, v in (metadata or {}).items() if v is not None}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=meta)
    return path
