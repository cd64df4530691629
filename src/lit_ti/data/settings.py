"""Up-front checks of the data settings: one `error:` line per mistake, naming the key and the fix.

Settings that size allocations have upper bounds, so a typo (`data.repeats=1000000`) fails at once instead of
exhausting memory after minutes of encoding.
"""

from lit_ti.errors import UserError

LATENT_SAMPLING = ("once", "deterministic", "random")
MAX_SIDE = 4096  # pixels: beyond any SD model's training size (SDXL: 1024)
MAX_BATCH = 1024
MAX_REPEATS = 10_000
MAX_SAMPLES = 10_000_000  # images × repeats per epoch: the epoch's order is held in memory


def _int_in(key: str, value, low: int, high: int, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise UserError(f"data.{key}={value!r}: use a whole number from {low} to {high}{fix}")


def validate(a: dict) -> None:
    """Checks the ConceptDataModule's constructor arguments `a` (its `locals()`)."""
    if a["latent_sampling"] not in LATENT_SAMPLING:
        raise UserError(f"data.latent_sampling={a['latent_sampling']!r}: use one of {', '.join(LATENT_SAMPLING)}")
    if a["crop"] not in ("center", "squash"):
        raise UserError(f"data.crop={a['crop']!r}: use 'center' or 'squash'")
    if a["resolution"] is not None:
        _int_in("resolution", a["resolution"], 8, MAX_SIDE, ", a multiple of 8 (the VAE's downscale), or null")
        if a["resolution"] % 8:
            raise UserError(f"data.resolution={a['resolution']}: use a multiple of 8 (the VAE's downscale), or null")
    _int_in("batch_size", a["batch_size"], 1, MAX_BATCH, " (use trainer.accumulate_grad_batches for more)")
    _int_in("repeats", a["repeats"], 1, MAX_REPEATS, "")
    _int_in("num_workers", a["num_workers"], 0, 256, "")
    _int_in("keep_tokens", a["keep_tokens"], 0, 1000, "")
    if not 0 <= a["flip_p"] <= 1 or not 0 <= a["tag_dropout"] < 1:
        raise UserError("data.flip_p must lie in [0, 1] and data.tag_dropout in [0, 1)")
    _int_in("bucket_step", a["bucket_step"], 8, 1024, ", a multiple of 8")
    if a["bucket_step"] % 8:
        raise UserError(f"data.bucket_step={a['bucket_step']}: use a multiple of 8 (the VAE's downscale)")
    if a["prior_prompt"] is not None and not isinstance(a["prior_prompt"], str):
        raise UserError(f"data.prior_prompt={a['prior_prompt']!r}: write the prompt as text, or null")
    for key in ("bucket_min_side", "bucket_max_side"):
        if a[key] is not None:
            _int_in(key, a[key], 8, MAX_SIDE, " (a multiple of data.bucket_step), or null")


def check_samples(images: int, repeats: int) -> None:
    if images * repeats > MAX_SAMPLES:
        raise UserError(
            f"data.repeats={repeats}: {images} images × {repeats} repeats = {images * repeats} samples per epoch, "
            f"more than {MAX_SAMPLES}; lower data.repeats (an epoch need not cover many repeats)"
        )
