"""The settings pivotal tuning checks before anything is built: each wrong value is one UserError naming its
key and a fix (`methods/pivotal.py` is the method)."""

from torch import nn

from lit_ti.errors import UserError, check_number
from lit_ti.methods.base import MAX_TIMESTEPS
from lit_ti.modules.text_conditioning import replace_names

AUTO = "auto"  # ti_steps: switch to the LoRA when callbacks.early_stop finds the embedding learned


def check_ti_steps(ti_steps) -> float | int | str:
    """`method.ti_steps`: whole steps, a share of the run in (0, 1), or `auto`."""
    if ti_steps == AUTO:
        return AUTO
    if isinstance(ti_steps, float) and not ti_steps.is_integer():
        return check_number("method.ti_steps", ti_steps, 0, 1, low_open=True, hint="or whole steps, or auto")
    return check_number("method.ti_steps", ti_steps, 0, 10**9, integer=True, hint="or a share in (0, 1), or auto")


def check_word(word, name: str) -> str | None:
    """`method.preservation_word`: null, or words that do not name the concept itself."""
    if word is None:
        return None
    if not isinstance(word, str) or replace_names(word, [name], "") != word.strip():
        raise UserError(
            f"method.preservation_word={word!r}: write the concept's class as plain words (e.g. person, dog), "
            f'without the concept\'s name {name!r}; "" drops the name, null turns the term off'
        )
    return word.strip()


def check_targets(targets) -> tuple[str, ...]:
    """`method.lora_targets` as a tuple of names, or one UserError."""
    names = [targets] if isinstance(targets, str) else list(targets or [])
    if not names or not all(isinstance(n, str) and n.strip(".") == n and n for n in names):
        raise UserError(
            f"method.lora_targets={targets!r}: write a list of UNet layer names, e.g. [to_q, to_k, to_v, to_out.0] "
            "or [attn2.to_k, attn2.to_v]"
        )
    return tuple(names)


def check_matches(unet: nn.Module, targets: tuple[str, ...]) -> None:
    """Each target must name at least one linear layer (peft's own check only fails when none matches at all)."""
    paths = [path for path, m in unet.named_modules() if isinstance(m, nn.Linear)]
    for target in targets:
        if not any(path == target or path.endswith(f".{target}") for path in paths):
            raise UserError(
                f"method.lora_targets: {target!r} names no linear layer of this UNet; "
                "use e.g. to_q, to_k, to_v, to_out.0, attn1.to_q or attn2.to_k"
            )


def check_lora_max_timestep(value, min_timestep: int) -> int | None:
    """`method.lora_max_timestep`: null, or a timestep above `method.min_timestep`."""
    value = check_number("method.lora_max_timestep", value, 1, MAX_TIMESTEPS, integer=True, optional=True)
    if value is not None and value <= min_timestep:
        raise UserError(f"method.lora_max_timestep={value}: must be above method.min_timestep={min_timestep}")
    return value
