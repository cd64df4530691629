"""SD3 / SD3.5 single files (`sd3.5_large.safetensors`, `sd3.5_medium.safetensors`, `sd3_medium_incl_clips*.safetensors`),
loaded offline, with their text encoders inside the file or given as ComfyUI's separate files.

The file holds the MMDiT (`model.diffusion_model.*`) and the VAE (`first_stage_model.*`), and maybe the text
encoders (`text_encoders.clip_l.transformer.*`, `text_encoders.clip_g.transformer.*`,
`text_encoders.t5xxl.transformer.*`). ComfyUI's `clip_l.safetensors`, `clip_g.safetensors` and
`t5xxl_fp16.safetensors` are the same encoders in transformers' key layout without that prefix: we put the
prefix on and hand one state dict to diffusers' single-file converters, which do all the renaming. The
diffusers configs come from `assets/single_file/` (SD3 medium, SD3.5 medium, SD3.5 large), picked by
diffusers' own `infer_diffusers_model_type`; CLIP tokenizers from the local vocabulary. T5's SentencePiece
vocabulary is not in any of these files: T5 needs `t5_tokenizer`, a tokenizer folder (`tokenizer_3/` of any
SD3 diffusers copy).
"""

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from diffusers.loaders import single_file_utils as sfu
from diffusers.utils import logging as diffusers_logging
from lightning.pytorch.utilities import rank_zero_info
from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

from lit_ti.errors import UserError
from lit_ti.models.backbone import Backbone, built_in
from lit_ti.models.single_file import SUFFIXES, checkpoint_keys, shipped_folder, short_hash
from lit_ti.models.tiny import clip_tokenizer

MMDIT = "model.diffusion_model."
VAE = "first_stage_model."
# config key -> (where the encoder sits in an SD3 single file, the diffusers subfolder, the model class, what it is)
ENCODERS = {
    "clip_l": ("text_encoders.clip_l.transformer.", "text_encoder", CLIPTextModelWithProjection, "CLIP-L"),
    "clip_g": ("text_encoders.clip_g.transformer.", "text_encoder_2", CLIPTextModelWithProjection, "CLIP-G"),
    "t5": ("text_encoders.t5xxl.transformer.", "text_encoder_3", T5EncoderModel, "T5-XXL"),
}
# a weight every file of that encoder holds, under the names in ENCODERS' prefix
TELLTALE = {"clip_l": "text_model.embeddings.position_embedding.weight", "t5": "shared.weight"}
TELLTALE["clip_g"] = TELLTALE["clip_l"]
# diffusers' model type -> the shipped config folder
SHIPPED = {"sd3": "sd3_medium", "sd35_medium": "sd35_medium", "sd35_large": "sd35_large"}


@dataclass
class SD3SingleFile:
    """An SD3 / SD3.5 single-file checkpoint as A1111 and ComfyUI use it.

    Args:
        path: the checkpoint (MMDiT + VAE, maybe the text encoders too).
        config: a diffusers SD3 folder describing it (only its JSON files are read); null = the shipped
            configs of SD3 medium, SD3.5 medium or SD3.5 large, detected from the file.
        clip_l: ComfyUI's `clip_l.safetensors` (transformers layout); null = the encoder inside `path`.
        clip_g: ComfyUI's `clip_g.safetensors`; null = the encoder inside `path`.
        t5: `t5xxl_fp16.safetensors`; null (or true) = the T5 inside `path` if it holds one; false = run
            without T5 (its part of the prompt is zeros, as SD3 allows).
        t5_tokenizer: a folder with T5's tokenizer files (`tokenizer_3/` of an SD3 diffusers copy, or
            google/t5-v1_1-xxl's); T5 runs only with it.
    """

    path: str
    config: str | None = None
    clip_l: str | None = None
    clip_g: str | None = None
    t5: str | bool | None = None
    t5_tokenizer: str | None = None

    def load(self, dtype: torch.dtype = torch.float32) -> Backbone:
        path = checked_file(self.path, "model.path")
        keys = checkpoint_keys(path)
        if not any(k.startswith(MMDIT + "joint_blocks.") for k in keys):
            raise UserError(
                f"model.path: {path} is not an SD3/SD3.5 checkpoint (no {MMDIT}joint_blocks.*); "
                "SD1.x/SD2.x/SDXL files load with model=single_file"
            )
        if not any(k.startswith(VAE) for k in keys):
            raise UserError(f"model.path: {path} holds no VAE ({VAE}*); use the full SD3 checkpoint")
        checkpoint = read(path, "model.path")
        for key in ENCODERS:
            source = getattr(self, key)
            if not isinstance(source, bool | None):  # true = as null: the encoder inside the file
                add_encoder_file(checkpoint, key, checked_file(source, f"model.{key}"))
        for key in ("clip_l", "clip_g"):
            if ENCODERS[key][0] + TELLTALE[key] not in checkpoint:
                raise UserError(
                    f"model.{key}: {path} holds no {ENCODERS[key][3]} text encoder; give its file, e.g. "
                    f"model.{key}=/models/clip/{key}.safetensors (ComfyUI's text encoder files)"
                )
        config = self.config_folder(checkpoint, path)
        check_architecture(checkpoint, config)
        tokenizer_3 = self.t5_tokenizer_or_none(checkpoint)
        with quiet_diffusers():
            parts = load_parts(checkpoint, config, dtype, with_t5=tokenizer_3 is not None)
        if tokenizer_3 is not None and len(tokenizer_3) > parts["text_encoder_3"].shared.num_embeddings:
            raise UserError(
                f"model.t5_tokenizer: {self.t5_tokenizer} has {len(tokenizer_3)} tokens, more than this T5's "
                f"{parts['text_encoder_3'].shared.num_embeddings} rows; use the model's own T5 tokenizer"
            )
        return Backbone(
            **parts,
            tokenizer=clip_tokenizer(),  # CLIP-L pads with its end token, OpenCLIP bigG with "!" (as SDXL)
            tokenizer_2=clip_tokenizer(pad="!"),
            tokenizer_3=tokenizer_3,
            scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(config, subfolder="scheduler"),
            name=path.stem,
            checkpoint_hash=short_hash(path),
        ).freeze()

    def config_folder(self, checkpoint: dict, path: Path) -> Path:
        if self.config:
            config = Path(self.config).expanduser()
            if not (config / "transformer" / "config.json").is_file():
                raise UserError(f"model.config: {config} has no transformer/config.json; use a diffusers SD3 folder")
            return config
        try:
            model_type = sfu.infer_diffusers_model_type(checkpoint)
        except (KeyError, UnboundLocalError):  # diffusers leaves the type unset for an SD3 of unknown size
            model_type = None
        if model_type not in SHIPPED:
            depth = len(joint_blocks(checkpoint))
            raise UserError(
                f"model.config: {path} is an SD3-layout MMDiT of {depth} blocks that matches none of the shipped "
                "configs (SD3 medium, SD3.5 medium, SD3.5 large); give model.config=<its diffusers folder>"
            )
        return shipped_folder(SHIPPED[model_type])

    def t5_tokenizer_or_none(self, checkpoint: dict):
        """T5's tokenizer when T5 is to run, else None (said in one line)."""
        has_t5 = sfu.is_t5_in_single_file(checkpoint)
        if self.t5 is False or not has_t5:
            why = "model.t5=false" if self.t5 is False else "no T5 in model.path and model.t5 is not set"
            rank_zero_info(f"[lit_ti] running without T5 ({why}); its part of every prompt is zeros, as SD3 allows")
            return None
        if self.t5_tokenizer is None:
            if not isinstance(self.t5, bool | None):  # a T5 file given on purpose: its tokenizer is not optional
                raise UserError(
                    "model.t5_tokenizer: T5 from model.t5 needs its tokenizer; point model.t5_tokenizer at a "
                    "tokenizer_3/ folder of any SD3 diffusers copy (or set model.t5=false)"
                )
            rank_zero_info(
                "[lit_ti] running without T5: model.t5_tokenizer is not set (the file's T5 needs its tokenizer: "
                "a tokenizer_3/ folder of any SD3 diffusers copy)"
            )
            return None
        folder = Path(self.t5_tokenizer).expanduser()
        try:
            return AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, TypeError) as e:
            raise UserError(
                f"model.t5_tokenizer: {folder} holds no T5 tokenizer ({str(e).splitlines()[0][:200]}); use a "
                "tokenizer_3/ folder of an SD3 diffusers copy"
            ) from None


def checked_file(value, key: str) -> Path:
    path = Path(str(value)).expanduser()
    if not path.is_file():
        raise UserError(f"{key}: {path} is not a file; point it at a .safetensors checkpoint")
    if path.suffix.lower() not in SUFFIXES:
        raise UserError(f"{key}: {path} is not a checkpoint file ({', '.join(SUFFIXES)})")
    return path


def read(path: Path, key: str) -> dict[str, torch.Tensor]:
    try:
        state = sfu.load_single_file_checkpoint(str(path), local_files_only=True)
    except Exception as e:  # safetensors and torch raise many types for a damaged file
        raise UserError(f"{key}: {path} is not a readable checkpoint ({str(e).splitlines()[0][:200]})") from None
    while isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"{key}: {path} holds no state dict")
    return state


def add_encoder_file(checkpoint: dict, key: str, path: Path) -> None:
    """Put a separate encoder file's weights where an SD3 single file holds them, replacing those it held.

    Accepted layouts: transformers' (`text_model.*`, `text_projection.weight`; T5's `encoder.*`, `shared.*`),
    that under a `transformer.` prefix, CLIP without `text_model.` (transformers 5), or the SD3 file's own.
    """
    prefix = ENCODERS[key][0]
    state = {}
    for name, tensor in read(path, f"model.{key}").items():
        name = name.removeprefix(prefix).removeprefix("transformer.")
        if key != "t5" and not name.startswith(("text_model.", "text_projection", "logit_scale")):
            name = "text_model." + name
        state[prefix + name] = tensor
    if prefix + TELLTALE[key] not in state:
        raise UserError(
            f"model.{key}: {path} is not a {ENCODERS[key][3]} text encoder in transformers' layout "
            f"(no {TELLTALE[key]}); use ComfyUI's {key} file"
        )
    for name in [n for n in checkpoint if n.startswith(prefix)]:
        del checkpoint[name]
    checkpoint.update(state)


def joint_blocks(checkpoint: dict) -> set[int]:
    return {int(k[len(MMDIT) :].split(".")[1]) for k in checkpoint if k.startswith(MMDIT + "joint_blocks.")}


def check_architecture(checkpoint: dict, config: Path) -> None:
    """One line when the config describes another MMDiT than the file's (diffusers would fail deep inside)."""
    cfg = SD3Transformer2DModel.load_config(config, subfolder="transformer")
    dual = {int(k[len(MMDIT) :].split(".")[1]) for k in checkpoint if k.startswith(MMDIT) and ".attn2." in k}
    pos = checkpoint.get(MMDIT + "pos_embed")
    found = {
        "num_layers": len(joint_blocks(checkpoint)),
        "dual_attention_layers": sorted(dual),
        "pos_embed_max_size": None if pos is None else round(pos.shape[1] ** 0.5),
        "width": checkpoint[MMDIT + "context_embedder.weight"].shape[0],
    }
    want = {
        "num_layers": cfg["num_layers"],
        "dual_attention_layers": sorted(cfg.get("dual_attention_layers") or ()),
        "pos_embed_max_size": cfg.get("pos_embed_max_size"),
        "width": cfg["num_attention_heads"] * cfg["attention_head_dim"],
    }
    wrong = [f"{k} {found[k]} (config: {want[k]})" for k in want if found[k] != want[k]]
    if wrong:
        raise UserError(f"model.config: {config} describes another MMDiT than the checkpoint's: {', '.join(wrong)}")


def load_parts(checkpoint: dict, config: Path, dtype: torch.dtype, with_t5: bool) -> dict:
    """The Backbone's modules, converted by diffusers' single-file code (which pops the MMDiT's weights)."""
    common = dict(config=str(config), local_files_only=True)
    try:
        with built_in(dtype):  # never built in fp32 first
            transformer = SD3Transformer2DModel.from_single_file(
                checkpoint, subfolder="transformer", torch_dtype=dtype, **common
            )
        # fp32 VAE, read as stored: it only caches latents and decodes previews (see DiffusersFolder)
        vae = AutoencoderKL.from_single_file(checkpoint, subfolder="vae", torch_dtype=torch.float32, **common)
        encoders = {}
        for key, (_, subfolder, cls, _) in ENCODERS.items():
            if key == "t5" and not with_t5:
                continue
            create = (
                sfu.create_diffusers_t5_model_from_checkpoint
                if key == "t5"
                else sfu.create_diffusers_clip_model_from_ldm
            )
            encoders[subfolder] = create(cls, checkpoint, subfolder=subfolder, torch_dtype=dtype, **common)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise UserError(
            f"model.path: could not load the SD3 checkpoint with the configs in {config}: "
            f"{str(e).splitlines()[0][:300]}"
        ) from None
    if "text_encoder_3" in encoders:
        encoders["text_encoder_3"].tie_weights()  # files often hold `shared` only, not its tied copy
    for name, module in (("transformer", transformer), ("vae", vae), *encoders.items()):
        missing = [n for n, p in module.named_parameters() if p.is_meta]
        if missing:
            raise UserError(f"model.path: the checkpoint lacks {len(missing)} {name} weights, e.g. {missing[0]}")
    return {"unet": transformer, "vae": vae, "text_encoder_3": None, **encoders}


@contextlib.contextmanager
def quiet_diffusers():
    """diffusers' single-file loader logs a line per component; training logs stay clean."""
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)
