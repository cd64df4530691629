"""Stop when learned: end training once the deterministic validation loss has stopped falling and, optionally,
the trained tensors have stopped travelling.

DVAR (Voronov et al., arXiv 2302.04841): the training loss of textual inversion is mostly noise (each step draws
other noise and timesteps), but a loss measured on fixed (noise, timestep) draws falls smoothly and then
flattens. DVAR stops when the variance of its last `window` values is a small share (`ratio`) of the variance of
all values so far. On its own that test also fires on a loss still falling in a straight line (the variance of
the last few points of a line shrinks against the whole), so here the window must also show no descent larger
than its own scatter: the least-squares drop over the window is below twice the residual standard deviation.

A flat loss is not a settled token: on the toy world a token can drift between two colours (an orange and a
yellow cross) that score almost the same loss, and stop on the wrong one. `max_drift` adds the same kind of test
for the tensors themselves: over the last `drift_window` measurements, their net change against the
root-sum-square of their changes between measurements (`drift`). A tensor still travelling in one
direction scores √drift_window; one that only jitters around a point (Adam at a constant rate never stands
still) scores about 1 or less. The ratio has no unit, so it does not depend on the learning rate, the model or
the method. A longer drift window than the loss's tells slow travel from jitter more surely (docs/results.md).

The run ends with the tensors of the step where it stopped (the last step, as for a run that reached
max_steps): on a plateau they score like the best measured step, and a final step needs no extra files.
With `cooldown_steps`, the verdict does not end the run at once: it goes on for that many steps at
`cooldown_factor` × its learning rate, and the files hold the tensors at the end of that. A constant rate keeps
Adam's steps as large at the plateau as at the start, so the tensors jitter around where they settled; a short
low-rate phase at the end is the cooldown of warmup-stable-decay schedules (Hägele et al., arXiv 2405.18392),
which recovers what a decaying schedule gets without fixing the run's length in advance (docs/results.md).
"""

from collections import deque

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


def drift(snapshots: list[torch.Tensor]) -> float:
    """Net change over a run of flat snapshots (`[n]` each) against the root-sum-square of the changes between
    them: √(len − 1) for a straight path, about 1 for a random walk, 0 when nothing moved."""
    steps = torch.stack(snapshots).double().diff(dim=0)  # [len − 1, n]
    jitter = float(steps.norm(dim=1).pow(2).sum().sqrt())
    return float(steps.sum(dim=0).norm()) / jitter if jitter > 0 else 0.0


def learned(
    values: list[float],
    snapshots: list[torch.Tensor],
    window: int,
    ratio: float,
    max_drift: float | None = None,
    drift_window: int | None = None,
) -> bool:
    """The stop rule: the loss `values` are on a plateau and, when `max_drift` is set, the last
    `drift_window` (default `window`) + 1 `snapshots` of the trained tensors drift less than it."""
    n = (drift_window or window) + 1
    if max_drift is not None and (len(snapshots) < n or drift(snapshots[-n:]) >= max_drift):
        return False
    return plateau(values, window, ratio)


class EarlyStop(ValidationLoss):
    """Measures `val/loss` every `every_n_steps` steps (as callbacks.val_loss) and stops on a plateau.

    Args (besides ValidationLoss's):
        window: measurements in the rolling window.
        ratio: DVAR's threshold on var(window) / var(all measurements).
        min_steps: never stop before this step.
        max_drift: also require the trained tensors' drift (see the module) below this; null = the loss alone
            decides. Between 1 (jitter) and √drift_window (a straight path).
        drift_window: measurements the drift is taken over; null = `window`.
        cooldown_steps: once learned, train this many more steps at the lower rate before ending; 0 = end at once.
        cooldown_factor: the cooldown's learning rate as a share of the rate at the verdict (every param group).
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
        max_drift: float | None = None,
        drift_window: int | None = None,
        cooldown_steps: int = 0,
        cooldown_factor: float = 0.1,
    ) -> None:
        super().__init__(dir, draws, every_n_steps, seed)
        if self.every_n_steps is None:
            self.every_n_steps = 10  # a stop needs measurements during training
        self.window = check_number("callbacks.early_stop.window", window, 2, 10_000, integer=True)
        self.ratio = check_number("callbacks.early_stop.ratio", ratio, 0, 1, low_open=True)
        self.min_steps = check_period("callbacks.early_stop.min_steps", min_steps, low=0)
        if max_drift is not None:
            max_drift = check_number("callbacks.early_stop.max_drift", max_drift, 0, 100, low_open=True)
        self.max_drift = max_drift
        if drift_window is not None:
            drift_window = check_number("callbacks.early_stop.drift_window", drift_window, 2, 10_000, integer=True)
        self.drift_window = drift_window or self.window
        self.cooldown_steps = check_period("callbacks.early_stop.cooldown_steps", cooldown_steps, low=0)
        self.cooldown_factor = check_number("callbacks.early_stop.cooldown_factor", cooldown_factor, 0, 1)
        self.cooldown_from: int | None = None  # the verdict's step, once a cooldown runs
        self.lowered: dict[str, float] = {}  # "optimizer.group" -> the rate this callback set
        self.values: list[float] = []
        # flat CPU copies of the trained tensors at the last drift_window + 1 measurements; not checkpointed (a
        # hypernetwork's would weigh that many times its size), so after a resume the drift test waits for them
        self.snapshots: deque[torch.Tensor] = deque(maxlen=self.drift_window + 1)
        self.reason: str | None = None
        self.handed_over = False  # a verdict was given (`DiffusionMethod.learned`)

    def stops(self, snapshots: list[torch.Tensor]) -> bool:
        return learned(self.values, snapshots, self.window, self.ratio, self.max_drift, self.drift_window)

    def measure(self, trainer, pl_module) -> float:
        value = super().measure(trainer, pl_module)
        if trainer.training and not trainer.should_stop:
            self.values.append(value)
            if self.max_drift is not None:
                with pl_module.as_exported():  # what the files hold (DreamArtist: the EMA pair)
                    flat = torch.cat([p.detach().float().flatten().cpu() for p in pl_module.trainable()])
                self.snapshots.append(flat)
            snapshots = list(self.snapshots)
            step = trainer.global_step
            if step >= self.min_steps and self.stops(snapshots):
                moved = ""
                if self.max_drift is not None:
                    moved = f" and the trained tensors drift {drift(snapshots):.2f} < {self.max_drift:g}"
                why = (
                    f"val/loss {value:.5f} has flattened (the variance of its last {self.window} measurements "
                    f"is under {self.ratio:g} of all {len(self.values)}, with no descent beyond their scatter)" + moved
                )
                self.handed_over = True
                if not pl_module.learned(step):
                    rank_zero_info(f"[lit_ti] learned at step {step}: {why}; the method's next phase starts")
                elif self.cooldown_steps:
                    self.cooldown_from = step
                    self.reason = f"early stop at step {step}: {why}; {self.cooled()}"
                    rank_zero_info(
                        f"[lit_ti] learned at step {step}: {why}; {self.cooldown_steps} more steps at "
                        f"{self.cooldown_factor:g} x the learning rate"
                    )
                else:
                    self.reason = f"early stop at step {step}: {why}; the files hold this step's tensors"
                    trainer.should_stop = True
                    rank_zero_info(f"[lit_ti] {self.reason}")
        return value

    def cooled(self) -> str:
        end = self.cooldown_from + self.cooldown_steps
        rate = f"{self.cooldown_factor:g} x the learning rate"
        return f"then {self.cooldown_steps} steps at {rate}; the files hold step {end}'s tensors"

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.cooldown_from is None:
            return
        # every param group at cooldown_factor x the rate it would have: a rate a scheduler has set since the
        # last batch (not the one this callback left) is lowered again; one this callback set is left alone
        for i, optimizer in enumerate(trainer.optimizers):
            for j, group in enumerate(optimizer.param_groups):
                if self.lowered.get(f"{i}.{j}") != group["lr"]:
                    group["lr"] *= self.cooldown_factor
                    self.lowered[f"{i}.{j}"] = group["lr"]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.cooldown_from is not None:
            if trainer.global_step >= self.cooldown_from + self.cooldown_steps and not trainer.should_stop:
                trainer.should_stop = True
                rank_zero_info(f"[lit_ti] {self.reason}")
        elif not self.handed_over:  # once the method took a verdict as the end of a phase, it needs no more
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def state_dict(self) -> dict:  # a resumed run keeps its history, and a cooldown its lowered rates
        return {
            "values": list(self.values),
            "handed_over": self.handed_over,
            "cooldown_from": self.cooldown_from,
            "lowered": dict(self.lowered),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.values = list(state_dict.get("values", []))
        self.handed_over = bool(state_dict.get("handed_over", False))
        self.cooldown_from = state_dict.get("cooldown_from")
        self.lowered = dict(state_dict.get("lowered", {}))
        if self.cooldown_from is not None:  # resumed inside the cooldown: the summary still says why it ends
            self.reason = f"early stop at step {self.cooldown_from} (before the resume); {self.cooled()}"

    def on_train_end(self, trainer, pl_module) -> None:  # callbacks.val_loss measures the end, not this one
        if self.cooldown_from is not None and trainer.global_step < self.cooldown_from + self.cooldown_steps:
            self.reason = (
                f"learned at step {self.cooldown_from}; the cooldown at {self.cooldown_factor:g} x the learning "
                f"rate ended early at step {trainer.global_step} (trainer.max_steps or a stop)"
            )
