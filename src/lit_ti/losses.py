"""Diffusion training losses as pure tensor functions."""

import torch
from diffusers import DDPMScheduler
from torch import Tensor

from lit_ti.errors import UserError


def diffusion_target(scheduler: DDPMScheduler, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    """What the UNet must predict: the noise (epsilon models) or the velocity v (v-prediction, SD2-768-v)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction type {kind!r}")


def diffusion_mse(
    pred: Tensor, target: Tensor, weight: Tensor | None = None, sample_weight: Tensor | None = None
) -> Tensor:
    """Mean squared error in fp32, optionally weighted per element (A1111's alpha-channel weighting) and per
    sample (min-SNR-γ).

    pred, target: [B, C, h, w] (any float dtype); weight broadcastable to them, or None; sample_weight [B] or None.
    """
    err = (pred.float() - target.float()) ** 2
    if weight is not None:
        err = err * weight
    if sample_weight is not None:
        err = err * sample_weight.float().view(-1, *([1] * (err.dim() - 1)))
    return err.mean()


TIMESTEP_SAMPLING = ("uniform", "logit_normal", "cosine_map", "mode")
MODE_SCALE = 1.29  # SD3's "mode" density scale (Esser et al. 2024: close to cosine_map)


def map_timesteps(u: Tensor, low: int, high: int, kind: str) -> Tensor:
    """Integer timesteps in [low, high) from uniform draws `u` in [0, 1) `[B]`, by the density `kind`:

    * `uniform`: SD's recipe.
    * `logit_normal`: sigmoid of a standard normal (SD3's default, Esser et al. 2024): most draws mid-schedule,
      few at either end.
    * `cosine_map`: SD3's "cosmap", t = 1 − 1 / (tan(πu/2) + 1), also mid-heavy but with longer tails.
    * `mode`: SD3's mode sampling with scale s = 1.29, t = u + s·(cos²(πu/2) − 1 + u): mid-heavy.
    """
    u = u.double().clamp(1e-6, 1 - 1e-6)
    if kind == "logit_normal":
        x = torch.sigmoid(torch.special.ndtri(u))
    elif kind == "cosine_map":
        x = 1 - 1 / (torch.tan(u * torch.pi / 2) + 1)
    elif kind == "mode":
        x = (u + MODE_SCALE * (torch.cos(u * torch.pi / 2) ** 2 - 1 + u)).clamp(0, 1 - 1e-9)
    else:
        x = u
    return (low + (x * (high - low)).floor().long()).clamp(low, high - 1)


def sample_timesteps(batch: int, low: int, high: int, device: torch.device, kind: str = "uniform") -> Tensor:
    """Integer timesteps in [low, high) per sample (see `map_timesteps`); SD's recipe: uniform over [0, T)."""
    if kind == "uniform":
        return torch.randint(low, high, (batch,), device=device, dtype=torch.long)
    return map_timesteps(torch.rand(batch), low, high, kind).to(device)


def min_snr_weights(scheduler: DDPMScheduler, timesteps: Tensor, gamma: float) -> Tensor:
    """Min-SNR-γ loss weights `[B]` (Hang et al. 2023; kohya's `--min_snr_gamma`): min(SNR, γ) / SNR for epsilon
    models, min(SNR, γ) / (SNR + 1) for v-prediction (whose loss already carries a factor SNR + 1)."""
    alpha = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].double()
    snr = alpha / (1 - alpha)
    denominator = snr + 1 if scheduler.config.prediction_type == "v_prediction" else snr
    return (snr.clamp(max=gamma) / denominator).float()


def draw_noise(
    latents: Tensor, seeds: Tensor | None, low: int, high: int, kind: str = "uniform"
) -> tuple[Tensor, Tensor]:
    """Noise like `latents` `[B, 4, h, w]` and timesteps `[B]` in [low, high) with density `kind`.

    Drawn per sample from `seeds` (a CPU tensor `[B]`) when given, so they do not depend on the process or batch
    a sample lands in (DDP with N ranks equals one process with N× the batch); else from the global RNG.
    """
    if seeds is None:
        return torch.randn_like(latents), sample_timesteps(latents.shape[0], low, high, latents.device, kind)
    noise, timesteps = [], []
    for seed in seeds.tolist():  # a CPU tensor from the DataLoader: no device sync
        g = torch.Generator().manual_seed(seed)
        noise.append(torch.randn(latents.shape[1:], generator=g))
        if kind == "uniform":  # the draw every earlier run made
            timesteps.append(int(torch.randint(low, high, (), generator=g)))
        else:
            timesteps.append(int(map_timesteps(torch.rand(1, generator=g), low, high, kind)[0]))
    noise = torch.stack(noise).to(latents.device, latents.dtype, non_blocking=True)
    return noise, torch.tensor(timesteps, device=latents.device)


def fixed_draws(objective, latents: Tensor, draws: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """The same `draws` (noise, timestep) problems per image for every model and run: noisy latents and the
    target `[n, c, h, w]` and timesteps `[n]` (n = images × draws), stratified over the whole schedule."""
    g = torch.Generator().manual_seed(seed)
    n = latents.shape[0] * draws
    x0 = latents.repeat(draws, 1, 1, 1)
    noise = torch.randn(x0.shape, generator=g).to(x0)
    t = ((torch.arange(n) + torch.rand(n, generator=g)) / n * objective.num_timesteps).long()
    t = t[torch.randperm(n, generator=g)].to(x0.device)
    return objective.noisy(x0, noise, t), t, objective.target(x0, noise, t)


@torch.no_grad()
def denoising_loss(predict, objective, latents: Tensor, prompt: str, draws: int = 4, seed: int = 0) -> float:
    """Mean MSE to the model's target over `fixed_draws`: a denoising loss that is the same problem for every
    model and run (evaluation, validation).

    predict(noisy [n, c, h, w], t [n], batch) -> prediction: a method's `predict` (guided for DreamArtist).
    objective: the model's training objective (`lit_ti.objectives`: noising and target).
    """
    noisy, t, target = fixed_draws(objective, latents, draws, seed)
    pred = predict(noisy, t, {"prompt": [prompt] * len(t)})
    return float(((pred.float() - target.float()) ** 2).mean())


# ----------------------------------------------------------------------------- flow matching (SD3)
FLOW_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")


def flow_sigmas(num_timesteps: int, shift: float) -> Tensor:
    """σ for each integer timestep `[T]`, ascending: SD3's shifted schedule σ = s·u / (1 + (s − 1)·u) at
    u = (t + 1) / T (what `FlowMatchEulerDiscreteScheduler` tabulates, in reverse)."""
    u = torch.arange(1, num_timesteps + 1, dtype=torch.float64) / num_timesteps
    return shift * u / (1 + (shift - 1) * u)


def flow_weights(sigmas: Tensor, kind: str) -> Tensor | None:
    """SD3's per-sample loss weights `[B]` (diffusers' `compute_loss_weighting_for_sd3`): `none` (SD3's own
    recipe, the density of `logit_normal` sampling does the weighting), `sigma_sqrt` (σ⁻²) or `cosmap`
    (2 / (π(1 − 2σ + 2σ²)))."""
    if kind == "sigma_sqrt":
        return (sigmas.double() ** -2).float()
    if kind == "cosmap":
        return (2 / (torch.pi * (1 - 2 * sigmas.double() + 2 * sigmas.double() ** 2))).float()
    return None


# ----------------------------------------------------------------------------- DreamArtist
CFG_RAMPS = ("ln", "cos", "cos2", "sqrt")


def parse_cfg(spec: str | float, key: str = "method.cfg_scale") -> tuple[float, float, str]:
    """DreamArtist's training guidance: `w`, `lo-hi` or `lo-hi:ramp` -> (lo, hi, ramp).

    The ramp runs from lo at t = 0 to hi at t = T-1: `ln` (linear, the default), `cos` (sin(πu/2)), `cos2`
    (1 - cos(πu/2)), `sqrt`. The original `eval`s any other suffix as Python; we refuse it instead.
    """
    if isinstance(spec, int | float):
        return float(spec), float(spec), "ln"
    text, _, ramp = str(spec).strip().partition(":")
    ramp = ramp.strip() or "ln"
    if ramp not in CFG_RAMPS:
        raise UserError(f"{key}={spec!r}: unknown ramp {ramp!r}; use one of {', '.join(CFG_RAMPS)}")
    try:
        parts = [float(p) for p in text.split("-")]
    except ValueError:
        raise UserError(f"{key}={spec!r}: write a number (3.0) or a range lo-hi[:ramp] (1.5-3.0:cos)") from None
    if len(parts) not in (1, 2):
        raise UserError(f"{key}={spec!r}: write a number (3.0) or a range lo-hi[:ramp] (1.5-3.0:cos)")
    return parts[0], parts[-1], ramp


def cfg_weights(lo: float, hi: float, ramp: str, timesteps: Tensor, num_train_timesteps: int) -> Tensor:
    """Per-sample guidance w(t) `[B]` (the original broadcast it wrongly for batch > 1)."""
    u = timesteps.float() / (num_train_timesteps - 1)  # [B] in [0, 1]
    if ramp == "cos":
        r = torch.sin(u * torch.pi / 2)
    elif ramp == "cos2":
        r = 1 - torch.cos(u * torch.pi / 2)
    elif ramp == "sqrt":
        r = u.sqrt()
    else:
        r = u
    return lo + (hi - lo) * r


def guided(pred_neg: Tensor, pred_pos: Tensor, w: Tensor) -> Tensor:
    """Classifier-free guidance inside the loss: ε̂ = ε_neg + w·(ε_pos − ε_neg); `w` is `[B]`.

    So dL/dε_pos = w·g and dL/dε_neg = (1 − w)·g for g = dL/dε̂: with w > 1 the negative is pushed the
    other way, and only the guided combination has to match the target.
    """
    w = w.to(pred_pos.dtype).view(-1, *([1] * (pred_pos.dim() - 1)))
    return pred_neg + w * (pred_pos - pred_neg)


def predicted_x0(scheduler: DDPMScheduler, noisy: Tensor, pred: Tensor, timesteps: Tensor) -> Tensor:
    """The clean latent implied by a prediction at `timesteps` (epsilon or v). All `[B, 4, h, w]`."""
    alpha = scheduler.alphas_cumprod.to(noisy.device)[timesteps].float().view(-1, 1, 1, 1)
    noisy, pred = noisy.float(), pred.float()
    if scheduler.config.prediction_type == "v_prediction":
        return alpha.sqrt() * noisy - (1 - alpha).sqrt() * pred
    return (noisy - (1 - alpha).sqrt() * pred) / alpha.sqrt()


def reconstruction_l1(decoded: Tensor, pixels: Tensor) -> Tensor:
    """DreamArtist's pixel reconstruction term: mean |x − D(x̂0)|, both `[B, 3, H, W]` in [-1, 1]."""
    return (decoded.float() - pixels.float()).abs().mean()
