"""A1111-style single-file checkpoints (`model.safetensors` / `.ckpt`: SD1.x, SD2.x, SDXL), loaded offline.

diffusers' `from_single_file` converts the original (LDM) key layout, but it needs the diffusers configs of
the model family, which it would download from the hub. We ship those configs (`assets/single_file/`, no
weights), pick one by the checkpoint's text-encoder keys, and pass the CLIP tokenizer built from the local
vocabulary, so nothing is fetched. The checkpoint's A1111 short hash (first 10 hex digits of the file's
sha256) goes into every embedding written from it, as A1111 does.
"""

import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.utils import logging as diffusers_logging
from safetensors import safe_open

from lit_ti.errors import UserError
from lit_ti.io import formats
from lit_ti.io.pickles import load_pickle
from lit_ti.models.backbone import Backbone, built_in, check_prediction_type
from lit_ti.models.tiny import clip_tokenizer

SUFFIXES = formats.readable(formats.MODEL)  # .pt, .safetensors, .ckpt, .pth
# family -> (keys only that family's checkpoints hold, the shipped config folder)
FAMILIES = {
    "sdxl": (("conditioner.embedders.1.model.ln_final.weight",), "sdxl"),
    "sd2": (("cond_stage_model.model.ln_final.weight",), "sd21"),
    "sd1": (
        (
            "cond_stage_model.transformer.text_model.final_layer_norm.weight",
            "cond_stage_model.transformer.final_layer_norm.weight",  # checkpoints saved by old transformers
        ),
        "sd15",
    ),
}
# single files another model config reads: (a key prefix only they hold, that config)
ELSEWHERE = {"SD3/SD3.5": ("model.diffusion_model.joint_blocks.", "model=sd3_single_file")}
# families lit_ti recognises but does not read as single files: (a key prefix only they hold, what to do instead)
NOT_READ = {"Flux": ("model.diffusion_model.double_blocks.", "Flux is not supported yet")}


def short_hash(path: str | Path) -> str:
    """A1111's checkpoint short hash: the first 10 hex digits of the file's sha256."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:10]


def checkpoint_keys(path: Path) -> set[str]:
    """The weight names of a single-file checkpoint (a `.ckpt`'s `state_dict`, as A1111 nests it).

    A `.safetensors` file gives them from its header; a pickle has to be read whole (and diffusers reads it
    again to convert it), one reason to prefer `.safetensors`.
    """
    if formats.BY_SUFFIX[path.suffix.lower()].container == formats.SAFETENSORS:
        try:
            with safe_open(path, framework="pt") as f:
                return set(f.keys())
        except Exception as e:
            raise UserError(f"model.path: {path} is not a readable safetensors file ({e})") from None
    state = load_pickle(path, "checkpoint")
    while isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"model.path: {path} holds no state dict")
    return set(state)


def detect_family(keys: set[str], path: Path) -> str:
    """`sd1`, `sd2` or `sdxl`, from which text encoder the checkpoint carries."""
    for family, (names, _) in FAMILIES.items():
        if any(name in keys for name in names):
            return family
    if "conditioner.embedders.0.model.ln_final.weight" in keys:
        raise UserError(
            f"model.path: {path} is an SDXL refiner, which has no CLIP-L encoder to train; use a base model"
        )
    for family, (prefix, config) in ELSEWHERE.items():
        if any(key.startswith(prefix) for key in keys):
            raise UserError(f"model.path: {path} is a single file of {family}; load it with {config}")
    for family, (prefix, instead) in NOT_READ.items():
        if any(key.startswith(prefix) for key in keys):
            raise UserError(f"model.path: {path} is a {family} single file, which lit_ti does not read; {instead}")
    raise UserError(
        f"model.path: {path} is not an SD1.x/SD2.x/SDXL checkpoint (no text encoder found among its "
        f"{len(keys)} weights); for a diffusers folder use model=diffusers"
    )


@dataclass
class SingleFile:
    """One `.safetensors` / `.ckpt` file as A1111 and ComfyUI use them.

    Args:
        path: the checkpoint file.
        config: a diffusers folder whose `model_index.json` and component configs describe this checkpoint
            (any diffusers copy of the same architecture; weights in it are ignored). null = the configs we
            ship for the detected family: SD1.5, SD2.1 (768 px, v-prediction) or SDXL base.
        prediction_type: `epsilon` or `v_prediction`; null = the config's. SD2 checkpoints do not say which
            they are: SD2-base (512 px) needs `epsilon` (and data.resolution=512).
    """

    path: str
    config: str | None = None
    prediction_type: str | None = None

    def load(self, dtype: torch.dtype = torch.float32) -> Backbone:
        check_prediction_type(self.prediction_type, "model.prediction_type")
        path = Path(self.path).expanduser()
        if not path.is_file():
            raise UserError(f"model.path: {path} is not a file; point it at a .safetensors or .ckpt checkpoint")
        if path.suffix.lower() not in SUFFIXES:
            raise UserError(f"model.path: {path} is not a checkpoint file ({', '.join(SUFFIXES)})")
        family = detect_family(checkpoint_keys(path), path)
        config = Path(self.config).expanduser() if self.config else shipped_config(family)
        if not (config / "model_index.json").is_file():
            raise UserError(f"model.config: {config} has no model_index.json; use a diffusers model folder")
        pipeline_class = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
        # OpenCLIP encoders (SD2's, SDXL's second) pad with "!"; CLIP-L with its end token
        if family == "sdxl":
            tokenizers = {"tokenizer": clip_tokenizer(), "tokenizer_2": clip_tokenizer(pad="!")}
        else:
            tokenizers = {"tokenizer": clip_tokenizer(pad="!" if family == "sd2" else "<|endoftext|>")}
        common = dict(config=str(config), local_files_only=True)
        verbosity, bars = diffusers_logging.get_verbosity(), diffusers_logging.is_progress_bar_enabled()
        diffusers_logging.set_verbosity_error()  # no "no safety checker" notices in training logs
        diffusers_logging.disable_progress_bar()  # nor a "Loading pipeline components" bar per run
        try:
            # The VAE stays fp32 (see DiffusersFolder), read from the file as it is: loading it in the
            # precision's dtype and casting back up would keep bf16's 8-bit mantissa.
            vae = AutoencoderKL.from_single_file(str(path), subfolder="vae", torch_dtype=torch.float32, **common)
            with built_in(dtype):  # UNet and text encoders built in the precision's dtype, not cast from fp32
                pipe = pipeline_class.from_single_file(
                    str(path),
                    vae=vae,
                    torch_dtype=dtype,
                    **common,
                    **tokenizers,
                    **({} if family == "sdxl" else {"safety_checker": None, "feature_extractor": None}),
                )
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise UserError(
                f"model.path: could not load {path} as {family} with the configs in {config}: "
                f"{str(e).splitlines()[0][:300]}"
            ) from None
        finally:
            diffusers_logging.set_verbosity(verbosity)
            if bars:
                diffusers_logging.enable_progress_bar()
        overrides = {"prediction_type": self.prediction_type} if self.prediction_type else {}
        scheduler = DDPMScheduler.from_config(pipe.scheduler.config, **overrides)
        encoder_2 = getattr(pipe, "text_encoder_2", None)
        return Backbone(
            unet=pipe.unet,
            vae=pipe.vae,
            text_encoder=pipe.text_encoder,
            tokenizer=pipe.tokenizer,
            scheduler=scheduler,
            name=path.stem,
            checkpoint_hash=short_hash(path),
            text_encoder_2=encoder_2,
            tokenizer_2=getattr(pipe, "tokenizer_2", None),
        ).freeze()


def shipped_config(family: str) -> Path:
    return shipped_folder(FAMILIES[family][1])


def shipped_folder(name: str) -> Path:
    """One of the diffusers config folders shipped in `assets/single_file/` (see its README)."""
    return Path(str(resources.files("lit_ti").joinpath("assets", "single_file", name)))
