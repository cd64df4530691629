"""Aspect-ratio buckets (kohya sd-scripts' scheme): training sizes of about one pixel area, sides multiples of
a step, so that portrait and landscape images train whole instead of center-cropped to a square.

The sizes: the square `resolution` (rounded down to the step), and for every width w from `min_side` to
`max_side` in steps, (w, h) and (h, w) with h = area / w rounded down to the step and capped at `max_side`,
kept when h >= `min_side`. Each image goes to the bucket whose aspect ratio is nearest its own (its exact size
when that is a bucket; nearest as a ratio, see `nearest`), is scaled to cover it and center-cropped by what the aspect rounding leaves over.
A batch is drawn from one bucket (see sampler.EpochSampler).
"""

import math

from lit_ti.errors import UserError

Size = tuple[int, int]  # (width, height) in pixels


def bucket_sizes(resolution: int, step: int, min_side: int, max_side: int) -> list[Size]:
    """kohya's bucket grid for a training `resolution` (pixel area resolution²), sorted."""
    area = resolution * resolution
    square = resolution // step * step
    if square < min_side:
        raise UserError(
            f"data.bucket_step={step}: the {resolution}px square rounds down to {square}px, below "
            f"data.bucket_min_side={min_side}; lower data.bucket_step or data.bucket_min_side"
        )
    sizes = {(square, square)}
    for w in range(min_side, max_side + 1, step):
        h = min(max_side, area // w // step * step)
        if h >= min_side:
            sizes.update({(w, h), (h, w)})
    return sorted(sizes)


def nearest(size: Size, buckets: list[Size]) -> Size:
    """The bucket for an image of `size`: itself when it is one, else the one whose aspect ratio is nearest
    as a ratio (the least crop). kohya takes the least *difference* of aspect ratios, which picks another
    bucket only for images between two buckets, where it can crop more (a 200×291 photo: 12.7% vs 11.6%)."""
    if size in buckets:
        return size
    aspect = size[0] / size[1]
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1] / aspect)), b))


def crop_share(size: Size, bucket: Size) -> float:
    """The share of the image's longer axis that `center` cropping to `bucket` cuts off: the aspect rounding
    remainder, 1 - min(a, b) / max(a, b) for image aspect a and bucket aspect b."""
    a, b = size[0] / size[1], bucket[0] / bucket[1]
    return 1 - min(a, b) / max(a, b)


def resolve_sides(resolution: int, step: int, min_side: int | None, max_side: int | None) -> tuple[int, int]:
    """The side limits, with kohya's defaults for a `resolution` (half and twice it, on the step grid)."""
    lo = min_side if min_side is not None else max(step, resolution // 2 // step * step)
    hi = max_side if max_side is not None else resolution * 2 // step * step
    for key, side in (("data.bucket_min_side", lo), ("data.bucket_max_side", hi)):
        if side % step:
            raise UserError(f"{key}={side}: use a multiple of data.bucket_step={step}")
    if lo > hi:
        raise UserError(f"data.bucket_min_side={lo} is above data.bucket_max_side={hi}; swap or widen them")
    return lo, hi
