"""Latent caching at scale: peak memory and time to the first training step, 1000 images vs 10, cold and warm.

    python benchmarks/latent_cache.py --work /tmp/latent-bench            # 1000 and 10 images at 512 px
    python benchmarks/latent_cache.py --work /tmp/lb --counts 50 10 --size 256   # a quick look

For each image count it writes that many 512-px JPEGs (smooth random colour fields with shapes), then trains
textual inversion for one step twice in fresh child processes: a cold run (empty `data.cache_dir`) and a
warm one (the cache the cold run wrote). Each child reports the seconds from the start of `trainer.fit` to
the first training batch and its peak RSS (VmHWM; the model and imports are the same in every row, so the
difference between rows is what the data costs).

The backbone is the tiny random one with a lighter VAE (AutoencoderKL, 4 blocks of 8/8/16/16 channels, no
mid-block attention: SD-shaped latents, 4×64×64 at 512 px, about 0.4 s per image on 2 CPU cores where SD's
VAE takes well over 1 s). The cache's cost does not depend on the VAE; the cold run's does.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def write_images(folder: Path, n: int, size: int) -> None:
    import numpy as np
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        path = folder / f"{i:05d}.jpg"
        if path.exists():
            continue
        field = Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
        draw = ImageDraw.Draw(field)
        x, y, r = (int(v) for v in rng.integers(size // 8, size // 2, 3))
        draw.ellipse((x, y, x + r, y + r), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        field.save(path, quality=90)
        (folder / f"{i:05d}.txt").write_text(f"a thing, number {i}", encoding="utf-8")


def child(data: str, cache: str, size: int) -> dict:
    import lightning as L
    import torch
    from diffusers import AutoencoderKL

    from lit_ti.data import ConceptDataModule
    from lit_ti.methods import TextualInversion
    from lit_ti.models import TinyBackbone

    @dataclass
    class LightVAE(TinyBackbone):
        def load(self, dtype=torch.float32):
            bb = super().load(dtype)
            torch.manual_seed(0)
            bb.vae = AutoencoderKL(
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                block_out_channels=(8, 8, 16, 16),
                norm_num_groups=8,
                layers_per_block=1,
                latent_channels=4,
                mid_block_add_attention=False,
            ).requires_grad_(False)
            return bb

    class FirstStep(L.Callback):
        seconds = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            FirstStep.seconds = time.perf_counter() - start

    torch.set_num_threads(2)
    method = TextualInversion(LightVAE(), name="zz-thing", num_vectors=1, init_text="thing")
    dm = ConceptDataModule(data, name="zz-thing", resolution=size, buckets=True, cache_dir=cache)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        callbacks=[FirstStep()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(method, datamodule=dm)
    # VmHWM, not ru_maxrss: the latter carries the parent's high-water mark into this child across fork and exec
    rss = int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0]) / 1024  # KiB -> MiB
    return {
        "first_step_s": FirstStep.seconds,
        "peak_rss_mib": rss,
        "latents_mib": sum(m.nbytes for m in dm.mean) / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the images and caches")
    parser.add_argument("--counts", type=int, nargs="+", default=[1000, 10])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--child", nargs=2, metavar=("DATA", "CACHE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(*args.child, args.size)), flush=True)
        return
    rows = []
    for n in args.counts:
        data, cache = args.work / f"images-{n}", args.work / f"cache-{n}"
        write_images(data, n, args.size)
        if cache.exists():
            raise SystemExit(f"{cache} exists: give an empty --work folder (a cold run needs an empty cache)")
        for run in ("cold", "warm"):
            cmd = [
                sys.executable,
                __file__,
                "--work",
                str(args.work),
                "--size",
                str(args.size),
                "--child",
                str(data),
                str(cache),
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            result = json.loads(next(line[7:] for line in out.splitlines() if line.startswith("RESULT ")))
            rows.append({"images": n, "run": run, **result})
            print(json.dumps(rows[-1]), flush=True)
    print("\n| images | run | time to first step (s) | peak RSS (MiB) | latents held (MiB) |\n|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['images']} | {r['run']} | {r['first_step_s']:.1f} | {r['peak_rss_mib']:.0f} | {r['latents_mib']:.1f} |"
        )


if __name__ == "__main__":
    main()
