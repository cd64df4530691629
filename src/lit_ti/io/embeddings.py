"""Textual-inversion embedding files, read and written in the layouts the other tools use.

Written (chosen by the file suffix):
* `.pt`: A1111 layout `{string_to_token, string_to_param, name, step, sd_checkpoint, sd_checkpoint_name}`,
  in torch's zip layout without the entries the webui's safe unpickler rejects (`.format_version`,
  `.storage_alignment`, ...) and 64-byte aligned, so ComfyUI's `--mmap-torch-files` maps it too
  (`io.pickles.save_pt`). diffusers' `load_textual_inversion` reads it (token = the `name` key).
* `.safetensors`: `{"emb_params": [n, d]}` (kohya; A1111 and ComfyUI read any single-key file), SDXL's
  `{"clip_l": [n, 768], "clip_g": [n, 1280]}`, or SD3's with T5 vectors added twice: as `t5xxl` [n, 4096]
  (ComfyUI's key) and as `t5` (OneTrainer's); name/step/checkpoint go in the safetensors metadata.
* `.bin`: diffusers' `{token: [n, d]}` (written the same way, so the webui loads it too).

Read: all of the above, the embeddings bundled in a LoRA `.safetensors` (A1111's `bundle_emb.<name>.*`, see
`io/loras.py`; a LoRA without one is `NotAnEmbedding`, which folder scans skip), the original-TI/A1111 `.pt` (also with `string_to_param` as an `nn.ParameterDict`),
diffusers `learned_embeds.*` files with one or more tokens, kohya `emb_params`, SDXL `clip_l`/`clip_g`, and SD3
files with any of `clip_l`, `clip_g` and `t5xxl` or `t5` (OneTrainer's `*_out` tensors are ignored).
Pickles are opened with `weights_only=True`, so a file that would run code is refused; every file is
checked against the caps of `io.limits` before anything is allocated, and non-finite vectors are refused.
Every write goes through a temp file and a rename.
"""

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, safe_open, save_file
from torch import Tensor

from lit_ti.errors import UserError
from lit_ti.io import formats, loras
from lit_ti.io.atomic import atomic_path
from lit_ti.io.limits import check_safetensors
from lit_ti.io.pickles import load_pickle, save_pt
from lit_ti.io.png_embeddings import KEY, NotAnEmbedding, read_png_embedding, save_png_embedding

Vectors = Tensor | dict[str, Tensor]  # [n, d], or {"clip_l": [n, 768], "clip_g": [n, 1280], "t5xxl": [n, 4096]}
SDXL_KEYS = ("clip_l", "clip_g")
ENCODER_KEYS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g", "text_encoder_3": "t5xxl"}  # bank -> file key
T5_ALIASES = ("t5xxl", "t5")  # ComfyUI's key (ours), OneTrainer's; both are written, either is read
A1111_TOKEN_ID = 265  # the CLIP id of "*" that A1111 writes into string_to_token; never read back


@dataclass
class EmbeddingFile:
    """One concept read from a file, with whatever metadata the file carried."""

    name: str
    vectors: Vectors
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None
    extra: dict = field(default_factory=dict)


def shape_of(vectors: Vectors) -> list[int] | dict[str, list[int]]:
    """Shape for messages: `[n, d]`, or `{"clip_l": [n, 768], "clip_g": [n, 1280]}` for SDXL (and SD3)."""
    return {k: list(v.shape) for k, v in vectors.items()} if isinstance(vectors, dict) else list(vectors.shape)


def to_file(vectors: dict[str, Tensor]) -> Vectors:
    """A concept's bank vectors `{encoder: [n, d]}` as files hold them: `[n, d]`, or SDXL's `{"clip_l", "clip_g"}`
    (SD3 adds `t5xxl`)."""
    if set(vectors) == {"text_encoder"}:
        return vectors["text_encoder"]
    return {ENCODER_KEYS[enc]: v for enc, v in vectors.items()}


def from_file(vectors: Vectors, widths: dict[str, int]) -> dict[str, Tensor] | None:
    """A file's vectors as `{encoder: [n, d]}` for a model whose text encoders have `widths`, or None when they
    were made for another model family (an SD1 file on SDXL, a 768-wide one on SD2, ...).

    A model with T5 (SD3) takes any of its parts: a part the file lacks is left out of the prompts that encoder
    reads (as ComfyUI does). SDXL needs both parts (an SD3 file gives it its two CLIP parts); SD1/SD2 files
    hold one tensor.
    """
    if not isinstance(vectors, dict):
        fits = set(widths) == {"text_encoder"} and vectors.shape[1] == widths["text_encoder"]
        return {"text_encoder": vectors} if fits else None
    parts = {enc: vectors[key] for enc, key in ENCODER_KEYS.items() if enc in widths and key in vectors}
    if len(widths) == 1 or not parts or any(v.shape[1] != widths[enc] for enc, v in parts.items()):
        return None
    if "text_encoder_3" not in widths and set(parts) != set(widths):
        return None
    return parts


def _cpu32(vectors: Vectors) -> Vectors:
    if isinstance(vectors, dict):
        return {k: _cpu32(v) for k, v in vectors.items()}
    v = vectors.detach().to("cpu", torch.float32)
    return (v.unsqueeze(0) if v.dim() == 1 else v).contiguous()


def save_embedding(
    path: str | Path,
    vectors: Vectors,
    name: str | None = None,
    step: int | None = None,
    sd_checkpoint: str | None = None,
    sd_checkpoint_name: str | None = None,
) -> Path:
    """Write one concept's vectors; the layout follows the suffix (`.pt`, `.safetensors`, `.bin`).

    `name` defaults to the file stem (what A1111 uses as the prompt word anyway).
    """
    path = Path(path)
    name = name or path.stem
    vectors = _cpu32(vectors)
    if not all(bool(torch.isfinite(v).all()) for v in (vectors.values() if isinstance(vectors, dict) else [vectors])):
        raise ValueError(f"{path}: refusing to write non-finite (NaN/Inf) vectors")
    sdxl = isinstance(vectors, dict)  # SDXL's or SD3's parts
    if sdxl and (not vectors or not set(vectors) <= set(ENCODER_KEYS.values())):
        raise ValueError(f"vectors per encoder need keys among {list(ENCODER_KEYS.values())}, got {sorted(vectors)}")
    suffix = path.suffix.lower()
    fmt = formats.BY_SUFFIX.get(suffix)
    if fmt is None or formats.EMBEDDING not in fmt.writes or fmt.container == formats.IMAGE:
        raise ValueError(f"{path}: unknown embedding format; use {', '.join(formats.exportable(formats.EMBEDDING))}")
    with atomic_path(path) as tmp:
        if suffix == ".safetensors":
            tensors = file_tensors(vectors) if sdxl else {"emb_params": vectors}
            meta = {
                "name": name,
                "step": step,
                "sd_checkpoint": sd_checkpoint,
                "sd_checkpoint_name": sd_checkpoint_name,
            }
            save_file(tensors, tmp, metadata={k: str(v) for k, v in meta.items() if v is not None})
        elif suffix == ".pt":
            if sdxl:  # A1111 reads SDXL/SD3 .pt files only when they hold nothing but tensors
                data = file_tensors(vectors)
            else:
                data = a1111_dict(vectors, name, step, sd_checkpoint, sd_checkpoint_name)
            save_pt(data, tmp)
        elif suffix == ".bin":
            if sdxl:
                raise ValueError("diffusers .bin files hold one encoder; save SDXL/SD3 as .safetensors or .pt")
            save_pt({name: vectors}, tmp)
    return path


def file_tensors(vectors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The tensors of a multi-encoder file: the parts, and the T5 part once more under OneTrainer's key."""
    tensors = dict(vectors)
    if "t5xxl" in tensors:
        tensors["t5"] = tensors["t5xxl"].clone()  # its own storage: safetensors refuses shared tensors
    return tensors


def a1111_dict(vectors: Tensor, name: str, step=None, sd_checkpoint=None, sd_checkpoint_name=None) -> dict:
    """The dict A1111 pickles into `.pt` files (and dumps as JSON into PNGs)."""
    return {
        "string_to_token": {"*": A1111_TOKEN_ID},
        "string_to_param": {"*": vectors},
        "name": name,
        "step": None if step is None else int(step),
        "sd_checkpoint": sd_checkpoint,
        "sd_checkpoint_name": sd_checkpoint_name,
    }


def save_image_embedding(
    path: str | Path,
    preview: Image.Image,
    vectors: Tensor,
    name: str | None = None,
    step: int | None = None,
    sd_checkpoint: str | None = None,
    sd_checkpoint_name: str | None = None,
) -> Path:
    """A1111's "embedding in PNG": `preview` with the vectors in a text chunk and in the pixels."""
    path = Path(path)
    vectors = _cpu32(vectors)
    if isinstance(vectors, dict) or not bool(torch.isfinite(vectors).all()):
        raise ValueError(f"{path}: PNG embeddings hold one finite [n, d] tensor (A1111 cannot embed SDXL pairs)")
    data = a1111_dict(vectors, name or path.stem, step, sd_checkpoint, sd_checkpoint_name)
    return save_png_embedding(path, preview, data, shorthash=sd_checkpoint)


def read_embedding(path: str | Path) -> list[EmbeddingFile]:
    """Every concept in an embedding file (usually one), in float32 on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such embedding file")
    container = formats.format_of(path, formats.EMBEDDING).container
    meta: dict = {}
    try:
        if container == formats.SAFETENSORS:
            try:  # a LoRA (its bundled embedding) may be larger than any embedding file
                lora = loras.is_lora(check_safetensors(path, "lora"))
                if not lora:
                    check_safetensors(path, "embedding")
            except ValueError as e:
                raise UserError(f"{path}: refused: {e}") from None
            with safe_open(path, "pt") as f:
                meta = f.metadata() or {}
                if lora:  # only the bundle is read, not the LoRA's weights
                    bundle = {k: f.get_tensor(k) for k in f.keys() if k.startswith(f"{loras.BUNDLE}.")}  # noqa: SIM118 (a safe_open handle)
            if lora:
                return _bundled(path, bundle, meta)
            data = load_file(path, device="cpu")
        elif container == formats.PICKLE:
            data = load_pickle(path, "embedding")
        else:  # formats.IMAGE
            data = read_png_embedding(path)
            if data is None:
                raise NotAnEmbedding(f"{path}: an image without an embedding in it (no {KEY} chunk, no data blocks)")
            if "name" in data and "string_to_param" in data:  # A1111 names image embeddings by their data
                return [replace(e, name=str(data["name"])) for e in _identify(path, data, meta)]
    except UserError:
        raise
    except Exception as e:
        # pickles report their own errors (io.pickles); this is a damaged safetensors file or image
        raise UserError(
            f"{path}: cannot be read as an embedding ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from None
    return _identify(path, data, meta)


def _bundled(path: Path, data: dict[str, Tensor], meta: dict) -> list[EmbeddingFile]:
    """The embeddings bundled in a LoRA file (A1111's `bundle_emb.<name>.*`, named by `<name>`)."""
    found = loras.bundled_embeddings(data)
    if not found:
        raise NotAnEmbedding(f"{path}: a LoRA without a bundled embedding")
    entries = []
    for name, vectors in found.items():
        data = {"string_to_param": {"*": vectors}} if isinstance(vectors, Tensor) else vectors
        entries += [replace(e, name=name) for e in _identify(path, data, meta)]
    return entries


def _identify(path: Path, data: object, meta: dict) -> list[EmbeddingFile]:
    if not isinstance(data, dict):
        raise UserError(f"{path}: holds a {type(data).__name__}, not an embedding dict")

    def info(key: str) -> str | None:
        value = data.get(key) if key in data else meta.get(key)
        return None if value in (None, "None") or not isinstance(value, str | int) else str(value)

    step = info("step")
    common = dict(
        step=int(step) if step is not None and step.lstrip("-").isdigit() else None,
        sd_checkpoint=info("sd_checkpoint"),
        sd_checkpoint_name=info("sd_checkpoint_name"),
    )

    def entry(name: str, vectors: object) -> EmbeddingFile:
        return EmbeddingFile(name, _checked(path, vectors), **common)

    if "string_to_param" in data:  # A1111 / original TI (a dict, or an nn.ParameterDict's stand-in)
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            count = len(params) if isinstance(params, dict) else type(params).__name__
            raise UserError(f"{path}: string_to_param holds {count} terms; A1111 files hold exactly one")
        return [entry(path.stem, next(iter(params.values())))]
    parts = multi_encoder_parts(data)
    if parts:
        if not all(isinstance(v, Tensor) for v in parts.values()):
            kinds = ", ".join(type(v).__name__ for v in parts.values())
            raise UserError(f"{path}: its {', '.join(parts)} entries must be tensors, not {kinds}")
        vectors = _checked(path, parts)
        if len({v.shape[0] for v in vectors.values()}) != 1:
            raise UserError(f"{path}: its encoders' parts hold different numbers of vectors {shape_of(vectors)}")
        return [EmbeddingFile(path.stem, vectors, **common)]
    if "emb_params" in data:  # kohya
        return [entry(str(meta.get("name") or path.stem), data["emb_params"])]
    tensors = {k: v for k, v in data.items() if isinstance(v, Tensor)}
    if tensors and len(tensors) == len(data):  # diffusers {token: tensor}, one or more tokens
        return [entry(str(k), v) for k, v in tensors.items()]
    raise UserError(
        f"{path}: neither an A1111, diffusers, kohya nor SDXL embedding (keys: {', '.join(map(str, data))[:200]})"
    )


def multi_encoder_parts(data: dict) -> dict:
    """An SDXL/SD3 file's parts `{"clip_l", "clip_g", "t5xxl"}` (any of them; `t5` read as `t5xxl`), or {} for
    a file of another layout. Both CLIP parts, or only keys of the SD3 layout (OneTrainer's `*_out` too)."""
    parts = {k: data[k] for k in SDXL_KEYS if k in data}
    t5 = next((k for k in T5_ALIASES if k in data), None)
    if t5 is not None:
        parts["t5xxl"] = data[t5]
    known = {*SDXL_KEYS, *T5_ALIASES}
    if set(SDXL_KEYS) <= set(parts) or (parts and all(str(k).removesuffix("_out") in known for k in data)):
        return parts
    return {}


def _checked(path: Path, vectors: object) -> Vectors:
    """`vectors` as float32 `[n, d]` (or SDXL's dict of them); a UserError for anything else, NaN/Inf too."""
    if isinstance(vectors, dict):
        return {k: _checked(path, v) for k, v in vectors.items()}
    if not isinstance(vectors, Tensor) or vectors.dim() not in (1, 2) or vectors.numel() == 0:
        what = list(vectors.shape) if isinstance(vectors, Tensor) else type(vectors).__name__
        raise UserError(f"{path}: the vectors are {what}, not a [vectors, width] tensor")
    if vectors.is_complex():
        raise UserError(f"{path}: the vectors are complex numbers, not an embedding")
    if not bool(torch.isfinite(vectors.float()).all()):
        raise UserError(
            f"{path}: the vectors hold non-finite values (NaN/Inf): the file is damaged or came from a diverged "
            "run; use an earlier copy"
        )
    return _cpu32(vectors)


def load_embedding(path: str | Path) -> dict[str, Vectors]:
    """`{name: tensor[n, d]}` for every concept in the file (SDXL: `{name: {"clip_l", "clip_g"}}`)."""
    return {e.name: e.vectors for e in read_embedding(path)}
