"""What training asks of the frozen denoiser: how clean latents are noised at an integer timestep, what the
denoiser must predict, the time value it is given, and per-sample loss weights.

`DiffusionMethod.shared_step` runs the same code for every model through an `Objective`:
* `Denoising` (SD1.x/SD2.x/SDXL): DDPM noising, ε or v target, min-SNR-γ weights.
* `FlowMatching` (SD3/SD3.5): rectified flow, x_t = (1 − σ)·x0 + σ·noise, target noise − x0 (the velocity),
  σ from SD3's shifted schedule at the timestep, the denoiser given σ·1000, SD3's optional loss weightings.

Timesteps are integers in [0, T) everywhere (T = 1000), so `min_timestep`, `max_timestep` and
`timestep_sampling` mean the same for both: a higher timestep is a noisier latent.
"""

from abc import ABC, abstractmethod

from diffusers import FlowMatchEulerDiscreteScheduler
from torch import Tensor

from lit_ti import losses
from lit_ti.errors import UserError


class Objective(ABC):
    """The training objective of one model. Shapes: latents, noise and predictions `[B, c, h, w]`, timesteps
    `[B]` integers in [0, num_timesteps)."""

    num_timesteps: int

    @abstractmethod
    def noisy(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """The noised latents the denoiser sees."""

    @abstractmethod
    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What the denoiser must predict."""

    @abstractmethod
    def model_time(self, t: Tensor) -> Tensor:
        """The time value the denoiser takes for timesteps `t`."""

    @abstractmethod
    def weights(self, t: Tensor) -> Tensor | None:
        """Per-sample loss weights `[B]`, or None for equal weights."""

    @abstractmethod
    def x0(self, noisy: Tensor, pred: Tensor, t: Tensor) -> Tensor:
        """The clean latents a prediction implies (DreamArtist's reconstruction)."""


class Denoising(Objective):
    """DDPM (SD1.x/SD2.x/SDXL): the scheduler's noising, ε or v target, optional min-SNR-γ weights."""

    def __init__(self, scheduler, min_snr_gamma: float | None = None) -> None:
        self.scheduler = scheduler
        self.min_snr_gamma = min_snr_gamma
        self.num_timesteps = scheduler.config.num_train_timesteps

    def noisy(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        return self.scheduler.add_noise(x0, noise, t)

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        return losses.diffusion_target(self.scheduler, x0, noise, t)

    def model_time(self, t: Tensor) -> Tensor:
        return t

    def weights(self, t: Tensor) -> Tensor | None:
        return None if self.min_snr_gamma is None else losses.min_snr_weights(self.scheduler, t, self.min_snr_gamma)

    def x0(self, noisy: Tensor, pred: Tensor, t: Tensor) -> Tensor:
        return losses.predicted_x0(self.scheduler, noisy, pred, t)


class FlowMatching(Objective):
    """Rectified flow as SD3 trains (Esser et al. 2024; diffusers' `train_dreambooth_sd3.py`)."""

    def __init__(self, scheduler: FlowMatchEulerDiscreteScheduler, weighting: str = "none") -> None:
        self.num_timesteps = scheduler.config.num_train_timesteps
        self.sigmas = losses.flow_sigmas(self.num_timesteps, scheduler.config.shift).float()  # [T], ascending
        self.weighting = weighting

    def sigma(self, t: Tensor, like: Tensor) -> Tensor:
        """σ per sample, shaped to broadcast over `like` `[B, 1, 1, 1]`."""
        return self.sigmas.to(t.device)[t].to(like.dtype).view(-1, *([1] * (like.dim() - 1)))

    def noisy(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        sigma = self.sigma(t, x0)
        return (1 - sigma) * x0 + sigma * noise

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        return noise - x0

    def model_time(self, t: Tensor) -> Tensor:
        return self.sigmas.to(t.device)[t] * self.num_timesteps  # what SD3's pipeline passes: σ·1000

    def weights(self, t: Tensor) -> Tensor | None:
        return losses.flow_weights(self.sigmas.to(t.device)[t], self.weighting)

    def x0(self, noisy: Tensor, pred: Tensor, t: Tensor) -> Tensor:
        return noisy.float() - self.sigma(t, noisy).float() * pred.float()


def build(scheduler, min_snr_gamma: float | None, flow_weighting: str) -> Objective:
    """The objective of the model whose training scheduler is `scheduler` (a flow-matching one for SD3)."""
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        if min_snr_gamma is not None:
            raise UserError(
                "method.min_snr_gamma: min-SNR weighting is for DDPM models; this is a flow-matching model (SD3), "
                "use method.flow_weighting instead and set min_snr_gamma=null"
            )
        return FlowMatching(scheduler, flow_weighting)
    if flow_weighting != "none":
        raise UserError(
            f"method.flow_weighting={flow_weighting}: it weights flow-matching models (SD3) only; set it to none"
        )
    return Denoising(scheduler, min_snr_gamma)
