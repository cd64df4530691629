"""One subject, many scenes: a cut-out (an image whose alpha channel is the subject) pasted on plain backgrounds
and at several sizes, each copy captioned with what changed (`python preprocess.py ... cutout.backgrounds=...`).

From one photo a LoRA learns the photo: its background and the subject's size come back whatever the prompt
asks. Copies that vary exactly those, with captions that say so, are what lifted one-shot pivotal tuning to
TI's editability on the toy world (docs/results.md). Custom Diffusion (Kumari et al., 2023) resizes its
training images the same way and adds "very small" / "zoomed in" to their captions.
"""

import re
import string
from collections.abc import Mapping

from PIL import Image, ImageColor

from lit_ti.errors import UserError, quote

FIELDS = ("caption", "background", "size")  # what a copy's caption template may name


def parse_backgrounds(value) -> dict[str, tuple[int, int, int]]:
    """`cutout.backgrounds`: {word: colour} (a name Pillow knows or #rrggbb) -> {word: (r, g, b)}."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise UserError(
            f"cutout.backgrounds={quote(value)}: a mapping of words to colours, e.g. \"{{white: '#eeeeee'}}\""
        )
    out = {}
    for word, colour in value.items():
        try:
            out[str(word)] = ImageColor.getrgb(str(colour))[:3]
        except ValueError:
            raise UserError(
                f"cutout.backgrounds.{word}={quote(colour)}: not a colour; use a name (white) or #rrggbb"
            ) from None
    return out


def parse_sizes(value) -> dict[str, float]:
    """`cutout.sizes`: {word: share} -> the subject's larger side in each copy, as a share of the image's shorter
    side, in (0, 1]; {} keeps the subject's own size."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise UserError(f"cutout.sizes={quote(value)}: a mapping of words to shares, e.g. '{{small: 0.35}}'")
    out = {}
    for word, share in value.items():
        if isinstance(share, bool) or not isinstance(share, int | float) or not 0 < share <= 1:
            raise UserError(f"cutout.sizes.{word}={quote(share)}: the subject's share of the image side, in (0, 1]")
        out[str(word)] = float(share)
    return out


def check_caption(template) -> str:
    """`cutout.caption`: a template naming only {caption}, {background} and {size}."""
    if not isinstance(template, str) or not template.strip():
        raise UserError(
            f"cutout.caption={quote(template)}: a caption template, e.g. '{{caption}} on a {{background}} background'"
        )
    try:
        named = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
    except ValueError as e:
        raise UserError(f"cutout.caption={quote(template)}: {e}; write braces as {{{{ }}}}") from None
    unknown = [f for f in named if f not in FIELDS]
    if unknown:
        raise UserError(
            f"cutout.caption={quote(template)}: unknown {{{unknown[0]}}}; use {{caption}}, {{background}}, {{size}}"
        )
    return template


def caption(template: str, text: str, background: str, size: str) -> str:
    """A copy's caption: the template filled in; what an empty field leaves (runs of spaces, a comma with nothing
    before it or after it) is tidied away."""
    filled = " ".join(template.format(caption=text, background=background, size=size).split())
    return re.sub(r",(\s*,)+", ",", filled).strip(" ,")


def subject_box(im: Image.Image, solid: bool = False) -> tuple[int, int, int, int] | None:
    """The bounding box of the RGBA image's subject, or None when nothing is transparent (no cut-out).

    solid: only pixels at least half opaque (the silhouette a viewer sees, what a size is measured on; a
    resampled edge leaves faint pixels a few pixels out); else every pixel not fully transparent (what is kept).
    """
    alpha = im.getchannel("A")
    if alpha.getextrema()[0] == 255:
        return None
    return (alpha.point(lambda a: 255 if a >= 128 else 0) if solid else alpha).getbbox()


def copies(
    im: Image.Image, backgrounds: dict[str, tuple[int, int, int]], sizes: dict[str, float]
) -> list[tuple[Image.Image, str, str]]:
    """The cut-out `im` (RGBA) on every background at every size: [(RGB copy, background word, size word)].

    A resized subject keeps its centre where it was, moved only as far as it takes to stay inside the frame.
    """
    box, seen = subject_box(im), subject_box(im, solid=True)
    if box is None or seen is None or not backgrounds:
        return []
    subject = im.crop(box).convert("RGBa")  # premultiplied: resizing blends no hidden colour into the edges
    side = max(seen[2] - seen[0], seen[3] - seen[1])
    cx, cy = (seen[0] + seen[2]) / 2, (seen[1] + seen[3]) / 2  # kept where it was, offset by the fringe
    placed = []
    for word, share in (sizes or {"": None}).items():
        if share is None:
            layer, left, top = subject, box[0], box[1]
        else:
            f = share * min(im.size) / side
            w, h = max(1, round((box[2] - box[0]) * f)), max(1, round((box[3] - box[1]) * f))
            layer = subject.resize((w, h), Image.Resampling.LANCZOS)
            bx, by = (box[0] + box[2]) / 2 - cx, (box[1] + box[3]) / 2 - cy  # the kept box's centre off the seen one
            left = int(min(max(0, round(cx + bx * f - w / 2)), im.width - w))
            top = int(min(max(0, round(cy + by * f - h / 2)), im.height - h))
        placed.append((word, layer.convert("RGBA"), left, top))
    out = []
    for size_word, layer, left, top in placed:
        for bg_word, colour in backgrounds.items():
            canvas = Image.new("RGBA", im.size, (*colour, 255))
            canvas.alpha_composite(layer, (left, top))
            out.append((canvas.convert("RGB"), bg_word, size_word))
    return out
