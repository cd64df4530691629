"""Samples a step cannot train: no data may put a run into a crash loop.

A sample whose prompt lost the trained token (a template line without `[name]`, a caption that pushed it out)
gives the loss no path to the trained vectors; a batch of only such samples used to end training with
"element 0 of tensors does not require grad", at the same step again after every resume. Here such samples
are left out of the loss, and a step none of whose samples can train changes nothing (warned).
"""

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lit_ti.errors import quote


def select(batch: dict, keep: list[bool]) -> dict:
    """The batch's samples where `keep` is true: per-sample tensors and lists cut, everything else as is."""
    rows = [i for i, k in enumerate(keep) if k]
    out = {}
    for key, value in batch.items():
        if isinstance(value, Tensor) and value.dim() and value.shape[0] == len(keep):
            out[key] = value[torch.tensor(rows, dtype=torch.long, device=value.device)]
        elif isinstance(value, list | tuple) and len(value) == len(keep):
            out[key] = [value[i] for i in rows]
        else:
            out[key] = value
    return out


class UntrainedLedger:
    """Counts the left-out samples and skipped steps of a run, and warns the first time of each."""

    def __init__(self) -> None:
        self.samples = 0  # left out of the loss
        self.steps = 0  # optimizer steps that changed nothing
        self.trained_this_step = 0  # samples that reached the loss since the last optimizer step

    def left_out(self, prompts: list[str], keep: list[bool]) -> None:
        dropped = [p for p, k in zip(prompts, keep) if not k]
        if dropped and not self.samples:
            rank_zero_warn(
                f"{len(dropped)} sample(s) of a batch hold no trained token (e.g. {quote(dropped[0])}) and are left "
                "out of the loss; check data.template (every line needs [name]) and the captions"
            )
        self.samples += len(dropped)

    def step_skipped(self, step: int) -> None:
        if not self.steps:
            rank_zero_warn(
                f"step {step}: no sample of the batch holds the trained token, so the step changes nothing "
                "(skipped); check data.template (every line needs [name])"
            )
        self.steps += 1

    def summary(self) -> None:
        if self.samples or self.steps:
            rank_zero_warn(
                f"{self.samples} sample(s) without the trained token were left out of the loss over the run and "
                f"{self.steps} step(s) skipped"
            )


def zero_loss(params: list[Tensor]) -> Tensor:
    """A zero loss that still reaches every trained tensor: backward runs (all DDP ranks take part) and
    leaves zero gradients."""
    return sum((p * 0).sum() for p in params)
