"""Frozen Stable Diffusion components and how to load them from a local diffusers folder.

A *spec* (e.g. `DiffusersFolder`) is a small dataclass that Hydra instantiates at config time; nothing
loads until `spec.load(dtype)` is called from the method's `configure_model`.
"""

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    FlowMatchEulerDiscreteScheduler,
    SchedulerMixin,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    PreTrainedTokenizerBase,
    T5EncoderModel,
)
from transformers.utils import logging as hf_logging

from lit_ti.errors import UserError

PREDICTION_TYPES = ("epsilon", "v_prediction")
SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclass
class Backbone:
    """Loaded, frozen SD1.x/SD2.x/SDXL/SD3 components.

    `text_encoders` maps an encoder key (the diffusers attribute name) to (tokenizer, encoder); SDXL adds
    `text_encoder_2`, SD3 also `text_encoder_3` (T5, when loaded), and everything keyed by encoder (embedding
    bank, files) follows that key. `unet` is the denoiser: SD3's is an MMDiT (`SD3Transformer2DModel`), trained
    by flow matching (its scheduler is a `FlowMatchEulerDiscreteScheduler`).
    """

    unet: UNet2DConditionModel | SD3Transformer2DModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDPMScheduler  # the training noise schedule; previews build their sampler from its config
    name: str  # recorded in embedding files as sd_checkpoint_name
    checkpoint_hash: str | None = None  # A1111 short hash when loaded from a single file
    text_encoder_2: CLIPTextModelWithProjection | None = None  # SDXL's / SD3's OpenCLIP bigG encoder
    tokenizer_2: CLIPTokenizer | None = None
    text_encoder_3: T5EncoderModel | None = None  # SD3's T5 (None: SD3 runs without it)
    tokenizer_3: PreTrainedTokenizerBase | None = None

    @property
    def is_sd3(self) -> bool:
        return isinstance(self.unet, SD3Transformer2DModel)

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None and not self.is_sd3

    @property
    def text_encoders(self) -> dict[str, tuple[CLIPTokenizer, CLIPTextModel]]:
        encoders = {"text_encoder": (self.tokenizer, self.text_encoder)}
        if self.text_encoder_2 is not None:
            encoders["text_encoder_2"] = (self.tokenizer_2, self.text_encoder_2)
        if self.text_encoder_3 is not None:
            encoders["text_encoder_3"] = (self.tokenizer_3, self.text_encoder_3)
        return encoders

    def sampler(self, scheduler_class: type[SchedulerMixin]) -> SchedulerMixin:
        """A sampler of `scheduler_class` for this model; flow-matching models (SD3) have one sampler, Euler
        on the flow, whatever the class asked for."""
        if self.is_sd3:
            return FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config)
        return scheduler_class.from_config(self.scheduler.config)

    @property
    def frozen(self) -> list[torch.nn.Module]:
        return [self.unet, self.vae, *(encoder for _, encoder in self.text_encoders.values())]

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        """The image size the UNet was built for (its latent sample size × the VAE factor)."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    def pipeline(self, scheduler: SchedulerMixin | None = None) -> StableDiffusionPipeline:
        """A diffusers pipeline around these very modules (no copy, no reload), for sampling.

        It decodes one image at a time (the VAE's slicing): the decoder's fp32 activations, not the UNet's, set
        the peak of a several-image preview or batch. SD1.5 shapes at 512 px on a CPU: 4 images took 3.2 GiB
        above the model, 1.1 GiB sliced, 1.2 GiB for one image alone.
        """
        self.vae.enable_slicing()
        if self.is_sd3:
            pipe = StableDiffusion3Pipeline(
                transformer=self.unet,
                scheduler=scheduler or self.scheduler,
                vae=self.vae,
                text_encoder=self.text_encoder,
                tokenizer=self.tokenizer,
                text_encoder_2=self.text_encoder_2,
                tokenizer_2=self.tokenizer_2,
                text_encoder_3=self.text_encoder_3,
                tokenizer_3=self.tokenizer_3,
            )
            pipe.set_progress_bar_config(disable=True)
            return pipe
        if self.is_sdxl:
            pipe = StableDiffusionXLPipeline(
                vae=self.vae,
                text_encoder=self.text_encoder,
                text_encoder_2=self.text_encoder_2,
                tokenizer=self.tokenizer,
                tokenizer_2=self.tokenizer_2,
                unet=self.unet,
                scheduler=scheduler or self.scheduler,
            )
            pipe.set_progress_bar_config(disable=True)
            return pipe
        pipe = StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=scheduler or self.scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def freeze(self) -> "Backbone":
        for module in self.frozen:
            module.requires_grad_(False)
            module.eval()
        return self


def weight_dtype(precision: str | int | None) -> torch.dtype:
    """dtype of the frozen UNet and text encoder for a Lightning precision setting."""
    precision = str(precision or "32")
    if precision.endswith("-true") and precision != "32-true":
        # Lightning's *-true plugins cast the whole module, the trained vectors and the VAE included
        raise UserError(
            f"trainer.precision={precision}: lit_ti keeps the trained tensors and the VAE in fp32; use "
            f"{'32-true' if precision.startswith('64') else precision.replace('-true', '-mixed')} (the frozen "
            "UNet and text encoders then run in the half dtype)"
        )
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return torch.float32


@contextlib.contextmanager
def built_in(dtype: torch.dtype):
    """Modules constructed inside are created in `dtype` (Lightning's `*-true` plugins do the same).

    Without `accelerate`, diffusers builds a model in fp32 before it loads the weights and casts: an SDXL UNet
    would take 10 GB on the way to 5 GB in bf16.
    """
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def check_prediction_type(value: str | None, key: str) -> None:
    if value is not None and value not in PREDICTION_TYPES:
        raise UserError(f"{key}={value!r} is not a prediction type; use one of {', '.join(PREDICTION_TYPES)}")


@dataclass
class DiffusersFolder:
    """A local diffusers-layout SD1.x/SD2.x model (`unet/ vae/ text_encoder/ tokenizer/ scheduler/`), or SDXL
    (also `text_encoder_2/ tokenizer_2/`).

    Args:
        path: the folder (what `StableDiffusionPipeline.save_pretrained` writes).
        prediction_type: override the scheduler's (`epsilon` or `v_prediction`, e.g. SD2-768-v); null = as
            the scheduler config says.
        variant: diffusers weight variant such as `fp16`, or null.
    """

    path: str
    prediction_type: str | None = None
    variant: str | None = None

    def load(self, dtype: torch.dtype = torch.float32) -> Backbone:
        check_prediction_type(self.prediction_type, "model.prediction_type")
        root = Path(self.path).expanduser()
        if not root.is_dir():
            raise UserError(
                f"model.path: {root} is not a folder; point it at a local diffusers model folder "
                f"(with {', '.join(s + '/' for s in SUBFOLDERS)})"
            )
        if (root / "transformer").is_dir() and (root / "text_encoder_2").is_dir():
            raise UserError(f"model.path: {root} is an SD3 folder (it has transformer/); use model=sd3")
        missing = [s for s in SUBFOLDERS if not (root / s).is_dir()]
        if missing:
            raise UserError(
                f"model.path: {root} lacks {', '.join(s + '/' for s in missing)}; a diffusers SD folder needs "
                f"{', '.join(s + '/' for s in SUBFOLDERS)} (save one with StableDiffusionPipeline.save_pretrained)"
            )
        try:
            tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer", model_max_length=77)
            kw = {"variant": self.variant} if self.variant else {}
            bar = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()  # a "Loading weights" bar per run is noise in training logs
            try:
                text_encoder = CLIPTextModel.from_pretrained(root / "text_encoder", dtype=dtype, **kw)
            finally:
                if bar:
                    hf_logging.enable_progress_bar()
            # low_cpu_mem_usage=False: the same load, without a notice that asks for `accelerate`
            with built_in(dtype):
                unet = UNet2DConditionModel.from_pretrained(
                    root, subfolder="unet", torch_dtype=dtype, low_cpu_mem_usage=False, **kw
                )
            text_encoder_2 = tokenizer_2 = None
            if (root / "text_encoder_2").is_dir():  # SDXL
                tokenizer_2 = CLIPTokenizer.from_pretrained(root / "tokenizer_2", model_max_length=77)
                text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(root / "text_encoder_2", dtype=dtype, **kw)
            # The VAE runs only to cache latents and decode previews: fp32 avoids the fp16 overflow of some VAEs.
            vae = AutoencoderKL.from_pretrained(
                root, subfolder="vae", torch_dtype=torch.float32, low_cpu_mem_usage=False, **kw
            )
            overrides = {"prediction_type": self.prediction_type} if self.prediction_type else {}
            scheduler = DDPMScheduler.from_pretrained(root, subfolder="scheduler", **overrides)
        except (OSError, ValueError) as e:
            raise UserError(f"model.path: could not load the diffusers model in {root}: {e}") from e
        check_vocabularies(root, tokenizer=tokenizer, tokenizer_2=tokenizer_2)
        return Backbone(
            unet=unet,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            scheduler=scheduler,
            name=root.name,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
        ).freeze()


def check_vocabularies(root: Path, **tokenizers) -> None:
    """One line for a CLIP tokenizer folder without vocabulary files, which transformers 5 silently loads as a
    2-token tokenizer. `tokenizers`: {subfolder: tokenizer or None}."""
    for sub, tok in tokenizers.items():
        if tok is not None and len(tok) < 1000:
            raise UserError(
                f"model.path: {root / sub} holds no usable CLIP vocabulary ({len(tok)} tokens); "
                "copy the model's tokenizer files (vocab.json + merges.txt or tokenizer.json) there"
            )
