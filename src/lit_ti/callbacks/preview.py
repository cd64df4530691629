"""Preview images during training, from the modules already in memory (no pipeline reload).

A diffusers `StableDiffusionPipeline` is assembled around the live UNet/VAE/text encoder and fed the
method's own prompt encoding (so the learned vectors are in it) as `prompt_embeds`. A fixed seed makes the
previews of successive steps comparable; the training RNG is left untouched.
"""

from pathlib import Path

import lightning as L
import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from PIL import Image

from lit_ti.callbacks.interrupt import Stopped, interrupted, stoppable
from lit_ti.callbacks.preview_grid import labelled_grid
from lit_ti.errors import UserError, check_choice, check_number, check_period, check_seed
from lit_ti.io.atomic import atomic_path
from lit_ti.io.paths import WriteFailed
from lit_ti.optimizers import evaluation_weights

SAMPLERS = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
}


MAX_IMAGES = 64  # a preview row


class PreviewImages(L.Callback):
    """Every `every_n_steps` optimizer steps (and at the end) render `prompt` and save
    `<dirpath>/previews/<name>-<step>.png` (a row of `num_images`), also logged to TensorBoard as a labelled grid
    (tag `preview/<prompt>`; the prompt, step and seed drawn above the enlarged images).

    Args:
        prompt / negative_prompt: `[name]` is replaced by the concept name.
        sampler: one of ddim, euler, euler_a, dpmpp_2m.
        size: image size in pixels; null = the backbone's native size.
        embed_in_png: also write A1111's image embeddings, `<dirpath>/image_embeddings/<stem>-<step>.png`
            (the first preview with the vectors in a text chunk and in its pixels; methods with embeddings).
        lora_max_timestep: methods that change the model (pivotal tuning's LoRA): apply that change only in
            sampling steps below this timestep, as generate.py's `lora_max_timestep`; null = in every step.
    """

    def __init__(
        self,
        dirpath: str,
        every_n_steps: int = 500,
        prompt: str = "a photo of [name]",
        negative_prompt: str = "",
        seed: int = 0,
        num_inference_steps: int = 20,
        guidance_scale: float = 7.5,
        sampler: str = "ddim",
        num_images: int = 1,
        size: int | None = None,
        embed_in_png: bool = True,
        lora_max_timestep: int | None = None,
    ) -> None:
        key = "callbacks.preview."
        self.dirpath = Path(dirpath)
        self.every_n_steps = check_period(key + "every_n_steps", every_n_steps)
        self.prompt = "" if prompt is None else str(prompt)
        self.negative_prompt = "" if negative_prompt is None else str(negative_prompt)
        self.seed = check_seed(key + "seed", seed)
        self.num_inference_steps = check_number(key + "num_inference_steps", num_inference_steps, 1, 1000, integer=True)
        self.guidance_scale = check_number(key + "guidance_scale", guidance_scale, 1, 30, hint="1 = no guidance")
        self.sampler = check_choice(key + "sampler", sampler, SAMPLERS)
        self.num_images = check_number(key + "num_images", num_images, 1, MAX_IMAGES, integer=True)
        self.size = check_number(key + "size", size, 8, 4096, integer=True, optional=True)
        if self.size is not None and self.size % 8:
            raise UserError(f"{key}size={size}: use a multiple of 8 (the VAE's downscale), or null")
        self.embed_in_png = embed_in_png
        self.lora_max_timestep = check_number(
            key + "lora_max_timestep", lora_max_timestep, 1, 10_000, integer=True, optional=True
        )
        self.last_step = -1
        self.written: list[Path] = []

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.lora_max_timestep is not None and not pl_module.changes_model:  # said before training, not after
            raise UserError(
                f"callbacks.preview.lora_max_timestep={self.lora_max_timestep}: {type(pl_module).__name__} trains "
                "no LoRA to gate; leave it null (it is for method=pivotal)"
            )

    @rank_zero_only
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0 and step != self.last_step:
            self.render_or_warn(trainer, pl_module, step)

    @rank_zero_only
    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step != self.last_step and not interrupted(trainer):  # a stop must take seconds
            self.render_or_warn(trainer, pl_module, trainer.global_step)

    def render_or_warn(self, trainer, pl_module, step: int) -> None:
        """A preview the system refuses to write (disk full, read-only) is not worth stopping the training; one
        that Ctrl-C or SIGTERM interrupts is given up (sampling a real model can take a minute on a CPU)."""
        try:
            with evaluation_weights(trainer.optimizers):  # a schedule-free optimizer's average, as exported
                self.render(trainer, pl_module, step)
        except WriteFailed as e:
            rank_zero_warn(f"{e}. Training goes on without the preview of step {step}")
        except Stopped:
            rank_zero_info(f"[lit_ti] preview of step {step} skipped (interrupted)")

    @torch.no_grad()
    def render(self, trainer, pl_module, step: int) -> Path:
        self.last_step = step
        name = pl_module.name
        bb = pl_module.backbone
        with (
            stoppable(trainer, "preview"),  # the sampling only: the files below are written whole or not at all
            pl_module.applied_at(1.0, self.lora_max_timestep),
        ):
            images = pl_module.sample(
                self.prompt.replace("[name]", name),
                self.negative_prompt.replace("[name]", name),
                n=self.num_images,
                steps=self.num_inference_steps,
                guidance_scale=self.guidance_scale,
                seed=self.seed,
                scheduler=bb.sampler(SAMPLERS[self.sampler]),
                size=self.size,
            )  # [n, 3, H, W] in [0, 1]
        images = (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().clip(0, 255).astype(np.uint8)
        row = np.concatenate(list(images), axis=1)  # the saved file: the images at their own size
        path = self.dirpath / "previews" / f"{name or 'preview'}-{step}.png"
        with atomic_path(path) as tmp:
            Image.fromarray(row).save(tmp, format="PNG")
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                prompt = self.prompt.replace("[name]", name)
                caption = f"step {step} · seed {self.seed} · {self.sampler}, {self.num_inference_steps} steps"
                caption += f" · LoRA below t={self.lora_max_timestep}" if self.lora_max_timestep else ""
                grid = labelled_grid(images, prompt, caption)
                logger.experiment.add_image(f"preview/{prompt}", grid, step, dataformats="HWC")
        self.written.append(path)
        if self.embed_in_png:
            first = Image.fromarray(row[:, : images.shape[2]])
            self.written += pl_module.export_images(self.dirpath / "image_embeddings", step, first)
        return path
