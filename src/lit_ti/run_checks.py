"""Config values no lit_ti constructor owns (the run's seed, Lightning's Trainer arguments), checked before
anything is built or written. Every other value is checked by the constructor that takes it."""

from omegaconf import DictConfig

from lit_ti.errors import MAX_PERIOD, check_choice, check_number, check_seed

MAX_ACCUMULATION = 1024  # micro-batches per optimizer step


def check_run(cfg: DictConfig) -> None:
    """One UserError naming the first out-of-range value among the top-level seed and `trainer.*`."""
    check_seed("seed", cfg.get("seed"))
    trainer = cfg.get("trainer") or {}
    key = "trainer."
    check_number(key + "max_steps", trainer.get("max_steps"), 1, MAX_PERIOD, integer=True, hint="optimizer steps")
    accumulate = trainer.get("accumulate_grad_batches", 1)
    check_number(key + "accumulate_grad_batches", accumulate, 1, MAX_ACCUMULATION, integer=True)
    check_number(key + "gradient_clip_val", trainer.get("gradient_clip_val"), 0, 1e6, optional=True, hint="0 = off")
    if trainer.get("gradient_clip_algorithm") is not None:
        check_choice(key + "gradient_clip_algorithm", trainer.get("gradient_clip_algorithm"), ("norm", "value"))
    check_number(key + "log_every_n_steps", trainer.get("log_every_n_steps", 50), 1, MAX_PERIOD, integer=True)
