"""Optimizers whose training weights are not the weights to use: schedule-free AdamW (Defazio et al., arXiv
2405.15682; the `schedulefree` package, `method.optimizer._target_=schedulefree.AdamWScheduleFree`).

It computes gradients at an interpolation y of its iterates and returns their average x: `optimizer.eval()`
puts x into the parameters, `optimizer.train()` puts y back, and a step taken in eval mode is refused. So
training starts in train mode (`start_training`), and everything that reads the trained weights between steps
(the exports, previews, `val/loss`, the toy evaluation) does so inside `evaluation_weights`.
"""

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from torch.optim import Optimizer


def schedule_free(optimizer: Optimizer) -> bool:
    """Whether `optimizer` comes from the `schedulefree` package (its groups carry `train_mode`)."""
    return type(optimizer).__module__.split(".")[0] == "schedulefree"


def start_training(optimizers: Iterable[Optimizer]) -> None:
    for optimizer in optimizers:
        if schedule_free(optimizer):
            optimizer.train()


@contextmanager
def evaluation_weights(optimizers: Iterable[Optimizer]) -> Iterator[None]:
    """While inside, schedule-free optimizers hold their average x in the parameters (nested calls are free)."""
    switched = [o for o in optimizers if schedule_free(o) and o.param_groups[0]["train_mode"]]
    for optimizer in switched:
        optimizer.eval()
    try:
        yield
    finally:
        for optimizer in switched:
            optimizer.train()
