"""The method contract and the step every method shares: cached latents -> noisy latents at a random
timestep -> frozen UNet conditioned on the method's text states -> MSE to the noise (or v) target.

`DiffusionMethod`'s abstract members are the contract (see docs/architecture.md, "Adding a method"): what
trains (`checkpointed`, `build_trainables`, `param_groups`), how prompts become UNet conditioning
(`encode_prompts`), what it exports and where (`export`, `periodic_dirname`), and what previews and
evaluations need (`export_images`, `concept_bank`). A subclass missing one cannot be constructed. The frozen
backbone is loaded in `configure_model`, never in `__init__`, and checkpoints hold only the submodules named
in `checkpointed` (kilobytes for TI, not the frozen model).
"""

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import partial
from pathlib import Path

import lightning as L
import torch
from torch import Tensor

from lit_ti import losses, objectives, optimizers
from lit_ti.data import ConceptDataModule
from lit_ti.errors import UserError, check_choice, check_number
from lit_ti.io import paths
from lit_ti.methods import resume
from lit_ti.methods.untrained import UntrainedLedger, select, zero_loss
from lit_ti.models import Backbone, compiled, weight_dtype
from lit_ti.modules.embedding_bank import EmbeddingBank
from lit_ti.modules.text_conditioning import Conditioning
from lit_ti.schedules import parse_schedule, schedule_end, schedule_lambda

MAX_CLIP_SKIP = 32  # CLIP layers of the largest text encoder (SDXL's OpenCLIP bigG)
MAX_TIMESTEPS = 10_000  # any diffusion schedule (SD's has 1000)


class DiffusionMethod(L.LightningModule, ABC):
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

    needs_pixels = False  # whether training steps need the images themselves (a pixel-space loss)
    # whether the trained tensors act inside the UNet or text encoders, not only through the prompt's tokens:
    # then `base_model()` switches them off, and the toy evaluation also checks what else they change
    changes_model = False
    # whether `step_loss` trains on the datamodule's prior images (`data.prior_dir`, the `prior_*` batch keys):
    # they never name the concept, so they serve only a method whose tensors act without the concept's token
    learns_prior = False
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

    # ----------------------------------------------------------------- the contract: what trains
    @property
    @abstractmethod
    def checkpointed(self) -> tuple[str, ...]:
        """Prefixes of the submodules that train (made by `build_trainables`): Lightning checkpoints hold these
        and nothing else, and `io.checkpoint_io.TRAINED` lists every method's. A class attribute in methods."""

    @abstractmethod
    def build_trainables(self, backbone: Backbone) -> None:
        """Make the trainable modules, once the frozen `backbone` is loaded (and attach them to it when they act
        inside the UNet or text encoder). Called once, by `configure_model`, before the optimizer exists."""

    @abstractmethod
    def param_groups(self) -> list[dict]:
        """Optimizer groups; a group's optional `lr_weight` scales the optimizer's lr for it (kept by the
        LR schedule)."""

    # ----------------------------------------------------------------- the contract: prompts -> conditioning
    @abstractmethod
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """UNet conditioning (states `[B, 77, d]`, SDXL's pooled `[B, 1280]`) for a list of prompts, with the
        trained tensors in it (training steps, previews and evaluations all go through here)."""

    # ----------------------------------------------------------------- the contract: exports
    @property
    @abstractmethod
    def periodic_dirname(self) -> str:
        """Folder (under the run folder) of the periodic copies `callbacks.export` writes. A class attribute."""

    @abstractmethod
    def export(self, directory: Path, step: int, tag: str = "", formats=("pt", "safetensors")) -> list[Path]:
        """Write what trained as files other tools load, `<directory>/<name><tag>.<format>` for each of
        `formats` (names from `io.formats`; a UserError naming `callbacks.export.formats` for one this method
        cannot write). `tag` (`-<step>`) marks periodic copies. Returns the paths written (rank zero only)."""

    # ----------------------------------------------------------------- the contract: previews and evaluations
    @abstractmethod
    def export_images(self, directory: Path, step: int, preview) -> list[Path]:
        """Files that carry the trained tensors inside the preview image (PIL), A1111's "embedding in PNG";
        [] when the method has no such format. Called by `callbacks.preview` after each preview."""

    @property
    @abstractmethod
    def concept_bank(self) -> EmbeddingBank | None:
        """The trained prompt tokens, which concept measures (`callbacks.toy_eval`) snapshot and swap for their
        initial values; None when the method trains no token (its measures are of another kind)."""

    def base_model(self) -> AbstractContextManager:
        """A context in which the backbone acts as it did before training: what the trained tensors change
        inside the UNet or text encoders (pivotal tuning's LoRA) is switched off, so evaluations can score
        the base model's captions. Methods whose tensors act only through the prompt keep the default."""
        return nullcontext()

    # ----------------------------------------------------------------- the contract: a stop rule's verdict
    def learned(self, step: int) -> bool:
        """A stop rule (`callbacks.early_stop`) finds the trained tensors learned after `step` optimizer steps;
        return whether the run ends there. A method with phases may end a phase instead (pivotal tuning's
        `ti_steps: auto`), and the rule then stops measuring."""
        return True

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

    # ----------------------------------------------------------------- step (methods may override the hooks
    # trained_samples, negative_prompts, predict and step_loss; the order is training_step's docstring)
    def draw_noise(self, batch: dict) -> tuple[Tensor, Tensor]:
        """Noise `[B, c, h, w]` and timesteps `[B]` for a batch, from its `noise_seed`s when the datamodule gives
        them, with the method's timestep density (`losses.draw_noise`)."""
        return losses.draw_noise(
            batch["latents"], batch.get("noise_seed"), *self.timestep_range, self.timestep_sampling
        )

    def predict(self, noisy: Tensor, timesteps: Tensor, batch: dict) -> Tensor:
        """The model's prediction (epsilon, v, or SD3's flow velocity) `[B, c, h, w]` for the batch's prompts."""
        return self.call_unet(noisy, timesteps, self.encode_prompts(batch["prompt"]))

    def call_unet(self, noisy: Tensor, timesteps: Tensor, cond: Conditioning) -> Tensor:
        """The frozen denoiser on noisy latents `[B, c, h, w]` at integer `timesteps`; SDXL also gets its pooled
        text embedding and its size conditioning (original = target = the training size, no crop: what its
        pipeline passes); SD3's MMDiT gets the pooled embedding and σ·1000 as its time."""
        dtype = self.unet_dtype
        unet = self.compiled_unet if self.compiled_unet is not None and torch.is_grad_enabled() else self.unet
        if self.backbone.is_sd3:
            return unet(
                hidden_states=self.to_unet(noisy),
                timestep=self.objective.model_time(timesteps).to(dtype),
                encoder_hidden_states=cond.states.to(dtype),
                pooled_projections=cond.pooled.to(dtype),
            ).sample
        extra = {}
        if cond.pooled is not None:
            h, w = (side * self.backbone.vae_scale_factor for side in noisy.shape[-2:])
            time_ids = torch.tensor([h, w, 0, 0, h, w], device=noisy.device, dtype=dtype).expand(noisy.shape[0], 6)
            extra["added_cond_kwargs"] = {"text_embeds": cond.pooled.to(dtype), "time_ids": time_ids}
        # (the compiled UNet only where gradients flow, training steps: other callers would compile again for
        # their own batch shapes and no_grad mode)
        return unet(self.to_unet(noisy), timesteps, cond.states.to(dtype), **extra).sample

    def to_unet(self, x: Tensor) -> Tensor:
        """Latents as the UNet takes them: its dtype, and channels-last when that switch is on."""
        x = x.to(self.unet_dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def negative_prompts(self, batch: dict) -> list[str]:
        """The negative prompt this method pairs with each prompt at sampling time ("" = unconditional)."""
        return [""] * len(batch["prompt"])

    def trained_samples(self, batch: dict) -> list[bool] | None:
        """Which samples can train this method's tensors (their prompt holds a trained token); None = all."""
        return None

    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def shared_step(self, batch: dict) -> dict:
        """Noise the cached latents, predict, and score against the target (weighted by masks if any).

        Samples that cannot train (`trained_samples`) are left out first (returned `batch`: the rest); when none
        is left the loss is a zero that still reaches the trained tensors and `skipped` is true.
        """
        keep = self.trained_samples(batch)
        if keep is not None and not all(keep):
            self.untrained.left_out(list(batch["prompt"]), keep)
            if not any(keep):
                return {"loss": zero_loss(self.trainable()), "skipped": True, "batch": batch}
            batch = select(batch, keep)
        self.untrained.trained_this_step += len(batch["prompt"])
        latents = batch["latents"]  # [B, c, h, w] fp32, cached
        objective = self.objective  # the model's: DDPM denoising or SD3's flow matching
        noise, timesteps = self.draw_noise(batch)
        noisy = objective.noisy(latents, noise, timesteps)
        pred = self.predict(noisy, timesteps, batch)
        target = objective.target(latents, noise, timesteps)
        loss = losses.diffusion_mse(pred, target, batch.get("weight"), objective.weights(timesteps))
        return {"loss": loss, "pred": pred, "noisy": noisy, "timesteps": timesteps, "batch": batch, "skipped": False}

    def step_loss(self, out: dict) -> Tensor:
        """The loss to minimise from `shared_step`'s output; a method with terms of its own adds them here
        (and logs them as `train/loss_<term>`)."""
        return out["loss"]

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        """One step, every method: `shared_step` (`trained_samples`, `draw_noise`, `predict` ->
        `encode_prompts` + `call_unet`, the MSE), then `step_loss`; `train/loss` is the total."""
        out = self.shared_step(batch)
        loss = self.step_loss(out)
        if self.log_now:
            size = out["batch"]["latents"].shape[0]
            self.log("train/loss", loss, prog_bar=True, batch_size=size, sync_dist=True)
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        # a step none of whose samples could train changes nothing: tensors without a gradient are left alone
        # by the optimizer (zero gradients would still move them through Adam's momentum and weight decay)
        trained = self.untrained.trained_this_step > 0
        self.untrained.trained_this_step = 0
        if self.trainer.world_size > 1:  # every rank must take the same decision
            trained = self.trainer.strategy.reduce_boolean_decision(trained, all=False)
        if not trained:
            self.untrained.step_skipped(self.trainer.global_step + 1)
            for p in self.trainable():
                p.grad = None

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
