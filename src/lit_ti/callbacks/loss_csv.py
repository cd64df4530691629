"""A1111's `textual_inversion_loss.csv`: `step,epoch,epoch_step,loss,learn_rate` per optimizer step."""

import csv
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from lit_ti.errors import UserError, check_period
from lit_ti.io.atomic import atomic_path
from lit_ti.io.paths import WriteFailed, inside, write_failed


class LossCSV(L.Callback):
    """Appends one row every `every_n_steps` optimizer steps; `loss` is the mean over the step's micro-batches.

    The loss stays a device tensor until a row is written, so there is no host sync on other steps. A row the
    system refuses to write (disk full, read-only) is a warning (once, until writing works again), not a stop.
    """

    def __init__(self, dirpath: str, filename: str = "textual_inversion_loss.csv", every_n_steps: int = 1):
        if not isinstance(filename, str) or Path(filename).name != filename or filename in ("", ".", ".."):
            raise UserError(f"callbacks.loss_csv.filename={filename!r}: a file name, without folders")
        self.path = Path(dirpath) / filename
        self.every_n_steps = check_period("callbacks.loss_csv.every_n_steps", every_n_steps, low=1)
        self.total: torch.Tensor | None = None
        self.count = 0
        self.last_step = 0
        self.lr = 0.0
        self.failing = False

    @rank_zero_only
    def on_train_start(self, trainer, pl_module) -> None:
        # a resumed run replays the steps after its checkpoint: drop the rows the killed run wrote for them (a
        # fresh run drops all: what is there is from a run killed before its first checkpoint)
        if self.path.is_file():
            lines = self.path.read_text().splitlines(keepends=True)
            keep = lines[:1] + [row for row in lines[1:] if _step(row) <= trainer.global_step]
            if len(keep) < len(lines):
                try:
                    with atomic_path(self.path) as tmp:
                        tmp.write_text("".join(keep))
                except WriteFailed as e:
                    self._warn(e)
        self.last_step = trainer.global_step

    @rank_zero_only
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lr = trainer.optimizers[0].param_groups[0]["lr"]  # the rate this step uses (schedulers step after)

    @rank_zero_only
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.total = loss.detach() if self.total is None else self.total + loss.detach()
        self.count += 1
        step = trainer.global_step
        if step == self.last_step:  # still accumulating gradients
            return
        self.last_step = step
        if step % self.every_n_steps == 0:
            self._write(trainer, step, float(self.total) / self.count)
        self.total, self.count = None, 0

    def _write(self, trainer, step: int, loss: float) -> None:
        steps_per_epoch = max(1, trainer.num_training_batches // trainer.accumulate_grad_batches)
        path = inside(self.path)  # appended to, not renamed into place: checked here as atomic_path does
        row = [step, (step - 1) // steps_per_epoch, (step - 1) % steps_per_epoch, f"{loss:.7f}", self.lr]
        try:
            new = not path.exists()
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", newline="") as f:
                writer = csv.writer(f)
                if new:
                    writer.writerow(["step", "epoch", "epoch_step", "loss", "learn_rate"])
                writer.writerow(row)
            self.failing = False
        except OSError as e:
            self._warn(write_failed(path, e))

    def _warn(self, error: WriteFailed) -> None:
        if not self.failing:
            rank_zero_warn(f"{error}. Training goes on; loss rows are missing until writing works again")
        self.failing = True


def _step(row: str) -> float:
    """The step of a CSV row; a torn last row (no newline) counts as past every step."""
    head = row.split(",", 1)[0]
    return int(head) if row.endswith("\n") and head.isdigit() else float("inf")
