"""Stable Diffusion 3 / 3.5 from a local diffusers folder (what `StableDiffusion3Pipeline.save_pretrained`
writes): an MMDiT, a 16-channel VAE, CLIP-L and CLIP-G with projections, and optionally T5-XXL."""

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from transformers import AutoTokenizer, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel
from transformers.utils import logging as hf_logging

from lit_ti.errors import UserError
from lit_ti.models.backbone import Backbone, built_in, check_vocabularies

SUBFOLDERS = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")
T5_SUBFOLDERS = ("text_encoder_3", "tokenizer_3")


@dataclass
class SD3Folder:
    """A local diffusers-layout SD3 / SD3.5 folder (`transformer/ vae/ text_encoder/ tokenizer/ text_encoder_2/
    tokenizer_2/ scheduler/`, and `text_encoder_3/ tokenizer_3/` for T5).

    Args:
        path: the folder.
        t5: load T5 when the folder has it; false (or a folder without it) = run without T5, as SD3 allows:
            its part of the prompt is zeros, and no T5 vectors are trained or written.
        variant: diffusers weight variant such as `fp16`, or null.
    """

    path: str
    t5: bool = True
    variant: str | None = None

    def load(self, dtype: torch.dtype = torch.float32) -> Backbone:
        root = Path(self.path).expanduser()
        if not root.is_dir():
            raise UserError(f"model.path: {root} is not a folder; point it at a local diffusers SD3 folder")
        missing = [s for s in SUBFOLDERS if not (root / s).is_dir()]
        if missing:
            raise UserError(
                f"model.path: {root} lacks {', '.join(s + '/' for s in missing)}; an SD3 folder needs "
                f"{', '.join(s + '/' for s in SUBFOLDERS)} (save one with StableDiffusion3Pipeline.save_pretrained)"
            )
        with_t5 = self.t5 and all((root / s).is_dir() for s in T5_SUBFOLDERS)
        kw = {"variant": self.variant} if self.variant else {}
        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a "Loading weights" bar per run is noise in training logs
        try:
            tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer", model_max_length=77)
            tokenizer_2 = CLIPTokenizer.from_pretrained(root / "tokenizer_2", model_max_length=77)
            clip_l = CLIPTextModelWithProjection.from_pretrained(root / "text_encoder", dtype=dtype, **kw)
            clip_g = CLIPTextModelWithProjection.from_pretrained(root / "text_encoder_2", dtype=dtype, **kw)
            tokenizer_3 = t5 = None
            if with_t5:
                tokenizer_3 = AutoTokenizer.from_pretrained(root / "tokenizer_3")
                t5 = T5EncoderModel.from_pretrained(root / "text_encoder_3", dtype=dtype, **kw)
            with built_in(dtype):
                transformer = SD3Transformer2DModel.from_pretrained(
                    root, subfolder="transformer", torch_dtype=dtype, low_cpu_mem_usage=False, **kw
                )
            # fp32 VAE: it only caches latents and decodes previews (see DiffusersFolder)
            vae = AutoencoderKL.from_pretrained(
                root, subfolder="vae", torch_dtype=torch.float32, low_cpu_mem_usage=False, **kw
            )
            scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(root, subfolder="scheduler")
        except (OSError, ValueError) as e:
            raise UserError(
                f"model.path: could not load the SD3 model in {root}: {str(e).splitlines()[0][:300]}"
            ) from e
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        check_vocabularies(root, tokenizer=tokenizer, tokenizer_2=tokenizer_2)
        return Backbone(
            unet=transformer,
            vae=vae,
            text_encoder=clip_l,
            tokenizer=tokenizer,
            scheduler=scheduler,
            name=root.name,
            text_encoder_2=clip_g,
            tokenizer_2=tokenizer_2,
            text_encoder_3=t5,
            tokenizer_3=tokenizer_3,
        ).freeze()
