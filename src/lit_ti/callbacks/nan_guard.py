"""A non-finite loss or gradient never reaches the trained vectors (or any file written from them).

The seed guide's warning: one `Loss: nan` destroys an embedding, and A1111 then crashes at save. Here a bad
step is skipped (its gradients are dropped before the optimizer sees them), the trainable tensors are put back
to the last good values should they have gone non-finite anyway, and after `max_bad_steps` consecutive bad
steps training stops with one clear message, leaving the last good files.
"""

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from lit_ti.errors import check_period


class NanGuard(L.Callback):
    """Args:
    max_bad_steps: consecutive skipped steps after which training stops.
    """

    def __init__(self, max_bad_steps: int = 10) -> None:
        self.max_bad_steps = check_period("callbacks.nan_guard.max_bad_steps", max_bad_steps, low=1)
        self.bad = 0
        self.skipped = 0
        self.good: list[torch.Tensor] = []

    @staticmethod
    def _trainable(pl_module) -> list[torch.nn.Parameter]:
        return [p for p in pl_module.parameters() if p.requires_grad]

    def on_train_start(self, trainer, pl_module) -> None:
        self.good = [p.detach().clone() for p in self._trainable(pl_module)]

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        params = self._trainable(pl_module)
        tensors = params + [p.grad for p in params if p.grad is not None]
        if bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):  # one host sync per step
            self.bad = 0
            return
        self.bad += 1
        self.skipped += 1
        for p in params:
            p.grad = None  # the optimizer skips parameters without a gradient
        with torch.no_grad():
            for p, good in zip(params, self.good):
                p.copy_(good)
        rank_zero_warn(f"step {trainer.global_step + 1}: non-finite loss or gradient, step skipped")
        if self.bad >= self.max_bad_steps:
            trainer.should_stop = True
            rank_zero_warn(
                f"training stopped: {self.bad} consecutive steps had a non-finite loss or gradient; the files "
                "hold the last good vectors. Lower the learning rate or use 32-true precision "
                "(callbacks.nan_guard.max_bad_steps sets the patience)"
            )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.bad == 0 and self.good:
            with torch.no_grad():
                for p, good in zip(self._trainable(pl_module), self.good):
                    good.copy_(p)
