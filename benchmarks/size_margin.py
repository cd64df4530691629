"""How far each toy shape's sizes sit from the editability measure's size split, as rendered and after the
toy VAE's round trip (the closest any sampler's output can come to a render), and, given a pivotal-tuning
run, which of the editability prompts its samples fail on, size or background:

    python benchmarks/size_margin.py
    python benchmarks/size_margin.py --run outputs/toy-concept/<run> --per-prompt 8

The editability measure (`lit_ti.toy.evaluation.editability`) calls an object large when its extent is above
one split (`SIZE_SPLIT`) for every shape; a shape whose small renders come close to it leaves its samples the
least room for blur or halos. See docs/results.md (pivotal tuning on the ring, time and size).
"""

import argparse
import os
import random

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import torch
from diffusers import DDIMScheduler

from lit_ti.errors import report_user_errors
from lit_ti.toy import world
from lit_ti.toy.evaluation import BACKGROUNDS, SIZE_SPLIT, SIZES, WithLora, backgrounds_seen, sizes_seen, toy_base
from lit_ti.toy.style import object_extent


@torch.no_grad()
def margins(per_colour: int) -> None:
    """Per shape and size: the renders' extents, and their VAE round trips' distance to the split."""
    vae = toy_base().load().vae
    rng = random.Random(0)
    print(f"size split {SIZE_SPLIT}; extents as a share of the side; margin = distance of the round trip to the split")
    for shape in world.ALL_SHAPES:
        extents = {"small": ([], []), "large": ([], [])}
        for colour in world.COLOURS:
            for _ in range(per_colour):
                image = world.render(world.random_scene(rng, f"{colour}_{shape}")).convert("RGB")
                x = torch.tensor(np.array(image)).permute(2, 0, 1)[None].float() / 127.5 - 1  # [1, 3, H, W]
                trip = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
                [size] = sizes_seen(x)
                extents[size][0].append(float(object_extent(x)[0]))
                extents[size][1].append(float(object_extent(trip)[0]))
        for size, (rendered, tripped) in extents.items():
            if not rendered:  # a few renders per colour can miss a size
                print(f"{shape:8s} {size:5s} n=  0")
                continue
            r, t = np.array(rendered), np.array(tripped)
            margin = np.abs(t - SIZE_SPLIT).min()
            print(
                f"{shape:8s} {size:5s} n={len(r):3d}  rendered {r.min():.3f}-{r.max():.3f}  "
                f"round trip {t.min():.3f}-{t.max():.3f} (mean {t.mean():.3f})  margin {margin:.3f}"
            )


@torch.no_grad()
def failures(run: str, per_prompt: int, strength: float) -> None:
    """Per editability prompt: the shares of a run's samples with the right size and the right background."""
    bundle = f"{run}/toy-concept-lora.safetensors"
    method = WithLora(toy_base(), name="toy-concept", init_file=bundle, lora=bundle, strength=strength)
    method.configure_model()
    scheduler = DDIMScheduler.from_config(method.backbone.scheduler.config)
    cases = [(size, bg) for size in SIZES for bg in BACKGROUNDS]
    for i, (size, bg) in enumerate(cases):  # the measure's prompts and seeds
        prompt = f"a {size} toy-concept on a {bg} background"
        images = method.sample(prompt, "", per_prompt, steps=20, guidance_scale=5.0, seed=1000 * i, scheduler=scheduler)
        images = images * 2 - 1
        size_ok = sum(s == size for s in sizes_seen(images)) / per_prompt
        bg_ok = sum(b == bg for b in backgrounds_seen(images)) / per_prompt
        print(
            f"{prompt:45s} size right {size_ok:.2f}  background right {bg_ok:.2f}  "
            f"extents {' '.join(f'{float(e):.2f}' for e in object_extent(images))}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-colour", type=int, default=8, help="renders per colour and shape")
    parser.add_argument("--run", help="a pivotal-tuning run folder (its toy-concept-lora.safetensors bundle)")
    parser.add_argument("--per-prompt", type=int, default=8)
    parser.add_argument("--strength", type=float, default=1.0, help="the LoRA's strength")
    args = parser.parse_args()
    if args.run:  # a wrong folder is one `error:` line
        report_user_errors(failures, args.run, args.per_prompt, args.strength)
    else:
        margins(args.per_colour)
