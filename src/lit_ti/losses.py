"""Diffusion training losses as pure tensor functions."""

import torch
from diffusers import DDPMScheduler
from torch import Tensor


def diffusion_target(scheduler: DDPMScheduler, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    """What the UNet must predict: the noise (epsilon models) or the velocity v (v-prediction, SD2-768-v)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction type {kind!r}")


def diffusion_mse(pred: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """Mean squared error in fp32, optionally weighted per element (A1111's alpha-channel weighting).

    pred, target: [B, C, h, w] (any float dtype); weight broadcastable to them, or None.
    """
    err = (pred.float() - target.float()) ** 2
    if weight is not None:
        err = err * weight
    return err.mean()


def sample_timesteps(scheduler: DDPMScheduler, batch: int, device: torch.device) -> Tensor:
    """Uniform integer timesteps in [0, T) per sample, as the SD training recipe does."""
    return torch.randint(0, scheduler.config.num_train_timesteps, (batch,), device=device, dtype=torch.long)
