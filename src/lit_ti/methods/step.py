"""The denoising step every method shares: cached latents -> noisy latents at a random timestep -> frozen
UNet conditioned on the method's text states -> MSE to the noise (or v, or flow) target.

A mixin of `DiffusionMethod` (`methods/base.py`), which sets the state it reads (`objective`,
`timestep_range`, `timestep_sampling`, `backbone`, `unet_dtype`, `compiled_unet`, `channels_last`, `untrained`,
`log_now`) and supplies `encode_prompts` (the contract) and Lightning's `log` and `trainer`. Methods change the
step only through the hooks below (the order is `training_step`'s docstring).
"""

import torch
from torch import Tensor

from lit_ti import losses
from lit_ti.methods.untrained import select, zero_loss
from lit_ti.modules.text_conditioning import Conditioning


class DenoisingStep:
    """`training_step` and its hooks; see the module docstring for what it expects of the class it joins."""

    def draw_noise(self, batch: dict, timestep_range: tuple[int, int] | None = None) -> tuple[Tensor, Tensor]:
        """Noise `[B, c, h, w]` and timesteps `[B]` for a batch, from its `noise_seed`s when the datamodule gives
        them, with the method's timestep density (`losses.draw_noise`) in `timestep_range` (default: the
        method's `[low, high)`)."""
        low, high = timestep_range or self.timestep_range
        return losses.draw_noise(batch["latents"], batch.get("noise_seed"), low, high, self.timestep_sampling)

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
