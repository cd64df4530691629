"""Stop when learned: end training once the deterministic validation loss has stopped falling.

DVAR (Voronov et al., arXiv 2302.04841): the training loss of textual inversion is mostly noise (each step draws
other noise and timesteps), but a loss measured on fixed (noise, timestep) draws falls smoothly and then
flattens. DVAR stops when the variance of its last `window` values is a small share (`ratio`) of the variance of
all values so far. On its own that test also fires on a loss still falling in a straight line (the variance of
the last few points of a line shrinks against the whole), so here the window must also show no descent larger
than its own scatter: the least-squares drop over the window is below twice the residual standard deviation.

The run ends with the vectors of the step where it stopped (the last step, as for a run that reached
max_steps): on a plateau they score like the best measured step, and a final step needs no extra files.
"""

import torch
from lightning.pytorch.utilities import rank_zero_info

from lit_ti.callbacks.val_loss import ValidationLoss
from lit_ti.errors import check_number, check_period


def plateau(values: list[float], window: int, ratio: float) -> bool:
    """Whether a series of loss values has flattened (the DVAR test plus the no-descent test above)."""
    if len(values) < 2 * window:
        return False
    series = torch.tensor(values, dtype=torch.float64)
    recent = series[-window:]
    total_var = float(series.var())
    if total_var == 0 or float(recent.var()) / total_var >= ratio:
        return total_var == 0
    x = torch.arange(window, dtype=torch.float64)
    slope = float(((x - x.mean()) * (recent - recent.mean())).sum() / ((x - x.mean()) ** 2).sum())
    residual = recent - (recent.mean() + slope * (x - x.mean()))
    return -slope * (window - 1) < 2 * float(residual.std())


class EarlyStop(ValidationLoss):
    """Measures `val/loss` every `every_n_steps` steps (as callbacks.val_loss) and stops on a plateau.

    Args (besides ValidationLoss's):
        window: measurements in the rolling window.
        ratio: DVAR's threshold on var(window) / var(all measurements).
        min_steps: never stop before this step.
    """

    key = "callbacks.early_stop"

    def __init__(
        self,
        dir: str | None = None,
        draws: int = 4,
        every_n_steps: int = 10,
        seed: int = 0,
        window: int = 6,
        ratio: float = 0.15,
        min_steps: int = 60,
    ) -> None:
        super().__init__(dir, draws, every_n_steps, seed)
        if self.every_n_steps is None:
            self.every_n_steps = 10  # a stop needs measurements during training
        self.window = check_number("callbacks.early_stop.window", window, 2, 10_000, integer=True)
        self.ratio = check_number("callbacks.early_stop.ratio", ratio, 0, 1, low_open=True)
        self.min_steps = check_period("callbacks.early_stop.min_steps", min_steps, low=0)
        self.values: list[float] = []
        self.reason: str | None = None

    def measure(self, trainer, pl_module) -> float:
        value = super().measure(trainer, pl_module)
        if trainer.training and not trainer.should_stop:
            self.values.append(value)
            step = trainer.global_step
            if step >= self.min_steps and plateau(self.values, self.window, self.ratio):
                self.reason = (
                    f"early stop at step {step}: val/loss {value:.5f} has flattened (the variance of its last "
                    f"{self.window} measurements is under {self.ratio:g} of all {len(self.values)}, with no descent "
                    "beyond their scatter); the files hold this step's vectors"
                )
                trainer.should_stop = True
                rank_zero_info(f"[lit_ti] {self.reason}")
        return value

    def state_dict(self) -> dict:
        return {"values": list(self.values)}  # a resumed run keeps its history

    def load_state_dict(self, state_dict: dict) -> None:
        self.values = list(state_dict.get("values", []))

    def on_train_end(self, trainer, pl_module) -> None:
        pass  # callbacks.val_loss measures the end; this one only decides when it is
