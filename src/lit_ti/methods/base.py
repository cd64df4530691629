"""The base system every method is: `DiffusionMethod`, a LightningModule that loads the frozen backbone in
`configure_model`, caches the concept's latents, samples, optimises and resumes, the same for every method.

What a method must provide is `methods/contract.py` (`MethodContract`); the training step every method shares is
`methods/step.py` (`DenoisingStep`). Checkpoints hold only the submodules named in `checkpointed` (kilobytes
for TI, not the frozen model).
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import lightning as L
import torch
from torch import Tensor

from lit_ti import losses, objectives, optimizers
from lit_ti.data import ConceptDataModule
from lit_ti.errors import UserError, check_choice, check_number
from lit_ti.io import paths
from lit_ti.methods import resume
from lit_ti.methods.contract import MethodContract
from lit_ti.methods.step import DenoisingStep
from lit_ti.methods.untrained import UntrainedLedger
from lit_ti.models import Backbone, compiled, weight_dtype
from lit_ti.schedules import parse_schedule, schedule_end, schedule_lambda

MAX_CLIP_SKIP = 32  # CLIP layers of the largest text encoder (SDXL's OpenCLIP bigG)
MAX_TIMESTEPS = 10_000  # any diffusion schedule (SD's has 1000)


class DiffusionMethod(DenoisingStep, MethodContract, L.LightningModule):
    """Base system. Args shared by every method:

    backbone: a backbone spec (`DiffusersFolder`, `TinyBackbone`, ...) with `.load(dtype)`.
    name: what the method trains is called: the file stem of its exports (A1111 reads it as the prompt
        word) and what `[name]` becomes in preview prompts.
    optimizer: a partial optimizer taking the param groups; null = AdamW(lr=0.005, weight_decay=0) as A1111.
    lr_schedule: A1111 schedule string such as `"0.005:100, 1e-3:1000, 1e-5"` (absolute rates), or null.
    lr_scheduler: a partial torch LR scheduler stepped per optimizer step, or null (not with lr_schedule).
    clip_skip: A1111 clip skip (1 = last CLIP layer).
    gradient_checkpointing: recompute the UNet's activations in the backward pass instead of keeping them
        (less memory, about a third more compute; see docs/benchmarks.md).
    channels_last: UNet weights and inputs in channels-last memory format.
    compile_unet: run training steps through `torch.compile`d UNet (sampling and evaluation stay eager; the
        first step pays the compilation, see docs/benchmarks.md): false, true (torch.compile's default mode)
        or a mode name, e.g. `reduce-overhead` (CUDA graphs, for batch-1 steps on a GPU).
    min_timestep / max_timestep: train on timesteps in [min, max) only (kohya's `--min_timestep` /
        `--max_timestep`); null max = the scheduler's last. The default is SD's uniform [0, T).
    timestep_sampling: the density of training timesteps within that range: `uniform`, `logit_normal` (SD3's),
        `cosine_map` or `mode` (`lit_ti.losses.map_timesteps`).
    min_snr_gamma: weight each sample's loss by min(SNR, γ)/SNR (v-prediction: /(SNR + 1)); null = off. DDPM
        models only.
    flow_weighting: flow-matching models (SD3) only: SD3's loss weighting `none` (its recipe: logit-normal
        timesteps, equal weights), `sigma_sqrt` or `cosmap` (`lit_ti.objectives.FlowMatching`).
    """

    strict_loading = False  # checkpoints deliberately lack the frozen backbone
    stem_suffixes: tuple[str, ...] = (f"{paths.STEP}.safetensors",)  # the longest file name derived from `name`

    def __init__(
        self,
        backbone,
        name: str,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        lr_schedule: str | None = None,
        lr_scheduler: Callable | None = None,
        clip_skip: int = 1,
        gradient_checkpointing: bool = False,
        channels_last: bool = False,
        compile_unet: bool | str = False,
        min_timestep: int = 0,
        max_timestep: int | None = None,
        timestep_sampling: str = "uniform",
        min_snr_gamma: float | None = None,
        flow_weighting: str = "none",
    ) -> None:
        super().__init__()
        if lr_schedule is not None and lr_scheduler is not None:
            raise UserError("method.lr_schedule and method.lr_scheduler are both set; keep one and null the other")
        check_number("method.clip_skip", clip_skip, 1, MAX_CLIP_SKIP, integer=True, hint="1 = last layer, as in A1111")
        check_number("method.min_timestep", min_timestep, 0, MAX_TIMESTEPS, integer=True)
        check_number("method.max_timestep", max_timestep, 1, MAX_TIMESTEPS, integer=True, optional=True)
        if max_timestep is not None and max_timestep <= min_timestep:
            raise UserError(
                f"method.min_timestep={min_timestep}, method.max_timestep={max_timestep}: need 0 <= min < max"
            )
        self.name = paths.check_name(name, "name", self.stem_suffixes)
        check_choice("method.timestep_sampling", timestep_sampling, losses.TIMESTEP_SAMPLING)
        check_number("method.min_snr_gamma", min_snr_gamma, 0, 1e6, low_open=True, optional=True, hint="kohya: 5")
        self.flow_weighting = check_choice("method.flow_weighting", flow_weighting, losses.FLOW_WEIGHTINGS)
        if not isinstance(compile_unet, bool):
            check_choice("method.compile_unet", compile_unet, compiled.MODES)  # (or true / false)
        self.timestep_sampling = timestep_sampling
        self.min_snr_gamma = min_snr_gamma
        self.objective: objectives.Objective | None = None  # set when the backbone loads
        self.backbone_spec = backbone
        self.optimizer_factory = optimizer
        self.lr_schedule = lr_schedule
        self.lr_scheduler_factory = lr_scheduler
        self.clip_skip = clip_skip
        self.gradient_checkpointing = gradient_checkpointing
        self.channels_last = channels_last
        self.compile_unet = compile_unet
        self.min_timestep = min_timestep
        self.max_timestep = max_timestep
        self.timestep_range: tuple[int, int] | None = None  # [low, high) of training timesteps, set on load
        self.compiled_unet: Callable | None = None  # the training steps' UNet when compile_unet is on
        self.backbone: Backbone | None = None
        self.unet_dtype = torch.float32
        self.schedule_end: int | None = None
        self.log_now = True  # whether this step's metrics reach the loggers (set per batch)
        self.untrained = UntrainedLedger()

    # ----------------------------------------------------------------- model
    def configure_model(self) -> None:
        if self.backbone is not None:
            return
        precision = self.trainer.precision if self._trainer is not None else "32"
        bb = self.backbone_spec.load(weight_dtype(precision))
        self.backbone = bb
        # registered as submodules so Lightning moves them to the device; frozen and in eval mode
        self.unet, self.vae, self.text_encoder = bb.unet, bb.vae, bb.text_encoder
        # diffusers' `unet.dtype` walks every submodule on each call (about 1 ms per step on the tiny
        # backbone, more on SD-sized ones), and the frozen weights never change dtype
        self.unet_dtype = bb.unet.dtype
        if bb.text_encoder_2 is not None:
            self.text_encoder_2 = bb.text_encoder_2
        if self.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()  # diffusers checkpoints whenever grad is enabled
        if self.channels_last:
            self.unet.to(memory_format=torch.channels_last)
        clips = [enc for key, (_, enc) in bb.text_encoders.items() if key != "text_encoder_3"]  # not T5
        layers = min(enc.config.num_hidden_layers for enc in clips)
        if self.clip_skip > layers:
            raise UserError(f"method.clip_skip={self.clip_skip}: this model's text encoder has {layers} layers")
        steps = bb.scheduler.config.num_train_timesteps
        if self.max_timestep is not None and self.max_timestep > steps:
            raise UserError(f"method.max_timestep={self.max_timestep}: the scheduler has {steps} timesteps")
        self.timestep_range = (self.min_timestep, self.max_timestep or steps)
        self.objective = objectives.build(bb.scheduler, self.min_snr_gamma, self.flow_weighting)
        self.build_trainables(bb)
        if self.compile_unet:  # after build_trainables: hypernetworks swap the attention processors
            mode = "default" if self.compile_unet is True else self.compile_unet
            self.compiled_unet = compiled.compile_unet(self.unet, mode=mode)

    def train(self, mode: bool = True) -> "DiffusionMethod":
        super().train(mode)
        if self.backbone is not None:  # the frozen parts never leave eval mode
            for module in self.backbone.frozen:
                module.eval()
        return self

    def state_dict(self, *args, **kwargs) -> dict:
        state = super().state_dict(*args, **kwargs)
        return type(state)((k, v) for k, v in state.items() if k.split(".", 1)[0] in self.checkpointed)

    # ----------------------------------------------------------------- previews and evaluations
    @contextmanager
    def as_exported(self) -> Iterator[None]:
        """While inside, the trained modules hold what `export` would write now, so that a measure taken
        inside (`val/loss`, early stopping, the toy evaluation) scores the files and not a state no file holds.
        Here the live state is what is written (a schedule-free optimizer's average, `lit_ti.optimizers`); a
        method that exports something else (DreamArtist's EMA) swaps it in."""
        with optimizers.evaluation_weights(self.trainer.optimizers if self._trainer is not None else ()):
            yield

    @torch.no_grad()
    def sample(
        self,
        prompt: str,
        negative_prompt: str = "",
        n: int = 1,
        steps: int = 20,
        guidance_scale: float = 7.5,
        seed: int = 0,
        scheduler=None,
        size: int | None = None,
    ) -> Tensor:
        """`n` images `[n, 3, H, W]` in [0, 1] from the live modules and this method's prompt encoding.

        A fixed seed makes samples comparable across steps; the training RNG is left untouched.
        """
        dtype = self.unet_dtype
        size = size or self.backbone.resolution
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        was_training = self.training
        self.eval()  # trainable modules in inference mode (hypernetworks: dropout off, their strength)
        try:
            with (
                torch.random.fork_rng(devices=devices),
                torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32),
            ):
                pos = self.encode_prompts([prompt] * n).to(dtype)
                neg = self.encode_prompts([negative_prompt] * n).to(dtype)
                pooled = {}
                if pos.pooled is not None:
                    pooled = {"pooled_prompt_embeds": pos.pooled, "negative_pooled_prompt_embeds": neg.pooled}
                images = self.backbone.pipeline(scheduler)(
                    prompt_embeds=pos.states,
                    negative_prompt_embeds=neg.states,
                    **pooled,
                    height=size,
                    width=size,
                    num_inference_steps=steps,
                    guidance_scale=guidance_scale,
                    generator=torch.Generator("cpu").manual_seed(seed),
                    output_type="pt",
                ).images
        finally:
            self.train(was_training)
        return images.float()

    # ----------------------------------------------------------------- data
    @torch.no_grad()
    def encode_images(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """Frozen VAE: pixels `[B, 3, H, W]` in [-1, 1] -> scaled latent mean and std `[B, 4, H/8, W/8]`."""
        dist = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist
        scale = self.vae.config.scaling_factor
        shift = self.vae.config.get("shift_factor") or 0.0
        return (dist.mean - shift) * scale, dist.std * scale

    def on_fit_start(self) -> None:
        datamodule = self.trainer.datamodule
        if isinstance(datamodule, ConceptDataModule):
            if datamodule.prior_dir is not None and not self.learns_prior:
                raise UserError(
                    f"data.prior_dir: {type(self).__name__} trains only through the concept's token, which prior "
                    "images never hold, so they would cost steps and teach nothing; drop data.prior_dir (prior "
                    "images serve method=pivotal, whose LoRA changes the model)"
                )
            datamodule.cache_latents(
                self.encode_images, self.backbone.resolution, keep_pixels=self.needs_pixels, vae=self.vae
            )

    def transfer_batch_to_device(self, batch, device, dataloader_idx: int):
        # the noise seeds stay on the host: reading them back from a GPU would stall every step
        keys = ("noise_seed", "prior_noise_seed")
        seeds = {k: batch.pop(k) for k in keys if k in batch} if isinstance(batch, dict) else {}
        batch = super().transfer_batch_to_device(batch, device, dataloader_idx)
        return batch | seeds if seeds else batch

    def on_train_start(self) -> None:
        optimizers.start_training(self.trainer.optimizers)  # after a resume restored their state

    def on_train_end(self) -> None:
        self.untrained.summary()

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # Loggers write every `trainer.log_every_n_steps` steps, and `self.log` costs about 1 ms per value on
        # CPU (a tenth of a tiny model's step), so the other steps log nothing. Decided once per batch.
        # The last step always logs, so `trainer.callback_metrics` (what a sweep optimises) holds the end.
        step, trainer = self.global_step + 1, self.trainer
        self.log_now = step % max(1, trainer.log_every_n_steps) == 0 or step == trainer.max_steps
        # read before the step: Lightning steps the LR scheduler before on_train_batch_end
        if self.log_now:
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=1)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.schedule_end is not None and self.global_step >= self.schedule_end:
            self.trainer.should_stop = True  # A1111: a schedule that ends before max_steps ends training

    # ----------------------------------------------------------------- optimisation
    def configure_optimizers(self):
        factory = self.optimizer_factory or partial(torch.optim.AdamW, lr=5e-3, weight_decay=0.0)
        optimizer = factory(self.param_groups())
        for group in optimizer.param_groups:  # e.g. DreamArtist's negative at lr × neg_lr_weight
            group["lr"] *= group.get("lr_weight", 1.0)
        if self.lr_schedule is not None:
            pairs = parse_schedule(self.lr_schedule, int(self.trainer.estimated_stepping_batches))
            self.schedule_end = schedule_end(pairs)
            scheduler = schedule_lambda(optimizer, pairs)
        elif self.lr_scheduler_factory is not None:
            scheduler = self.lr_scheduler_factory(optimizer)
        else:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ----------------------------------------------------------------- resume
    def identity(self) -> dict:
        """What a checkpoint must match to be resumed by this run (stored in it as `lit_ti`)."""
        bb = self.backbone
        return {
            "method": type(self).__name__,
            "model": bb and bb.name,
            "model_hash": bb and bb.checkpoint_hash,
            "name": self.name,
        }

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        resume.record(checkpoint, self.identity())

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        resume.restore(checkpoint, self.identity(), self.trainer.ckpt_path)
