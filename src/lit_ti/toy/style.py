"""Is an image striped? The toy world's style measure, for hypernetworks.

The `striped` style lays horizontal bands of period 8 px over the background. Averaging each row and taking
the spectrum of that 64-value profile, a striped image puts a large share of its (non-constant) energy at the
stripe frequency and its odd harmonics; a plain one does not. No training, no threshold tuning on samples:
the threshold sits between the scores of plain and striped renders (`calibrate`, a test).
"""

import random
from dataclasses import replace

import torch
from torch import Tensor

from lit_ti.toy import classifier as toy_classifier
from lit_ti.toy.world import IMAGE_SIZE, STRIPE_PERIOD, random_scene, render

THRESHOLD = 0.3  # share of row-profile energy at the stripe frequency; renders: plain < 0.1, striped > 0.5


def stripe_score(images: Tensor) -> Tensor:
    """`[B, 3, H, W]` (any range) -> `[B]` share of the row-profile's AC energy at the stripe frequencies."""
    profile = images.float().mean(dim=(1, 3))  # [B, H]
    profile = profile - profile.mean(dim=1, keepdim=True)
    power = torch.fft.rfft(profile, dim=1).abs() ** 2  # [B, H/2 + 1]
    base = images.shape[-2] // (2 * STRIPE_PERIOD * images.shape[-2] // IMAGE_SIZE)  # cycles per image
    harmonics = list(range(base, power.shape[1], 2 * base))  # the base frequency and its odd harmonics
    return power[:, harmonics].sum(1) / power[:, 1:].sum(1).clamp_min(1e-12)


def is_striped(images: Tensor) -> Tensor:
    return stripe_score(images) > THRESHOLD


def eval_prompts(n: int, seed: int = 999) -> list[tuple[str, str]]:
    """(caption, concept) of scenes no training folder holds: the prompts a style is judged on."""
    rng = random.Random(f"style-eval-{seed}")
    scenes = [random_scene(rng) for _ in range(n)]
    return [(s.caption(), s.concept) for s in scenes]


def calibrate(n: int = 64) -> dict[str, float]:
    """Scores and classifier accuracy on ground-truth renders of both styles."""
    rng = random.Random("style-calibrate")
    scenes = [random_scene(rng) for _ in range(n)]
    judge = toy_classifier.load()
    out = {}
    for style in ("plain", "striped"):
        x = toy_classifier.to_tensor([render(replace(s, style=style)) for s in scenes])
        out[f"{style}_striped"] = float(is_striped(x).float().mean())
        out[f"{style}_accuracy"] = sum(r == s.concept for r, s in zip(judge.read(x), scenes)) / n
    return out


@torch.no_grad()
def evaluate_style(method, samples: int = 32, guidance: float = 5.0) -> dict[str, float]:
    """Samples of unseen captions with the method's hypernetwork at its strength, and with strength 0 (the
    base model): the share that is striped and the share the classifier reads as the prompted concept."""
    from diffusers import DDIMScheduler

    judge = toy_classifier.load().to(method.device)
    scheduler = DDIMScheduler.from_config(method.backbone.scheduler.config)
    hn = method.hypernetwork
    results = {}
    for tag, strength in (("", method.strength), ("_base", 0.0)):
        hn.set_strength(strength)
        striped = hits = 0
        for i, (prompt, concept) in enumerate(eval_prompts(samples)):
            image = method.sample(prompt, "", 1, steps=20, guidance_scale=guidance, seed=i, scheduler=scheduler)
            striped += int(is_striped(image)[0])
            hits += judge.read(image * 2 - 1)[0] == concept
        results[f"style_rate{tag}"] = striped / samples
        results[f"accuracy{tag}"] = hits / samples
    hn.set_strength(method.strength)
    results["accuracy_drop"] = results["accuracy_base"] - results["accuracy"]
    return results
