"""A run that does not learn says so: the silent failure users report most (a zero or tiny learning rate, a
token the prompts never hold, a frozen tensor), found out only from the files after hours.

Every `every_n_steps` steps the trained tensors are compared with the previous check: when they have not moved
(relative change under `min_change`) or no gradient reached them, a warning names the likely causes and
TensorBoard gets `train/not_learning` = 1 (0 on a healthy check) and a text note at that step.
"""

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn

from lit_ti.errors import check_number, check_period


class LearningGuard(L.Callback):
    """Args:
    every_n_steps: steps between checks (the first at this step).
    min_change: the relative change ||θ − θ_prev|| / ||θ_prev|| below which the tensors count as not moving.
    """

    def __init__(self, every_n_steps: int = 50, min_change: float = 1e-4) -> None:
        self.every_n_steps = check_period("callbacks.learning_guard.every_n_steps", every_n_steps, low=1)
        self.min_change = check_number("callbacks.learning_guard.min_change", min_change, 0, 1)
        self.previous: list[torch.Tensor] = []
        self.grad_seen = False
        self.warnings = 0

    @staticmethod
    def _trainable(pl_module) -> list[torch.nn.Parameter]:
        return [p for p in pl_module.parameters() if p.requires_grad]

    def on_train_start(self, trainer, pl_module) -> None:
        self.previous = [p.detach().clone() for p in self._trainable(pl_module)]

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self.grad_seen:  # one host sync per step until a gradient is seen, none after
            grads = [p.grad for p in self._trainable(pl_module) if p.grad is not None]
            self.grad_seen = bool(grads) and bool(torch.stack([g.abs().sum() for g in grads]).sum() > 0)

    def change(self, pl_module) -> float:
        """Relative change of all trained tensors since the last check."""
        params = self._trainable(pl_module)
        moved = sum(float((p.detach() - q).norm() ** 2) for p, q in zip(params, self.previous)) ** 0.5
        size = sum(float(q.norm() ** 2) for q in self.previous) ** 0.5
        return moved / size if size > 0 else moved

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == 0 or step % self.every_n_steps or not self.previous:
            return
        change = self.change(pl_module)
        stalled = change < self.min_change or not self.grad_seen
        if stalled:
            self.warnings += 1
            cause = "no gradient reached the trained tensors" if not self.grad_seen else "they have not moved"
            message = (
                f"step {step}: not learning: {cause} (relative change {change:.2e} over the last "
                f"{self.every_n_steps} steps). Check method.optimizer.lr (and the LR schedule), and that the "
                "prompts hold the trained token (data.template)"
            )
            rank_zero_warn(message)
        for logger in trainer.loggers:
            logger.log_metrics({"train/not_learning": float(stalled)}, step=step)
            if stalled and isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("train/not_learning", message, step)
        self.previous = [p.detach().clone() for p in self._trainable(pl_module)]
        self.grad_seen = False
