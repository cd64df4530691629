"""A deterministic validation loss, for sweeps on real data (where no toy evaluator knows the truth).

The training loss is a poor objective: every step draws other noise and timesteps, so it is mostly noise.
Here every image is scored at the same `draws` (noise, timestep) pairs, stratified over the schedule, with a
fixed prompt per image (its first template line, no tag shuffling), so two runs are compared on exactly the
same denoising problems. Images come from a held-out folder when given, else from the training set.
"""

import random
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from lit_ti import losses
from lit_ti.callbacks.interrupt import interrupted
from lit_ti.data.datamodule import ConceptDataModule
from lit_ti.data.templates import fill
from lit_ti.errors import UserError, check_number, check_period, check_seed


def fixed_prompts(data: ConceptDataModule) -> list[str]:
    """One prompt per image: its caption in the first template line that names the concept, no shuffling."""
    line = next((t for t in data.templates if "[name]" in t), data.templates[0])
    return [fill(line, data.name, caption, random.Random(0)) for caption in data.captions]


class ValidationLoss(L.Callback):
    """Logs `val/loss` at the end of training (and every `every_n_steps` steps when set).

    Args:
        dir: a folder of held-out images of the concept (captions as in data.dir); null = the training images.
        draws: (noise, timestep) pairs per image.
        every_n_steps: also measure during training; null = only at the end.
        seed: the seed of the fixed noise and timesteps.
    """

    key = "callbacks.val_loss"  # the config entry named in error messages (subclasses have their own)

    def __init__(self, dir: str | None = None, draws: int = 8, every_n_steps: int | None = None, seed: int = 0):
        if dir is not None and not Path(dir).expanduser().is_dir():
            raise UserError(f"{self.key}.dir: {dir} is not a folder of held-out images; fix it, or null")
        self.dir = dir
        self.draws = check_number(f"{self.key}.draws", draws, 1, 1024, integer=True)
        self.every_n_steps = check_period(f"{self.key}.every_n_steps", every_n_steps, low=1, optional=True)
        self.seed = check_seed(f"{self.key}.seed", seed)
        self.images: tuple[list[torch.Tensor], list[str]] | None = None  # latents [4, h, w] each, prompts
        self.last_step: int | None = None

    def _images(self, trainer, pl_module) -> tuple[list[torch.Tensor], list[str]]:
        if self.images is None:
            train = trainer.datamodule
            data = train
            if self.dir is not None:
                data = ConceptDataModule(
                    self.dir, train.name, train.template, train.resolution, train.crop, latent_sampling="deterministic"
                )
                data.cache_latents(pl_module.encode_images, pl_module.backbone.resolution)
            prompts = fixed_prompts(data)
            self.images = [data.latent(i) for i in range(len(prompts))], prompts  # unflipped; sizes may differ
        return self.images

    @torch.no_grad()
    def measure(self, trainer, pl_module) -> float:
        latents, prompts = self._images(trainer, pl_module)
        objective = pl_module.objective
        was_training = pl_module.training
        pl_module.eval()
        try:
            with pl_module.as_exported():  # what the files written now hold (DreamArtist: the EMA pair)
                total = sum(
                    losses.denoising_loss(
                        pl_module.predict,
                        objective,
                        latents[i][None].to(pl_module.device),
                        p,
                        self.draws,
                        self.seed + i,
                    )
                    for i, p in enumerate(prompts)
                )
        finally:
            pl_module.train(was_training)
        value = total / len(prompts)
        for logger in trainer.loggers:
            logger.log_metrics({"val/loss": value}, step=trainer.global_step)
        trainer.callback_metrics["val/loss"] = torch.tensor(value)
        return value

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and step != self.last_step:
            self.last_step = step  # once per optimizer step, not per accumulated micro-batch
            self.measure(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if interrupted(trainer):  # a stop must take seconds; the sweep reads val/loss from finished runs
            return
        rank_zero_info(f"[lit_ti] val/loss = {self.measure(trainer, pl_module):.5f}")
