"""The recipe of the toy base model: a tiny SD-shaped model (AutoencoderKL, UNet2DConditionModel,
CLIPTextModel, CLIP tokenizer, scaled-linear DDPM schedule) trained from scratch on the toy world, with the
held-out concepts kept out of its training data.

    python -m lit_ti.toy.pretrain src/lit_ti/assets/toy_base --device cuda      # the shipped model
    python -m lit_ti.toy.pretrain /tmp/toy --images 64 --vae-steps 5 --unet-steps 5   # a smoke run

Stage 1 trains the VAE on renders; stage 2 caches latents and trains UNet + text encoder jointly on
captions of several lengths (10% empty, for classifier-free guidance). The cached latents are the posterior
*means* (the VAE's posterior is wide), so training on this model uses the means too (`data=toy` does). The
folder it writes loads with the generic `DiffusersFolder` loader, weights stored in fp16.
"""

import argparse
import json
import os
import random
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from lit_ti.models.tiny import clip_tokenizer, write_clip_vocabulary
from lit_ti.toy import classifier as toy_classifier
from lit_ti.toy.world import random_scene, render, seen_concepts

VARIANTS = ("full", "object", "sized", "placed", "empty")
VARIANT_P = torch.tensor([0.4, 0.3, 0.1, 0.1, 0.1])


def build(text_hidden: int = 64) -> dict:
    tokenizer = clip_tokenizer()
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),  # 64 px -> 16x16x4 latents
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=text_hidden,
            intermediate_size=4 * text_hidden,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=text_hidden,
            hidden_act="quick_gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(64, 96, 128),  # fp16 folder stays under 20 MB
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        attention_head_dim=8,
        cross_attention_dim=text_hidden,
        norm_num_groups=32,
    )
    scheduler = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, steps_offset=1
    )
    return dict(vae=vae, text_encoder=text_encoder, unet=unet, tokenizer=tokenizer, scheduler=scheduler)


def _render_one(seed: int) -> tuple[np.ndarray, tuple[str, ...]]:
    scene = random_scene(random.Random(seed), concepts=seen_concepts())
    return np.asarray(render(scene)), tuple(scene.caption(v) for v in VARIANTS)


def render_dataset(
    n: int, seed: int = 0, workers: int = min(8, os.cpu_count() or 1)
) -> tuple[torch.Tensor, list[tuple[str, ...]]]:
    """`n` renders of seen concepts: uint8 `[n, 3, 64, 64]` and each one's caption variants."""
    seeds = [seed * 10_000_000 + i for i in range(n)]
    if n < 2048 or workers < 2:  # a pool's start-up costs more than it saves
        rows = [_render_one(s) for s in seeds]
    else:
        # spawn, not fork: forking a process that already runs threads (torch, a test runner) can deadlock
        with get_context("spawn").Pool(workers) as pool:
            rows = pool.map(_render_one, seeds, chunksize=256)
    images = torch.from_numpy(np.stack([r[0] for r in rows])).permute(0, 3, 1, 2).contiguous()
    return images, [r[1] for r in rows]


def _pixels(images: torch.Tensor, device: str) -> torch.Tensor:
    return images.to(device, non_blocking=True).float() / 127.5 - 1


def train_vae(vae: AutoencoderKL, images: torch.Tensor, steps: int, batch: int, device: str, log) -> None:
    vae.to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    for step in range(steps):
        x = _pixels(images[torch.randint(len(images), (batch,))], device)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 500 == 0 or step == steps - 1:
            log(f"vae step {step}: loss {loss.item():.4f}")
    vae.eval()


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: torch.Tensor, device: str) -> torch.Tensor:
    means = [vae.encode(_pixels(images[i : i + 512], device)).latent_dist.mean for i in range(0, len(images), 512)]
    return torch.cat(means)


def train_unet(
    parts: dict, latents: torch.Tensor, captions, steps: int, batch: int, device: str, log, budget_s: float = 1e9
) -> int:
    """Joint UNet + text-encoder training; stops early once `budget_s` seconds have passed. Returns steps done."""
    unet, text_encoder, scheduler, tok = parts["unet"], parts["text_encoder"], parts["scheduler"], parts["tokenizer"]
    unique = sorted({c for row in captions for c in row})
    index = {c: i for i, c in enumerate(unique)}
    table = tok(unique, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids.to(device)
    rows = torch.tensor([[index[c] for c in row] for row in captions], device=device)  # [N, variants]
    unet.to(device).train()
    text_encoder.to(device).train()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=5e-4, total_steps=max(2, steps), pct_start=0.05)
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))
    p = VARIANT_P.to(device)
    start = time.time()
    for step in range(steps):
        if time.time() - start > budget_s:
            log(f"unet: time budget reached after {step} steps")
            break
        idx = torch.randint(len(latents), (batch,), device=device)
        variant = torch.multinomial(p, batch, replacement=True)
        ids = table[rows[idx, variant]]
        x0 = latents[idx]
        noise = torch.randn_like(x0)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), device=device)
        with amp:
            cond = text_encoder(ids).last_hidden_state
            pred = unet(scheduler.add_noise(x0, noise, t), t, cond).sample
        loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 1000 == 0 or step == steps - 1:
            log(f"unet step {step}: loss {loss.item():.4f}")
    unet.eval()
    text_encoder.eval()
    return step + 1


@torch.no_grad()
def sample_accuracy(pipe: StableDiffusionPipeline, n: int, seed: int = 0, guidance: float = 5.0) -> float:
    """Share of samples, prompted with `a <colour> <shape>` of seen concepts, that the classifier reads right."""
    judge = toy_classifier.load().to(pipe.device)
    concepts = seen_concepts()
    wanted = [concepts[i % len(concepts)] for i in range(n)]
    hits = 0
    for i in range(0, n, 50):
        chunk = wanted[i : i + 50]
        images = pipe(
            [f"a {c.replace('_', ' ')}" for c in chunk],
            num_inference_steps=25,
            guidance_scale=guidance,
            generator=torch.Generator("cpu").manual_seed(seed + i),
            output_type="pt",
        ).images  # [b, 3, 64, 64] in [0, 1]
        hits += sum(a == b for a, b in zip(judge.read(images * 2 - 1), chunk))
    return hits / n


def save(parts: dict, out: Path, scaling_factor: float) -> StableDiffusionPipeline:
    parts["vae"].register_to_config(scaling_factor=scaling_factor)
    pipe = StableDiffusionPipeline(
        vae=parts["vae"],
        text_encoder=parts["text_encoder"],
        tokenizer=parts["tokenizer"],
        unet=parts["unet"],
        scheduler=parts["scheduler"],
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(torch.float16).save_pretrained(out, safe_serialization=True)
    # the tokenizer as vocab.json + merges.txt (1.5 MB) instead of the 3.6 MB tokenizer.json
    for f in (out / "tokenizer").iterdir():
        f.unlink()
    write_clip_vocabulary(out / "tokenizer")
    return pipe.to(torch.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--vae-steps", type=int, default=4000)
    parser.add_argument("--unet-steps", type=int, default=15_000)
    parser.add_argument("--unet-budget-s", type=float, default=1e9, help="stop the UNet stage after this long")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--eval-samples", type=int, default=200)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - start:7.1f}s] {msg}", flush=True)

    torch.manual_seed(args.seed)
    parts = build()
    images, captions = render_dataset(args.images, args.seed)
    log(f"rendered {len(images)} images of {len(seen_concepts())} seen concepts")
    train_vae(parts["vae"], images, args.vae_steps, min(args.batch, 64), args.device, log)
    latents = encode_latents(parts["vae"], images, args.device)
    scaling_factor = float(1 / latents.std())
    log(f"latents {tuple(latents.shape)}, scaling factor {scaling_factor:.4f}")
    unet_steps = train_unet(
        parts, latents * scaling_factor, captions, args.unet_steps, args.batch, args.device, log, args.unet_budget_s
    )
    out = Path(args.out)
    pipe = save(parts, out, scaling_factor)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    accuracy = sample_accuracy(pipe.to(args.device), args.eval_samples) if args.eval_samples else float("nan")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20
    report = {
        "seconds": round(time.time() - start, 1),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "images": args.images,
        "vae_steps": args.vae_steps,
        "unet_steps": unet_steps,
        "batch": args.batch,
        "sample_accuracy": accuracy,
        "size_mib": round(size, 2),
    }
    (out / "recipe.json").write_text(json.dumps(report, indent=1) + "\n")
    log(f"done: {report}")


if __name__ == "__main__":
    main()
