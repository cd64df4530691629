"""A1111's learning-rate schedule strings, e.g. `"0.005:100, 1e-3:1000, 1e-5"`.

Each comma-separated part is `rate:end_step` or a bare `rate`. A rate applies while the number of completed
optimizer steps is below its end step; a bare rate (or end step -1) runs to `max_steps` and ends the list. An
end step written with a decimal point (`0.25`) is a fraction of `max_steps`, as the seed guide describes.
If the last part ends before `max_steps`, training stops there (A1111 behaviour).
"""

import math
import re

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from lit_ti.errors import UserError

_PART = re.compile(r"^\s*([^:\s]+)\s*(?::\s*([^:\s]+)\s*)?$")


def parse_schedule(text: str, max_steps: int, key: str = "method.lr_schedule") -> list[tuple[float, int]]:
    """`[(rate, end_step), ...]` with strictly increasing end steps, the last one <= max_steps."""
    if max_steps <= 0:
        raise UserError(f"trainer.max_steps={max_steps}: an LR schedule string needs a positive max_steps")
    pairs: list[tuple[float, int]] = []
    ends: list[float] = []
    for part in str(text).split(","):
        if not part.strip():
            continue
        match = _PART.match(part)
        if match is None:
            raise UserError(f"{key}={text!r}: cannot read {part.strip()!r}; write parts as rate or rate:step")
        rate_text, step_text = match.groups()
        try:
            rate = float(rate_text)
        except ValueError:
            raise UserError(f"{key}={text!r}: {rate_text!r} is not a learning rate") from None
        if not math.isfinite(rate) or rate < 0:
            raise UserError(f"{key}={text!r}: learning rate {rate_text!r} must be a finite number >= 0")
        end = _end_step(step_text, max_steps, text, key)
        if step_text is None or step_text.strip() == "-1":
            end = math.inf  # open-ended: runs to max_steps; A1111 ignores what follows
        if ends and ends[-1] < math.inf and end <= ends[-1]:
            raise UserError(f"{key}={text!r}: step {step_text} does not come after the previous part's step")
        if not ends or ends[-1] < max_steps:  # parts past max_steps are checked but never reached
            pairs.append((rate, int(min(end, max_steps))))
        ends.append(end)
    if not pairs:
        raise UserError(f"{key}={text!r} is empty; give at least one rate, e.g. '0.005'")
    return pairs


def _end_step(step_text: str | None, max_steps: int, text: str, key: str) -> int:
    if step_text is None or step_text.strip() == "-1":
        return max_steps
    try:
        value = float(step_text)
    except ValueError:
        raise UserError(f"{key}={text!r}: {step_text!r} is not a step number") from None
    if 0 < value <= 1 and ("." in step_text or "e" in step_text.lower()):
        return max(1, round(value * max_steps))  # a share of max_steps
    if value < 1 or value != int(value):
        raise UserError(f"{key}={text!r}: step {step_text} must be a positive integer, -1, or a fraction in (0, 1]")
    return int(value)


def rate_at(pairs: list[tuple[float, int]], step: int) -> float:
    """The scheduled rate after `step` completed optimizer steps (the last rate past the end)."""
    for rate, end in pairs:
        if step < end:
            return rate
    return pairs[-1][0]


def schedule_end(pairs: list[tuple[float, int]]) -> int:
    """The step at which the schedule runs out (training stops there)."""
    return pairs[-1][1]


def schedule_lambda(optimizer: Optimizer, pairs: list[tuple[float, int]]) -> LambdaLR:
    """A LambdaLR that follows the schedule in absolute rates.

    The factor is relative to each group's initial lr divided by the first group's, so a group created at
    `lr × w` (DreamArtist's negative embedding) keeps its weight `w` through every boundary.
    """
    base = optimizer.param_groups[0]["lr"]
    if base <= 0:
        raise UserError("method.optimizer.lr must be > 0 when an LR schedule string is used")
    return LambdaLR(optimizer, lambda step: rate_at(pairs, step) / base)
