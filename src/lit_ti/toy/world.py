"""A synthetic world of coloured shapes whose ground truth we know.

Each image shows one shape of one colour, small or large, somewhere on a plain background, with the caption
that says so ("a large purple star on a black background"). Five (colour, shape) pairs are *held out*: the
toy base model never sees them in training, though it knows every colour and every shape, so textual
inversion has something real to find.

    python -m lit_ti.toy.world purple_star outputs/data/purple_star --n 16   # a concept as a dataset folder
"""

import argparse
import math
import random
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image, ImageDraw

from lit_ti import cutout

SHAPES = ("circle", "square", "triangle", "star", "cross")
# Shapes the toy base model never saw, in any colour or caption: a concept such as `red_ring` is one the frozen
# model cannot draw, so textual inversion can only point at the nearest shape it knows (a disc), and a method
# that changes the model (pivotal tuning) has something to add. Judged by a second classifier that knows them.
NOVEL_SHAPES = ("ring",)
ALL_SHAPES = SHAPES + NOVEL_SHAPES
NEAREST_KNOWN = {"ring": "circle"}  # the words that come closest for a novel shape: its evaluation's "true words"
RING_HOLE = 0.5  # the hole's radius as a share of the ring's
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 80, 220),
    "yellow": (235, 205, 40),
    "purple": (150, 60, 190),
    "orange": (245, 135, 30),
}
BACKGROUNDS = {"white": (238, 238, 238), "black": (24, 24, 24), "gray": (128, 128, 128)}
SIZES = {"small": 0.18, "large": 0.32}  # radius as a share of the image side
HELD_OUT = ("purple_star", "orange_cross", "green_triangle", "blue_circle", "yellow_square")
# Styles for hypernetworks, rendered from scenes whose captions stay unchanged: `topleft` always puts the object
# in the upper-left quadrant (a composition); `night` always draws a black background, whatever background the
# caption names. (Texture styles such as stripes or tinted backgrounds were tried first: the toy VAE, trained
# on plain renders only, cannot reconstruct them, so no UNet-side module could learn them.)
STYLES = ("plain", "topleft", "night")
IMAGE_SIZE = 64
# `python preprocess.py cutout.*` as the toy world speaks: its backgrounds, its two sizes (the object's diameter
# as a share of the side), its captions
CUTOUT = (dict(BACKGROUNDS), {name: 2 * r for name, r in SIZES.items()})
CUTOUT_CAPTION = "a {size} [name] on a {background} background"
SUPERSAMPLE = 4  # draw large, then downsample: smooth edges


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    size: str
    x: float  # centre, as a share of the side
    y: float

    @property
    def concept(self) -> str:
        return f"{self.colour}_{self.shape}"

    def caption(self, variant: str = "full") -> str:
        """`full`: everything; `object`: colour + shape; `sized`: + size; `placed`: + background; `empty`."""
        return {
            "full": f"a {self.size} {self.colour} {self.shape} on a {self.background} background",
            "object": f"a {self.colour} {self.shape}",
            "sized": f"a {self.size} {self.colour} {self.shape}",
            "placed": f"a {self.colour} {self.shape} on a {self.background} background",
            "empty": "",
        }[variant]


def concept_parts(concept: str) -> tuple[str, str]:
    colour, _, shape = concept.partition("_")
    if colour not in COLOURS or shape not in ALL_SHAPES:
        raise ValueError(f"unknown toy concept {concept!r}: use <colour>_<shape> from {list(COLOURS)} x {ALL_SHAPES}")
    return colour, shape


def oracle_words(concept: str) -> str:
    """The words that draw `concept` best on the base model: its own (`purple star`), or for a shape the model
    never saw, those of the nearest shape it knows (`red circle` for `red_ring`)."""
    colour, shape = concept_parts(concept)
    return f"{colour} {NEAREST_KNOWN.get(shape, shape)}"


def seen_concepts() -> list[str]:
    return [f"{c}_{s}" for c in COLOURS for s in SHAPES if f"{c}_{s}" not in HELD_OUT]


def random_scene(rng: random.Random, concept: str | None = None, concepts: list[str] | None = None) -> Scene:
    colour, shape = concept_parts(concept or rng.choice(concepts or seen_concepts()))
    size = rng.choice(list(SIZES))
    margin = SIZES[size] + 0.04
    return Scene(
        shape=shape,
        colour=colour,
        background=rng.choice(list(BACKGROUNDS)),
        size=size,
        x=rng.uniform(margin, 1 - margin),
        y=rng.uniform(margin, 1 - margin),
    )


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        s = r * 0.85
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "star":
        return [
            (
                cx + (r if k % 2 == 0 else r * 0.45) * math.cos(-math.pi / 2 + k * math.pi / 5),
                cy + (r if k % 2 == 0 else r * 0.45) * math.sin(-math.pi / 2 + k * math.pi / 5),
            )
            for k in range(10)
        ]
    if shape == "cross":
        a, b = r, r * 0.35
        return [
            (cx - b, cy - a),
            (cx + b, cy - a),
            (cx + b, cy - b),
            (cx + a, cy - b),
            (cx + a, cy + b),
            (cx + b, cy + b),
            (cx + b, cy + a),
            (cx - b, cy + a),
            (cx - b, cy + b),
            (cx - a, cy + b),
            (cx - a, cy - b),
            (cx - b, cy - b),
        ]
    raise ValueError(shape)


def render(scene: Scene, size: int = IMAGE_SIZE, transparent: bool = False) -> Image.Image:
    """The scene as an RGB image; `transparent`: RGBA with only the object opaque (its background removed, as a
    user's cut-out is; a ring's hole is transparent)."""
    big = size * SUPERSAMPLE
    background = (*BACKGROUNDS[scene.background], 0 if transparent else 255)
    im = Image.new("RGBA", (big, big), background)
    draw = ImageDraw.Draw(im)
    cx, cy, r = scene.x * big, scene.y * big, SIZES[scene.size] * big
    if scene.shape in ("circle", "ring"):
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=COLOURS[scene.colour])
        if scene.shape == "ring":
            h = r * RING_HOLE
            draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=background)
    else:
        draw.polygon(_polygon(scene.shape, cx, cy, r), fill=COLOURS[scene.colour])
    if not transparent:
        return im.convert("RGB").resize((size, size), Image.Resampling.LANCZOS)
    return im.convert("RGBa").resize((size, size), Image.Resampling.LANCZOS).convert("RGBA")


def write_concept(
    concept: str,
    folder: str | Path,
    n: int = 16,
    seed: int = 0,
    size: int = IMAGE_SIZE,
    named: bool = False,
    masks: bool = False,
    cutouts: bool = False,
) -> Path:
    """Render `n` images of a concept with sidecar captions: a ready training folder.

    named: the captions say `[name]` for the concept's words ("a large [name] on a gray background"), so that
    `data.template=filewords` prompts the learned token with the rest of each render's true caption.
    masks: each render also gets a DreamArtist attention map `<stem>_att.png` (`subject_mask`), so only the
    object is learned, as a user's subject mask would do.
    cutouts: each render is cut out (`render(transparent=True)`) and written as `lit_ti.cutout`'s copies on every
    background at both sizes, captioned to match: what `python preprocess.py` writes from a user's cut-out with
    the toy's words (`CUTOUT_*`).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{concept}-{seed}")
    for i in range(n):
        scene = random_scene(rng, concept)
        if cutouts:
            words = "[name]" if named else f"{scene.colour} {scene.shape}"
            for k, (copy, background, grown) in enumerate(
                cutout.copies(render(scene, size, transparent=True), *CUTOUT)
            ):
                copy.save(folder / f"{i:04d}-{k}.png")
                text = cutout.caption(CUTOUT_CAPTION.replace("[name]", words), "", background, grown)
                (folder / f"{i:04d}-{k}.txt").write_text(text + "\n", encoding="utf-8")
            continue
        render(scene, size).save(folder / f"{i:04d}.png")
        if masks:
            subject_mask(scene, size).save(folder / f"{i:04d}_att.png")
        caption = scene.caption()
        if named:
            caption = caption.replace(f"{scene.colour} {scene.shape}", "[name]")
        (folder / f"{i:04d}.txt").write_text(caption + "\n", encoding="utf-8")
    return folder


def subject_mask(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    """A rough subject mask as a user paints one: a disc over the object, a fifth wider than it, grey 127
    (loss weight 1 in an attention map) on black (weight 0), the hole of a ring included: the hole is the
    concept."""
    im = Image.new("L", (size, size), 0)
    cx, cy, r = scene.x * size, scene.y * size, SIZES[scene.size] * size * 1.2
    ImageDraw.Draw(im).ellipse([cx - r, cy - r, cx + r, cy + r], fill=127)
    return im


def styled(scene: Scene, style: str, rng: random.Random) -> Scene:
    """The scene as `style` renders it (`topleft`: centre moved into the upper-left quadrant; `night`: black
    background)."""
    if style == "plain":
        return scene
    if style == "night":
        return replace(scene, background="black")
    margin = SIZES[scene.size] + 0.04
    return replace(scene, x=rng.uniform(margin, 0.5), y=rng.uniform(margin, 0.5))


def write_style(style: str, folder: str | Path, n: int = 32, seed: int = 0, size: int = IMAGE_SIZE) -> Path:
    """Render `n` scenes of seen concepts in `style`, captioned as the unstyled scene (so `night` captions may
    name a white or gray background): the style is what a hypernetwork must add on its own."""
    if style not in STYLES:
        raise ValueError(f"unknown toy style {style!r}: use one of {STYLES}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"style-{style}-{seed}")
    for i in range(n):
        scene = random_scene(rng)
        render(styled(scene, style, rng), size).save(folder / f"{i:04d}.png")
        (folder / f"{i:04d}.txt").write_text(scene.caption() + "\n", encoding="utf-8")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description="Render a toy concept as a training folder.")
    parser.add_argument("concept", help=f"<colour>_<shape>; held out from the toy base model: {', '.join(HELD_OUT)}")
    parser.add_argument("folder")
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--named", action="store_true", help="captions say [name] for the concept's words")
    parser.add_argument("--masks", action="store_true", help="write each render's subject mask (<stem>_att.png)")
    parser.add_argument("--cutouts", action="store_true", help="write each render cut out on every background and size")
    args = parser.parse_args()
    folder = write_concept(
        args.concept, args.folder, args.n, args.seed, named=args.named, masks=args.masks, cutouts=args.cutouts
    )
    print(folder)


if __name__ == "__main__":
    main()
