"""A progress bar a person can plan with: the whole run in optimizer steps, not the epoch.

Lightning's bar counts batches of the current epoch (`Epoch 37/-2 … 14/16`), which says nothing about a run
defined by `trainer.max_steps` over a folder of a few images. This one counts `global_step` against
`max_steps` (a resumed run starts where it stopped), shows the loss smoothed over recent steps and the speed
over a recent window, and tqdm's ETA for the whole run; after a few steps it prints one line with the run's
estimated total time.
"""

import sys
import time
from datetime import datetime, timedelta

from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

from lit_ti.callbacks.early_stop import EarlyStop


def _duration(seconds: float) -> str:
    minutes, s = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {s:02d} s" if minutes else f"{s} s"


class StepProgress(TQDMProgressBar):
    """Args:
    refresh_rate: redraw every N optimizer steps (the loss is read from the device only then).
    smoothing: weight of the newest step in the loss average and in tqdm's speed (0 = the whole run).
    estimate_after: print the run's estimated total time once this many steps have run (0 = never).
    """

    BAR = "step {n_fmt}/{total_fmt} |{bar}| {elapsed}<{remaining} ETA, {rate_fmt}{postfix}"

    def __init__(self, refresh_rate: int = 1, smoothing: float = 0.1, estimate_after: int = 20) -> None:
        if not 0 <= smoothing <= 1:
            raise ValueError(f"callbacks.progress.smoothing={smoothing}: use a weight in [0, 1]")
        super().__init__(refresh_rate=refresh_rate)
        self.smoothing = smoothing
        self.estimate_after = estimate_after
        self._loss = None  # running average on the loss's device: no host sync per step
        self._start: tuple[float, int] = (0.0, 0)
        self._estimated = False
        self._warm: tuple[float, int] | None = None

    def init_train_tqdm(self) -> Tqdm:
        # built with lit_ti's format: tqdm draws at construction, so a bar re-formatted afterwards leaves a
        # stray `Training: | | 0/?` line on the console
        return Tqdm(
            position=2 * self.process_position,
            disable=self.is_disabled,
            leave=True,
            dynamic_ncols=True,
            file=sys.stdout,
            smoothing=self.smoothing,
            bar_format=self.BAR,
        )

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps if trainer.max_steps > 0 else None)
        bar.initial = bar.n = trainer.global_step  # a resumed run continues the count
        self._start = (time.monotonic(), trainer.global_step)
        self._warm: tuple[float, int] | None = None

    def on_train_epoch_start(self, trainer, *_) -> None:
        pass  # one bar for the run: nothing to reset per epoch

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        pass

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:
            loss = loss.detach() * trainer.accumulate_grad_batches  # Lightning hands back loss / accumulation
            w = self.smoothing or 1 / (batch_idx + 1)
            self._loss = loss if self._loss is None else self._loss.lerp(loss, w)
        bar, step = self.train_progress_bar, trainer.global_step
        if bar is None or bar.disable or step == bar.n or not self._should_update(step, bar.total):
            return
        bar.update(step - bar.n)
        if self._loss is not None:
            bar.set_postfix(loss=f"{float(self._loss):.4f}", refresh=False)
        bar.refresh()
        self._estimate(trainer, step)

    def _estimate(self, trainer, step: int) -> None:
        if self._estimated or not self.estimate_after or trainer.max_steps <= 0:
            return
        done = step - self._start[1]
        if self._warm is None:
            if done >= self.estimate_after // 2:  # the first steps carry the warm-up: the rate is measured after
                self._warm = (time.monotonic(), step)
            return
        warm_time, warm_step = self._warm
        if done < self.estimate_after or step == warm_step:
            return
        self._estimated = True
        rate = (step - warm_step) / max(time.monotonic() - warm_time, 1e-9)
        left = (trainer.max_steps - step) / rate
        finish = (datetime.now() + timedelta(seconds=left)).strftime("%H:%M")
        message = (
            f"[lit_ti] {trainer.max_steps} steps at {rate:.2f} it/s: about {_duration(left)} to go (done near {finish})"
        )
        if any(isinstance(c, EarlyStop) for c in trainer.callbacks):
            message += "; early stopping (callbacks.early_stop) may end it sooner"
        self.train_progress_bar.write(message)
