"""Does an image show a toy style? The toy world's style measures, for hypernetworks.

The background is estimated as the median colour of the image border. `topleft`: the object (whatever differs
from the background) has its centroid in the upper-left quadrant; plain renders put it there a quarter of the
time by chance. `night`: the background is dark; a third of plain renders have one (black among white, gray,
black). Styled renders are always in the style (`calibrate`, checked by a test). Samples are judged on captions
that do not already ask for the style (for `night`: captions naming a white or gray background), so the base
model's rate is what chance and the caption give, and a hypernetwork's gain over it is the style's own.
"""

import itertools
import random

import torch
from torch import Tensor

from lit_ti.toy import classifier as toy_classifier
from lit_ti.toy.world import random_scene, render, styled

OBJECT_DISTANCE = 0.3  # colour distance (L1 over RGB in [-1, 1] units) from the background that counts as object
DARK = -0.4  # mean background level in [-1, 1] below which it is black (black -0.81, gray 0.00, white 0.87)


def background(images: Tensor) -> Tensor:
    """`[B, 3, H, W]` in [-1, 1] -> `[B, 3, 1, 1]` median colour of the image border."""
    x = images.float()
    border = torch.cat([x[..., :2, :].flatten(2), x[..., -2:, :].flatten(2), x[..., :, :2].flatten(2)], dim=2)
    return border.median(dim=2).values[..., None, None]


def object_centre(images: Tensor) -> Tensor:
    """`[B, 3, H, W]` in [-1, 1] -> `[B, 2]` (x, y) centroid of the object as a share of the side."""
    x = images.float()
    mask = ((x - background(x)).abs().sum(1) > OBJECT_DISTANCE).float()  # [B, H, W]
    h, w = mask.shape[-2:]
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) / w
    total = mask.sum((1, 2)).clamp_min(1.0)
    cx = (mask * xs).sum((1, 2)) / total
    cy = (mask * ys[:, None]).sum((1, 2)) / total
    return torch.stack([cx, cy], dim=1)


def object_extent(images: Tensor) -> Tensor:
    """`[B, 3, H, W]` in [-1, 1] -> `[B]` the object's larger side (2nd to 98th percentile of its pixels'
    coordinates, so stray pixels do not count) as a share of the image side; 0 when there is no object."""
    x = images.float()
    mask = (x - background(x)).abs().sum(1) > OBJECT_DISTANCE  # [B, H, W]
    h, w = mask.shape[-2:]
    out = torch.zeros(len(x))
    for i, m in enumerate(mask):
        ys, xs = torch.nonzero(m, as_tuple=True)
        if len(xs):
            q = torch.tensor([0.02, 0.98])
            sides = [(torch.quantile(c.float(), q) / n).diff() + 1 / n for c, n in ((xs, w), (ys, h))]
            out[i] = max(float(side) for side in sides)
    return out


def in_style(images: Tensor, style: str = "topleft") -> Tensor:
    """`[B]` bool: the images show `style` (`topleft` or `night`)."""
    if style == "night":
        return background(images).mean(dim=(1, 2, 3)) < DARK
    if style == "topleft":
        return (object_centre(images) < 0.5).all(dim=1)
    raise ValueError(f"no measure for toy style {style!r}: use topleft or night")


def caption_says(scene, style: str) -> bool:
    """Whether the scene's caption already asks for the style (`night`: it names a black background), so that
    a sample in the style would say nothing about the hypernetwork."""
    return style == "night" and scene.background == "black"


def eval_prompts(n: int, style: str = "topleft", seed: int = 999) -> list[tuple[str, str]]:
    """(caption, concept) of `n` scenes no training folder holds and whose caption does not already ask for
    `style`: the prompts a style is judged on."""
    rng = random.Random(f"style-eval-{seed}")
    scenes = (random_scene(rng) for _ in itertools.count())
    return [(s.caption(), s.concept) for s in itertools.islice((s for s in scenes if not caption_says(s, style)), n)]


def calibrate(style: str = "topleft", n: int = 64) -> dict[str, float]:
    """Style rate and classifier accuracy on ground-truth renders, plain and styled."""
    rng = random.Random("style-calibrate")
    scenes = [random_scene(rng) for _ in range(n)]
    judge = toy_classifier.load()
    out = {}
    for name, variant in (("plain", scenes), (style, [styled(s, style, rng) for s in scenes])):
        x = toy_classifier.to_tensor([render(s) for s in variant])
        out[f"{name}_rate"] = float(in_style(x, style).float().mean())
        out[f"{name}_accuracy"] = sum(r == s.concept for r, s in zip(judge.read(x), variant)) / n
    return out


@torch.no_grad()
def evaluate_style(method, style: str = "topleft", samples: int = 32, guidance: float = 5.0) -> dict[str, float]:
    """Samples of unseen captions with the method's hypernetwork at its strength, and with strength 0 (the
    base model): the share in the style and the share the classifier reads as the prompted concept."""
    from diffusers import DDIMScheduler

    judge = toy_classifier.load().to(method.device)
    scheduler = DDIMScheduler.from_config(method.backbone.scheduler.config)
    hn = method.hypernetwork
    results = {}
    try:  # a stop mid-way (lit_ti.callbacks.interrupt.Stopped) leaves the trained strength in place
        for tag, strength in (("", method.strength), ("_base", 0.0)):
            hn.set_strength(strength)
            styled_count = hits = 0
            for i, (prompt, concept) in enumerate(eval_prompts(samples, style)):
                image = method.sample(prompt, "", 1, steps=20, guidance_scale=guidance, seed=i, scheduler=scheduler)
                styled_count += int(in_style(image * 2 - 1, style)[0])
                hits += judge.read(image * 2 - 1)[0] == concept
            results[f"style_rate{tag}"] = styled_count / samples
            results[f"accuracy{tag}"] = hits / samples
    finally:
        hn.set_strength(method.strength)
    results["accuracy_drop"] = results["accuracy_base"] - results["accuracy"]
    return results
