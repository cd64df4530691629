"""Pivotal tuning: a textual-inversion embedding first, then a small LoRA on the frozen model trained around it
(the embedding frozen, or at a lower rate), shipped as one bundle.

The embedding can only point at what the frozen model can already draw; the LoRA (peft, on the UNet's
attention projections, optionally the text encoders') moves the model towards the concept once the embedding
has found the nearest thing it can express. Everything about the embedding (bank, prompts, PNG embeddings,
toy evaluation) is textual inversion's; this class adds the adapters, the two phases and the LoRA files.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lit_ti import io, losses
from lit_ti.errors import UserError, check_choice, check_number
from lit_ti.io import paths
from lit_ti.io.loras import kohya_name
from lit_ti.methods.pivotal_settings import (
    AUTO,
    check_lora_max_timestep,
    check_matches,
    check_targets,
    check_ti_steps,
    check_word,
)
from lit_ti.methods.textual_inversion import TextualInversion
from lit_ti.models import Backbone
from lit_ti.modules import lora
from lit_ti.modules.text_conditioning import replace_names

LORA_SUFFIX = "-lora.safetensors"  # kohya/A1111 layout, the embedding bundled (A1111's models/Lora)
DIFFUSERS_SUFFIX = "-lora-diffusers.safetensors"  # `pipe.load_lora_weights(folder, weight_name=...)`
MAX_RANK = 1024
# the LoRA files' dtypes (kohya's --save_precision float/fp16/bf16): A1111, ComfyUI and diffusers cast a LoRA's
# tensors to the model's dtype when they apply it, so each loads any of them
LORA_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class PivotalTuning(TextualInversion):
    """Args (besides textual inversion's; `optimizer.lr` is the embedding's rate):

    rank / alpha / dropout: the LoRA's rank r, its alpha (the update is scaled by alpha / r) and peft's
        dropout on the adapter's input.
    lora_targets: the UNet layers that get an adapter, as peft's `target_modules` (a module name or the end of
        its path): `[to_q, to_k, to_v, to_out.0]` = every attention projection; `[attn2.to_k, attn2.to_v]` =
        only the keys and values that read the prompt in cross-attention (custom diffusion's choice).
    text_encoder_lora: also adapt the text encoders' attention (q/k/v/out_proj), not only the UNet's.
    ti_steps: optimizer steps that train the embedding alone before the LoRA starts; a fraction in (0, 1) is
        a share of the run's steps; `auto`: until `callbacks.early_stop` finds the embedding learned (at the
        latest `lora_steps` before `max_steps`), then `lora_steps` of LoRA and the run ends.
    lora_steps: the LoRA phase's optimizer steps with `ti_steps: auto` (otherwise the LoRA trains to the end).
    lora_lr: the LoRA's learning rate (an LR schedule scales it in proportion with the embedding's).
    embedding_lr_after: the embedding's rate once the LoRA trains, as a share of its rate before: 0 = frozen
        (pivotal tuning's usual choice), 1 = unchanged.
    lora_dtype: the dtype of the LoRA files' tensors (float16 halves them, as kohya's scripts usually save);
        training and checkpoints stay float32, the bundled and separate embeddings are textual inversion's.
    preservation_word: while the LoRA trains, each prompt is also run with the concept's name replaced by this
        word (the class: "person", "dog"; "" drops the name), and the LoRA is taught to leave the base model's
        prediction for it unchanged (ai-toolkit's "differential output preservation", a prior-preservation
        term without class images); null = off.
    preservation_weight: that term's weight in the loss (logged as `train/loss_preservation`).
    prior_weight: with `data.prior_dir`, the weight of the prior images' own denoising loss under their captions
        while the LoRA trains (DreamBooth's prior_loss_weight, kohya's prior_loss_weight; `train/loss_prior`).
    lora_max_timestep: while the LoRA trains, the concept's images are noised only to timesteps below this
        (and at least `min_timestep`): a sample's layout (size, place, background) is decided at high noise,
        so a LoRA that never trains there has less reason to copy the training images' layout. The prior
        images keep the whole range. null = the method's range.
    """

    checkpointed = ("bank", "lora")
    changes_model = True
    learns_prior = True
    periodic_dirname = "loras"
    stem_suffixes = (f"{paths.STEP}{DIFFUSERS_SUFFIX}",)

    def __init__(
        self,
        backbone,
        name: str,
        rank: int = 4,
        alpha: float = 4.0,
        dropout: float = 0.0,
        lora_targets=lora.UNET_TARGETS,
        text_encoder_lora: bool = False,
        ti_steps: float | str = 0.5,
        lora_steps: int = 200,
        lora_lr: float = 1e-4,
        embedding_lr_after: float = 0.0,
        lora_dtype: str = "float32",
        preservation_word: str | None = None,
        preservation_weight: float = 1.0,
        prior_weight: float = 1.0,
        lora_max_timestep: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__(backbone, name, **kwargs)
        if "." in self.name:  # the webui reads `bundle_emb.<name>.<part>` by splitting at dots
            raise UserError(
                f"name={self.name!r}: the LoRA bundles the embedding under this name, and A1111 cuts it at '.'; pick a name without '.'"
            )
        self.rank = check_number("method.rank", rank, 1, MAX_RANK, integer=True, hint="kohya's network_dim; 4-32")
        self.alpha = check_number("method.alpha", alpha, 0, 1e6, low_open=True, hint="kohya's network_alpha")
        self.dropout = check_number("method.dropout", dropout, 0, 0.9)
        self.lora_targets = check_targets(lora_targets)
        self.text_encoder_lora = bool(text_encoder_lora)
        self.ti_steps = check_ti_steps(ti_steps)
        self.lora_steps = check_number("method.lora_steps", lora_steps, 1, 10**9, integer=True)
        self.lora_lr = check_number("method.lora_lr", lora_lr, 0, 1, low_open=True)
        self.embedding_lr_after = check_number("method.embedding_lr_after", embedding_lr_after, 0, 1, hint="0 = frozen")
        self.lora_dtype = LORA_DTYPES[check_choice("method.lora_dtype", lora_dtype, LORA_DTYPES)]
        self.preservation_word = check_word(preservation_word, self.name)
        self.preservation_weight = check_number("method.preservation_weight", preservation_weight, 0, 1e6)
        self.prior_weight = check_number("method.prior_weight", prior_weight, 0, 1e6)
        self.lora_max_timestep = check_lora_max_timestep(lora_max_timestep, self.min_timestep)
        # the first optimizer step (0-based) that trains the LoRA: set with the optimizer, or (auto) when learned
        self.switch_step: int | None = None
        self.announced = False  # the switch was said on the console
        self.adapted: dict[str, dict] = {}  # {model: {module path: peft LoraLayer}}
        self.strength = 1.0  # the LoRA's strength in use: 1 but inside `applied_at`
        self.configs: dict = {}  # {model: peft LoraConfig}
        self.lora = nn.ModuleDict()  # {kohya module name: {"down", "up"}}: what checkpoints hold of the LoRA

    def build_trainables(self, backbone: Backbone) -> None:
        if backbone.is_sd3:  # SD3's MMDiT has no kohya/A1111 LoRA key layout here yet: no file we could vouch for
            raise UserError("method=pivotal: SD3 models are not supported yet; use method=textual_inversion on SD3")
        super().build_trainables(backbone)  # the bank and the prompt encoder, before any adapter exists
        check_matches(backbone.unet, self.lora_targets)
        targets = {"unet": (backbone.unet, self.lora_targets)}
        if self.text_encoder_lora:
            targets |= {enc: (te, lora.TEXT_TARGETS) for enc, (_, te) in backbone.text_encoders.items()}
        for model, (module, names) in targets.items():
            self.configs[model] = lora.lora_config(self.rank, self.alpha, self.dropout, names)
            self.adapted[model] = lora.attach(module, self.configs[model])
        sdxl = backbone.is_sdxl
        for model, found in self.adapted.items():
            for path, layer in found.items():
                adapter = {"down": layer.lora_A[lora.ADAPTER], "up": layer.lora_B[lora.ADAPTER]}
                self.lora[kohya_name(model, lora.file_path(model, path), sdxl)] = nn.ModuleDict(adapter)

    def param_groups(self) -> list[dict]:
        return [*super().param_groups(), {"params": list(self.lora.parameters()), "lr": self.lora_lr}]

    def identity(self) -> dict:
        lora_shape = {"rank": self.rank, "alpha": self.alpha, "text_encoder_lora": self.text_encoder_lora}
        if self.lora_targets != lora.UNET_TARGETS:  # absent = the default (so older checkpoints still resume)
            lora_shape["targets"] = list(self.lora_targets)
        return {**super().identity(), "lora": lora_shape}

    def train(self, mode: bool = True) -> "PivotalTuning":
        super().train(mode)  # puts the frozen backbone, adapters included, in eval mode
        for found in self.adapted.values():
            for layer in found.values():
                layer.lora_dropout[lora.ADAPTER].train(mode)  # the adapters' dropout follows training
        return self

    def base_model(self):
        roots = [getattr(self.backbone, model) for model in self.adapted]  # the UNet, the text encoders
        return lora.switched_off(roots, self.strength)  # then back at the strength in use (training's: 1)

    @contextmanager
    def applied_at(self, strength: float, max_timestep: int | None = None) -> Iterator[None]:
        roots = [getattr(self.backbone, model) for model in self.adapted]
        for root in roots:
            lora.set_strength(root, strength)
        self.strength = strength
        try:
            with lora.below_timestep(self.backbone.unet, max_timestep):
                yield
        finally:  # training and the exports use the LoRA as trained
            for root in roots:
                lora.set_strength(root, 1.0)
            self.strength = 1.0

    # ----------------------------------------------------------------- the two phases
    def configure_optimizers(self):
        if isinstance(self.ti_steps, float):
            self.switch_step = round(self.ti_steps * int(self.trainer.estimated_stepping_batches))
        elif self.ti_steps != AUTO:
            self.switch_step = self.ti_steps
        return super().configure_optimizers()  # auto: None until learned, or as the resumed checkpoint says

    def on_fit_start(self) -> None:
        super().on_fit_start()
        from lit_ti.callbacks.early_stop import EarlyStop  # callbacks import methods; not the other way at load

        stops = any(isinstance(c, EarlyStop) for c in self.trainer.callbacks)
        if self.ti_steps == AUTO and not stops:
            raise UserError(
                "method.ti_steps=auto: the switch to the LoRA is decided by callbacks.early_stop, which this run "
                "does not have; add it ('callbacks=[default,early_stop]') or give ti_steps in steps"
            )
        if self.ti_steps != AUTO and stops:
            raise UserError(
                f"method.ti_steps={self.ti_steps} with callbacks.early_stop: the stop would end the run inside the "
                "embedding phase; set method.ti_steps=auto (the switch when learned) or callbacks.early_stop=null"
            )

    def learned(self, step: int) -> bool:
        """The embedding has learned (early stopping runs only with `ti_steps: auto`, see `on_fit_start`), so
        the LoRA trains from the next step; the run ends `lora_steps` later, not now."""
        if self.switch_step is None:
            self.switch_step = step
        return False

    def lora_trains(self) -> bool:
        """Whether the optimizer step being taken trains the LoRA (global_step counts the steps done)."""
        return self.switch_step is not None and self.global_step >= self.switch_step

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        if self.ti_steps != AUTO:
            return
        note = ""
        if self.switch_step is None and self.global_step >= int(self.trainer.max_steps) - self.lora_steps:
            self.switch_step = self.global_step  # not found learned: the last switch that leaves the LoRA its steps
            note = f" (the embedding was not found learned; trainer.max_steps={self.trainer.max_steps} is the cap)"
        if self.lora_trains() and not self.announced:
            rank_zero_info(f"[lit_ti] the LoRA trains from step {self.switch_step} for {self.lora_steps} steps{note}")
            self.announced = True

    def draw_noise(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's noise and timesteps; while the LoRA trains, timesteps below `lora_max_timestep`."""
        if self.lora_max_timestep is None or not self.lora_trains():
            return super().draw_noise(batch)
        low, high = self.timestep_range
        return super().draw_noise(batch, (low, min(high, self.lora_max_timestep)))

    def step_loss(self, out: dict) -> torch.Tensor:
        loss = super().step_loss(out)
        if out["skipped"] or not self.lora_trains():
            return loss  # (before the switch the LoRA is untouched, and these terms would train nothing)
        size = out["noisy"].shape[0]
        if self.preservation_word is not None:
            term = self.preservation_loss(out)
            if self.log_now:
                self.log("train/loss_preservation", term, batch_size=size, sync_dist=True)
            loss = loss + self.preservation_weight * term
        if "prior_latents" in out["batch"]:
            term = self.prior_loss(out["batch"])
            if self.log_now:
                self.log("train/loss_prior", term, batch_size=size, sync_dist=True)
            loss = loss + self.prior_weight * term
        return loss

    def prior_loss(self, batch: dict) -> torch.Tensor:
        """The plain denoising loss of the batch's prior images `[B, c, h, w]` under their own captions."""
        latents = batch["prior_latents"]
        # the method's whole range, not lora_max_timestep's: the prior holds the model where the LoRA should not act
        noise, timesteps = super().draw_noise({"latents": latents, "noise_seed": batch.get("prior_noise_seed")})
        noisy = self.objective.noisy(latents, noise, timesteps)
        pred = self.call_unet(noisy, timesteps, self.encode_prompts(batch["prior_prompt"]))
        target = self.objective.target(latents, noise, timesteps)
        return losses.diffusion_mse(pred, target, None, self.objective.weights(timesteps))

    def preservation_loss(self, out: dict) -> torch.Tensor:
        """MSE between the LoRA's and the base model's predictions for the batch's prompts with the concept's
        name replaced by `preservation_word`, on the step's own noisy latents `[B, c, h, w]` and timesteps."""
        prompts = [replace_names(p, self.bank.names, self.preservation_word) for p in out["batch"]["prompt"]]
        noisy, timesteps = out["noisy"], out["timesteps"]
        with torch.no_grad(), self.base_model():  # the text encoders' LoRA off too (text_encoder_lora)
            target = self.call_unet(noisy, timesteps, self.encode_prompts(prompts))
        pred = self.call_unet(noisy, timesteps, self.encode_prompts(prompts))
        return torch.nn.functional.mse_loss(pred.float(), target.float())

    def on_before_optimizer_step(self, optimizer) -> None:
        super().on_before_optimizer_step(optimizer)
        # a group without gradients gets no optimizer update at all (no Adam momentum, no weight decay)
        if not self.lora_trains():
            frozen = self.lora.parameters()
        elif self.embedding_lr_after == 0:
            frozen = self.bank.parameters()
        else:
            return
        for p in frozen:
            p.grad = None

    def optimizer_step(self, *args, **kwargs) -> None:
        scale = self.embedding_lr_after if self.lora_trains() and 0 < self.embedding_lr_after < 1 else 1.0
        embedding = self.trainer.optimizers[0].param_groups[0]  # param_groups(): the embedding's group first
        lr = embedding["lr"]
        embedding["lr"] = lr * scale  # for this step only: the LR scheduler keeps its own count
        try:
            super().optimizer_step(*args, **kwargs)
        finally:
            embedding["lr"] = lr

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        if self.ti_steps == AUTO and self.lora_trains() and self.global_step >= self.switch_step + self.lora_steps:
            self.trainer.should_stop = True  # the LoRA phase is done
        if self.log_now:
            norm = torch.stack([p.detach().norm() for p in self.lora.parameters()]).norm()
            self.log("train/lora_norm", norm, batch_size=1)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["lit_ti_switch_step"] = self.switch_step  # auto: decided during the run, so resumed from here

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if self.ti_steps == AUTO:
            self.switch_step = checkpoint.get("lit_ti_switch_step")

    # ----------------------------------------------------------------- files
    def export(self, directory: Path, step: int, tag: str = "", formats=("pt", "safetensors")) -> list[Path]:
        """The embedding as textual inversion writes it (`<name><tag>.<fmt>`, for ComfyUI and A1111's embeddings
        folder), `<name><tag>-lora.safetensors` (kohya/A1111, the embedding bundled as `<name><tag>`) and
        `<name><tag>-lora-diffusers.safetensors` (diffusers' `load_lora_weights`)."""
        written = super().export(directory, step, tag, formats)
        meta = {
            "name": f"{self.name}{tag}",
            "step": step,
            "sd_checkpoint": self.backbone.checkpoint_hash,
            "sd_checkpoint_name": self.backbone.name,
        }
        stem = Path(directory) / f"{self.name}{tag}"
        kohya = lora.to_kohya(self.adapted, self.backbone.is_sdxl, self.lora_dtype)
        written.append(io.save_lora(f"{stem}{LORA_SUFFIX}", kohya, embeddings=self.concepts(tag), metadata=meta))
        layers = lora.to_diffusers(self.adapted, self.lora_dtype)
        configs = {model: config.to_dict() for model, config in self.configs.items()}
        written.append(io.save_diffusers_lora(f"{stem}{DIFFUSERS_SUFFIX}", layers, configs, metadata=meta))
        return written
