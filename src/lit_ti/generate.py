"""`python generate.py prompt=...`: images from a backbone with embeddings and a hypernetwork.

Embeddings come from `embeddings_dir` (every file `io.formats` lists as an embedding: `.pt`, `.safetensors`,
`.bin`, `.ckpt` or an A1111 image) and `embeddings`; a concept is used wherever its name appears in the prompt or the negative prompt, so several
concepts share a prompt and a DreamArtist pair works as `prompt="... <name> ..." negative_prompt="<name>-neg"`.
A PNG is decoded only when its name (its text chunk's, else its file stem) is in a prompt. Files that act inside
the UNet with a strength (a hypernetwork, a LoRA with its bundled embedding) are the `ADAPTERS` table's rows. Every setting is
checked before the model loads, and a run whose latents turn NaN/Inf stops with one line instead of writing
black images.
Prompts are encoded exactly as in training (`PromptEncoder`: multi-vector names, clip skip, SDXL's two encoders) and
handed to a diffusers pipeline built around the same modules. Each image is saved as a PNG carrying A1111's
`parameters` text, plus a grid when there is more than one.
"""

import math
import random
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from diffusers.utils import make_image_grid
from hydra.utils import instantiate
from omegaconf import DictConfig
from PIL import PngImagePlugin

from lit_ti import io
from lit_ti.callbacks.preview import SAMPLERS
from lit_ti.errors import UserError
from lit_ti.io import formats
from lit_ti.io.atomic import atomic_path
from lit_ti.io.embeddings import from_file, shape_of
from lit_ti.io.png_embeddings import NotAnEmbedding, png_name
from lit_ti.models import weight_dtype
from lit_ti.modules import lora
from lit_ti.modules.embedding_bank import EmbeddingBank
from lit_ti.modules.text_conditioning import PromptEncoder

SAMPLER_NAMES = {"ddim": "DDIM", "euler": "Euler", "euler_a": "Euler a", "dpmpp_2m": "DPM++ 2M"}  # A1111's


def apply_hypernetwork(backbone, path: Path, strength: float) -> Callable[[], None]:
    from lit_ti.methods.hypernetwork import attach_file
    from lit_ti.modules.hypernetwork import detach

    _, original = attach_file(backbone.unet, path, strength)
    return lambda: detach(backbone.unet, original)


def apply_lora(backbone, path: Path, strength: float) -> Callable[[], None]:
    """A kohya/A1111 LoRA (lit_ti's `<name>-lora.safetensors`) on the UNet and text encoders; its bundled
    embedding reaches the prompt through `embedding_files`."""
    from lit_ti.modules import lora

    models = {"unet": backbone.unet, **{enc: te for enc, (_, te) in backbone.text_encoders.items()}}
    try:
        return lora.attach_file(models, io.read_lora(path), backbone.is_sdxl, strength)
    except ValueError as e:
        raise UserError(f"lora: {path}: {e}; it was trained for another model family") from None


@dataclass(frozen=True)
class Adapter:
    """A trained file applied inside the frozen UNet, set by its config key (a path or null)."""

    kind: str  # its `io.formats` kind
    strength_key: str  # the config key of its multiplier
    a1111_name: str  # its key in A1111's `parameters` text (`<name>` and `<name> strength`)
    apply: Callable[..., Callable[[], None]]  # (backbone, path, strength) -> undo


ADAPTERS = {
    "hypernetwork": Adapter(formats.HYPERNETWORK, "hypernetwork_strength", "Hypernet", apply_hypernetwork),
    "lora": Adapter(formats.LORA, "lora_strength", "Lora", apply_lora),
}


def embedding_files(directory: str | None, files: list[str]) -> list[Path]:
    paths = [Path(f).expanduser() for f in files]
    if directory:
        folder = Path(directory).expanduser()
        if not folder.is_dir():
            raise UserError(f"embeddings_dir: {folder} is not a folder of embedding files")
        readable = formats.readable(formats.EMBEDDING)  # exactly what io.read_embedding reads
        paths += sorted(p for p in folder.iterdir() if p.suffix.lower() in readable and not p.name.startswith("."))
    return paths


def load_concepts(paths: list[Path], text: str, backbone) -> EmbeddingBank:
    """A bank of the concepts named in `text`, skipping (with a warning) files for another model."""
    widths = {enc: te.get_input_embeddings().weight.shape[1] for enc, (_, te) in backbone.text_encoders.items()}
    bank = EmbeddingBank()

    def named(name: str) -> bool:
        return re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text, re.IGNORECASE) is not None

    for path in paths:
        image = formats.is_image(path)
        name = (png_name(path) or path.stem) if image else None  # no pixels decoded for this
        if image and not named(name):
            continue
        try:
            entries = io.read_embedding(path)
        except NotAnEmbedding:
            continue  # a plain picture in the folder, as A1111 skips it
        except UserError as e:
            raise UserError(f"embeddings: {e}") from None
        for entry in entries:
            entry = replace(entry, name=name) if image else entry
            if not named(entry.name):
                continue
            vectors = from_file(entry.vectors, widths)
            if vectors is None:
                warnings.warn(
                    f"{path}: skipped '{entry.name}', vectors {shape_of(entry.vectors)} do not fit this model's "
                    f"text encoders (widths {list(widths.values())})",
                    stacklevel=2,
                )
                continue
            ours, theirs = backbone.checkpoint_hash or backbone.name, entry.sd_checkpoint or entry.sd_checkpoint_name
            if theirs and ours and theirs not in (backbone.checkpoint_hash, backbone.name):
                warnings.warn(
                    f"{path}: '{entry.name}' was trained on {theirs}, this model is {ours}; it may look off",
                    stacklevel=2,
                )
            if entry.name in bank.names:  # the same concept in two formats is fine; two different ones are not
                if all(torch.equal(bank.get(entry.name)[k].detach(), v) for k, v in vectors.items()):
                    continue
                raise UserError(f"embeddings: two different files define '{entry.name}'; keep one ({path})")
            bank.add(entry.name, vectors)
    return bank


def parameters(cfg: DictConfig, seed: int, size: int, backbone, applied: dict[str, Path]) -> str:
    """A1111's `parameters` PNG text: prompt, negative prompt, then `Key: value` settings."""
    settings = {
        "Steps": cfg.steps,
        "Sampler": "Euler" if backbone.is_sd3 else SAMPLER_NAMES[cfg.sampler],  # SD3 samples the flow with Euler
        "CFG scale": cfg.cfg_scale,
        "Seed": seed,
        "Size": f"{size}x{size}",
        "Model hash": backbone.checkpoint_hash,
        "Model": backbone.name,
        "Clip skip": cfg.clip_skip if cfg.clip_skip > 1 else None,
    }
    for key, path in applied.items():
        adapter = ADAPTERS[key]
        settings |= {adapter.a1111_name: path.stem, f"{adapter.a1111_name} strength": cfg[adapter.strength_key]}
    if applied.get("lora") and cfg.lora_max_timestep is not None:
        settings["Lora max timestep"] = cfg.lora_max_timestep
    lines = [cfg.prompt] + ([f"Negative prompt: {cfg.negative_prompt}"] if cfg.negative_prompt else [])
    return "\n".join([*lines, ", ".join(f"{k}: {v}" for k, v in settings.items() if v is not None)])


WHOLE = {  # key: (lowest, highest); A1111's UI ranges, widened
    "steps": (1, 1000),
    "batch_size": (1, 64),
    "n_iter": (1, 1000),
    "clip_skip": (1, 12),
    "seed": (-1, 2**32 - 1),
}
NUMBER = {"cfg_scale": (0.0, 100.0), **{a.strength_key: (-10.0, 10.0) for a in ADAPTERS.values()}}
PRECISIONS = ("32", "bf16", "16")


def check_settings(cfg: DictConfig) -> torch.device:
    """Every setting checked before anything loads: one UserError naming the key; the device to use."""
    for key, (lo, hi) in WHOLE.items():
        value = cfg[key]
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            raise UserError(f"{key}={value!r}: a whole number from {lo} to {hi}")
    for key, (lo, hi) in NUMBER.items():
        value = cfg[key]
        if (
            not isinstance(value, int | float)
            or isinstance(value, bool)
            or not (math.isfinite(value) and lo <= value <= hi)
        ):
            raise UserError(f"{key}={value!r}: a number from {lo} to {hi}")
    size = cfg.size
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or not 8 <= size <= 4096 or size % 8):
        raise UserError(f"size={size!r}: null (the model's size) or a multiple of 8 from 8 to 4096 pixels")
    if cfg.sampler not in SAMPLERS:
        raise UserError(f"sampler={cfg.sampler!r}: use one of {', '.join(SAMPLERS)}")
    if str(cfg.precision) not in PRECISIONS:
        raise UserError(f"precision={cfg.precision!r}: use one of {', '.join(PRECISIONS)}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(cfg.device)):
        raise UserError(f"device={cfg.device!r}: use auto, cpu, cuda or cuda:<index>")
    cuda = torch.cuda.is_available()
    if str(cfg.device).startswith("cuda") and not cuda:
        raise UserError(f"device={cfg.device}: no CUDA device here; use device=cpu or auto")
    device = torch.device(cfg.device if cfg.device != "auto" else "cuda" if cuda else "cpu")
    if str(cfg.precision) == "16" and device.type == "cpu":
        raise UserError("precision=16: float16 runs on a GPU only; use precision=32 or bf16 on the CPU")
    gate = cfg.lora_max_timestep
    if gate is not None and (not isinstance(gate, int) or isinstance(gate, bool) or not 1 <= gate <= 10_000):
        raise UserError(
            f"lora_max_timestep={gate!r}: a whole timestep from 1 to 10000 (SD has 1000), or null for every step"
        )
    if gate is not None and not cfg.lora:
        raise UserError(f"lora_max_timestep={gate}: there is no LoRA to gate; add lora=<file>")
    for key, adapter in ADAPTERS.items():
        if cfg[key] and not Path(str(cfg[key])).expanduser().is_file():
            raise UserError(f"{key}={cfg[key]}: no such file")
        if cfg[key]:
            try:
                formats.format_of(Path(str(cfg[key])).expanduser(), adapter.kind)
            except UserError as e:
                raise UserError(f"{key}: {e}") from None
    return device


def check_finite(pipe, step: int, timestep, tensors: dict) -> dict:
    """A diffusers step-end callback: stops the run (one line) as soon as the latents are NaN/Inf."""
    if not bool(torch.isfinite(tensors["latents"]).all()):
        raise UserError(
            f"the latents turned non-finite (NaN/Inf) at step {step + 1}: an embedding or the hypernetwork "
            "overflows this model, or the precision is too low; try precision=32, a lower cfg_scale or "
            "hypernetwork_strength"
        )
    return tensors


@torch.no_grad()
def run(cfg: DictConfig) -> list[Path]:
    device = check_settings(cfg)
    backbone = instantiate(cfg.model).load(weight_dtype(cfg.precision))
    for module in backbone.frozen:
        module.to(device)
    size = cfg.size or backbone.resolution
    files = embedding_files(cfg.embeddings_dir, list(cfg.embeddings))
    files += [Path(cfg.lora).expanduser()] if cfg.lora else []  # its bundled embedding (A1111's bundle_emb)
    bank = load_concepts(files, f"{cfg.prompt}\n{cfg.negative_prompt}", backbone).to(device)
    encoder = PromptEncoder(backbone, bank, cfg.clip_skip)

    def embed(prompt: str, negative: str, n: int) -> dict:
        pos, neg = (encoder([text] * n, device).to(backbone.unet.dtype) for text in (prompt, negative))
        pooled = (
            {}
            if pos.pooled is None
            else {"pooled_prompt_embeds": pos.pooled, "negative_pooled_prompt_embeds": neg.pooled}
        )
        return {"prompt_embeds": pos.states, "negative_prompt_embeds": neg.states, **pooled}

    applied = {key: Path(cfg[key]).expanduser() for key in ADAPTERS if cfg[key]}
    pipe = backbone.pipeline(backbone.sampler(SAMPLERS[cfg.sampler]))
    seed = cfg.seed if cfg.seed >= 0 else random.randrange(2**32)
    out, images, written, undo = Path(cfg.out_dir), [], [], []
    try:
        for key, path in applied.items():
            undo.append(ADAPTERS[key].apply(backbone, path, cfg[ADAPTERS[key].strength_key]))
        for it in range(cfg.n_iter):
            seeds = [seed + it * cfg.batch_size + i for i in range(cfg.batch_size)]
            with lora.below_timestep(backbone.unet, cfg.lora_max_timestep):
                batch = pipe(
                    **embed(cfg.prompt, cfg.negative_prompt, len(seeds)),
                    height=size,
                    width=size,
                    num_inference_steps=cfg.steps,
                    guidance_scale=cfg.cfg_scale,
                    generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
                    output_type="np",
                    callback_on_step_end=check_finite,
                    callback_on_step_end_tensor_inputs=["latents"],
                ).images  # [b, h, w, 3] in [0, 1]
            if not np.isfinite(batch).all():  # the VAE can overflow where the latents did not
                raise UserError("the decoded images are non-finite (NaN/Inf); try precision=32")
            for s, image in zip(seeds, pipe.numpy_to_pil(batch)):
                info = PngImagePlugin.PngInfo()
                info.add_text("parameters", parameters(cfg, s, size, backbone, applied))
                path = out / f"{len(written):05d}-{s}.png"
                with atomic_path(path) as tmp:
                    image.save(tmp, format="PNG", pnginfo=info)
                written.append(path)
                images.append(image)
    finally:
        for restore in reversed(undo):
            restore()
    if len(images) > 1:
        with atomic_path(out / "grid.png") as tmp:
            make_image_grid(images, rows=cfg.n_iter, cols=cfg.batch_size).save(tmp, format="PNG")
    print(
        f"[lit_ti] {len(written)} image(s) in {out}"
        + (f"; concepts used: {', '.join(bank.names)}" if bank.names else "")
    )
    return written
