"""A1111 hypernetwork files, read and written.

`.pt` (the webui's layout, in torch's zip layout without the entries its safe unpickler rejects, which
ComfyUI's hypernetwork loader also reads, mmap included; see `io.pickles.save_pt`):
`{<width>: (K state dict, V state dict), ..., "name", "step", "layer_structure", "activation_func",
"is_layer_norm", "weight_initialization", "sd_checkpoint", "sd_checkpoint_name", "activate_output",
"use_dropout", "dropout_structure", "last_layer_dropout", "optional_info"}`. Old NovelAI-era files with only
the width keys and `linear1`/`linear2` module names load too, with the webui's defaults for missing keys.

`.safetensors`: tensors `"<width>.<k|v>.<param>"`; the settings and metadata as JSON in the header. Only
lit_ti reads this layout (ComfyUI's loader wants the `.pt` dict; A1111 reads no hypernetwork safetensors).

Pickles are opened with `weights_only=True`: a file that would run code is refused and never runs. Every file
is checked against the caps of `io.limits` before loading, and its declared structure (widths, layer
structure) against the parameters it really holds before any module is built; non-finite weights are refused.
"""

import itertools
import json
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lit_ti.errors import UserError
from lit_ti.io import formats
from lit_ti.io.atomic import atomic_path
from lit_ti.io.limits import HYPERNETWORK_LAYERS, HYPERNETWORK_WIDTH, check_safetensors
from lit_ti.io.pickles import load_pickle, save_pt
from lit_ti.modules.hypernetwork import Hypernetwork


def to_a1111(hn: Hypernetwork) -> dict:
    """Our settings -> the webui's metadata keys."""
    s = hn.settings
    dropout = [float(p) for p in (s.get("dropout_structure") or [0.0] * len(s.get("layer_structure", [1, 2, 1])))]
    return {
        "layer_structure": [float(x) for x in s.get("layer_structure", [1, 2, 1])],
        "activation_func": s.get("activation_func") or "linear",
        "is_layer_norm": bool(s.get("add_layer_norm", False)),
        "weight_initialization": s.get("weight_init", "Normal"),
        "activate_output": bool(s.get("activate_output", False)),
        "use_dropout": any(p > 0 for p in dropout),
        "dropout_structure": dropout,
        "last_layer_dropout": len(dropout) > 1 and dropout[-2] != 0,
    }


def from_a1111(meta: dict) -> dict:
    """The webui's metadata (missing keys get its loading defaults) -> our settings."""
    layers = list(meta.get("layer_structure") or [1, 2, 1])
    dropout = meta.get("dropout_structure")
    if dropout is None:
        use = bool(meta.get("use_dropout", False))
        last = bool(meta.get("last_layer_dropout", False))
        dropout = [0.0] * len(layers) if not use else [0.0] + [0.3] * (len(layers) - 3) + [0.3 if last else 0.0, 0.0]
    return {
        "layer_structure": layers,
        "activation_func": meta.get("activation_func") or "linear",
        "weight_init": meta.get("weight_initialization") or "Normal",
        "add_layer_norm": bool(meta.get("is_layer_norm", False)),
        "activate_output": bool(meta.get("activate_output", True)),  # the webui's default for old files
        "dropout_structure": [float(p) for p in dropout],
    }


def save_hypernetwork(
    path: str | Path,
    hn: Hypernetwork,
    name: str | None = None,
    step: int | None = None,
    sd_checkpoint: str | None = None,
    sd_checkpoint_name: str | None = None,
    optional_info: str | None = None,
) -> Path:
    """Write by suffix (`.pt` A1111 layout, or `.safetensors`), atomically."""
    path = Path(path)
    if not all(bool(torch.isfinite(p).all()) for p in hn.parameters()):
        raise ValueError(f"{path}: refusing to write a hypernetwork with non-finite (NaN/Inf) weights")
    meta = {
        **to_a1111(hn),
        "name": name or path.stem,
        "step": None if step is None else int(step),
        "sd_checkpoint": sd_checkpoint,
        "sd_checkpoint_name": sd_checkpoint_name,
        "optional_info": optional_info,
    }

    def state(module) -> OrderedDict:
        return OrderedDict(
            (k, v.detach().to("cpu", torch.float32).contiguous()) for k, v in module.state_dict().items()
        )

    fmt = formats.BY_SUFFIX.get(path.suffix.lower())
    if fmt is None or formats.HYPERNETWORK not in fmt.writes:
        raise ValueError(
            f"{path}: unknown hypernetwork format; use {', '.join(formats.exportable(formats.HYPERNETWORK))}"
        )
    with atomic_path(path) as tmp:
        if fmt.container == formats.PICKLE:
            data = {size: (state(hn.pair(size)[0]), state(hn.pair(size)[1])) for size in hn.sizes}
            save_pt({**data, **meta}, tmp)
        else:  # formats.SAFETENSORS
            tensors = {
                f"{size}.{kv}.{key}": value
                for size in hn.sizes
                for kv, module in zip("kv", hn.pair(size))
                for key, value in state(module).items()
            }
            save_file(tensors, tmp, metadata={"lit_ti_hypernetwork": json.dumps(meta)})
    return path


def _legacy(state: dict) -> dict:
    """NovelAI-era module names: linear1/linear2 -> linear.0/linear.1."""
    return {k.replace("linear1.", "linear.0.").replace("linear2.", "linear.1."): v for k, v in state.items()}


def _read(path: Path) -> tuple[dict[int, tuple[dict, dict]], dict]:
    """`({width: (K state, V state)}, metadata)` as the file holds them, nothing built yet."""
    if formats.format_of(path, formats.HYPERNETWORK).container == formats.SAFETENSORS:
        check_safetensors(path, "hypernetwork")
        with safe_open(path, "pt") as f:
            meta = json.loads((f.metadata() or {}).get("lit_ti_hypernetwork", "{}"))
            flat = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
        states: dict[int, tuple[dict, dict]] = {}
        for key, value in flat.items():
            size, kv, param = key.split(".", 2)
            states.setdefault(int(size), ({}, {}))["kv".index(kv)][param] = value
        return states, meta
    data = load_pickle(path, "hypernetwork")
    if not isinstance(data, dict):
        raise UserError(f"{path}: holds a {type(data).__name__}, not a hypernetwork dict")

    def width(k) -> bool:
        return isinstance(k, int) or (isinstance(k, str) and k.isdigit())

    states = {int(k): (dict(v[0]), dict(v[1])) for k, v in data.items() if width(k)}
    return states, {k: v for k, v in data.items() if not width(k)}


def _check_structure(path: Path, states: dict, settings: dict) -> None:
    """Widths and layer structure within bounds, and no more parameters than the file holds (a 1 MB file
    may not make us build gigabytes of modules); every weight a finite tensor."""
    layers, dropout = settings["layer_structure"], settings["dropout_structure"]
    numbers = [*layers, *dropout]
    if not 2 <= len(layers) <= HYPERNETWORK_LAYERS or not all(
        isinstance(x, int | float) and not isinstance(x, bool) and 0 <= x < 1e4 for x in numbers
    ):
        raise UserError(f"{path}: layer_structure {layers!r} is not 2 to {HYPERNETWORK_LAYERS} numbers like [1, 2, 1]")
    bad = [w for w in states if not 0 < w <= HYPERNETWORK_WIDTH]
    if bad:
        raise UserError(f"{path}: width {bad[0]} is not a context width (1 to {HYPERNETWORK_WIDTH})")
    held = 0
    for pair in states.values():
        for state in pair:
            for key, value in state.items():
                if not isinstance(value, torch.Tensor) or value.is_complex():
                    raise UserError(f"{path}: {key} is a {type(value).__name__}, not a weight tensor")
                if not bool(torch.isfinite(value.float()).all()):
                    raise UserError(
                        f"{path}: {key} holds non-finite values (NaN/Inf): the file is damaged or came from a "
                        "diverged run; use an earlier copy"
                    )
                held += value.numel()
    needed = sum(2 * int(w * a) * int(w * b) for w in states for a, b in itertools.pairwise(layers))
    if needed > held:
        raise UserError(
            f"{path}: its settings (widths {sorted(states)}, layer_structure {layers}) need {needed} weights, "
            f"the file holds {held}"
        )


def load_hypernetwork(path: str | Path) -> tuple[Hypernetwork, dict]:
    """(module in fp32, the file's metadata) for an A1111 `.pt` or our `.safetensors`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such hypernetwork file")
    try:
        states, meta = _read(path)
        if not isinstance(meta, dict):
            raise TypeError(f"its metadata is a {type(meta).__name__}")
        settings = from_a1111(meta)
    except UserError:
        raise
    except Exception as e:
        raise UserError(
            f"{path}: cannot be read as a hypernetwork ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "pickled files may contain only tensors and plain containers"
        ) from None
    if not states:
        raise UserError(f"{path}: no width keys (320, 640, 768, ...): not an A1111 hypernetwork")
    _check_structure(path, states, settings)
    try:
        hn = Hypernetwork(sorted(states), **settings)
        for size, (k_state, v_state) in states.items():
            for module, state in zip(hn.pair(size), (k_state, v_state)):
                module.load_state_dict(_legacy(state))
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    except (RuntimeError, ValueError, TypeError, KeyError) as e:
        raise UserError(f"{path}: its weights do not match its settings ({str(e).splitlines()[0][:200]})") from None
    return hn, meta
