"""The naive textual-inversion step the benchmarks compare against: what diffusers' example script does.

Per step, as `examples/textual_inversion/textual_inversion.py` (see the shared reference `ti_trainers.md`):
the images are decoded from disk, resized, flipped and VAE-encoded again; the prompt is tokenized again;
the new tokens live in the text encoder's full input-embedding table, AdamW holds moments for all of its
rows (49408 x d), and after every step every row but the new ones is copied back from a saved original.
Nothing is cached. Used only by `ti_speed.py`; not part of lit_ti.
"""

import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

TEMPLATES = ["a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "a close-up photo of a {}"]


class NaiveDataset(torch.utils.data.Dataset):
    """Opens, resizes, flips and tokenizes on every access, as the example's dataset does."""

    def __init__(self, folder: Path, tokenizer, placeholder: str, size: int, repeats: int) -> None:
        self.paths = sorted(p for p in folder.iterdir() if p.suffix == ".png")
        self.tokenizer, self.placeholder, self.size, self.repeats = tokenizer, placeholder, size, repeats

    def __len__(self) -> int:
        return len(self.paths) * self.repeats

    def __getitem__(self, i: int) -> dict:
        text = random.choice(TEMPLATES).format(self.placeholder)
        ids = self.tokenizer(text, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
        image = Image.open(self.paths[i % len(self.paths)]).convert("RGB")
        image = image.resize((self.size, self.size), Image.Resampling.BICUBIC)
        if random.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
        return {"input_ids": ids.input_ids[0], "pixel_values": pixels}


def run(
    bb,
    folder: Path,
    batch: int,
    steps: int,
    warmup: int,
    warmup_s: float = 0.0,
    num_vectors: int = 4,
    dtype=torch.float32,
) -> dict:
    """Train naive steps on a loaded backbone: at least `warmup` steps and `warmup_s` seconds, then `steps`
    timed ones."""
    device = bb.unet.device
    tokenizer, text_encoder, vae, unet, scheduler = bb.tokenizer, bb.text_encoder, bb.vae, bb.unet, bb.scheduler
    tokens = ["<bench-concept>"] + [f"<bench-concept>_{i}" for i in range(1, num_vectors)]
    tokenizer.add_tokens(tokens)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    init = tokenizer("thing", add_special_tokens=False).input_ids[0]
    text_encoder.resize_token_embeddings(len(tokenizer))
    table = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        table[ids] = table[init].clone()
    # frozen as the example freezes them; only the token table trains, and it trains whole
    vae.requires_grad_(False)
    unet.requires_grad_(False)
    text_model = getattr(text_encoder, "text_model", text_encoder)  # transformers 5 drops the wrapper
    text_model.encoder.requires_grad_(False)
    text_model.final_layer_norm.requires_grad_(False)
    text_model.embeddings.position_embedding.requires_grad_(False)
    table.requires_grad_(True)
    if dtype != torch.float32:  # as the example: frozen UNet and VAE in the training precision
        vae.to(dtype), unet.to(dtype)
    text_encoder.train()
    optimizer = torch.optim.AdamW([table], lr=5e-3, weight_decay=0.0)
    original = table.detach().clone()
    keep = torch.ones(len(tokenizer), dtype=torch.bool, device=device)
    keep[ids] = False

    data = NaiveDataset(folder, tokenizer, " ".join(tokens), bb.resolution, repeats=max(1, batch))
    loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True, drop_last=True)
    done, t0, t0_step, first, start = 0, None, 0, None, time.perf_counter()
    while t0 is None or done < t0_step + steps:
        for b in loader:
            latents = vae.encode(b["pixel_values"].to(device, dtype)).latent_dist.sample().detach()
            latents = latents * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=device)
            noisy = scheduler.add_noise(latents, noise, t)
            states = text_encoder(b["input_ids"].to(device))[0].to(dtype)
            pred = unet(noisy, t, states).sample
            loss = F.mse_loss(pred.float(), noise.float())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            with torch.no_grad():  # the example's restore of every row but the new tokens
                table[keep] = original[keep]
            done += 1
            if t0 is None:  # warming up (as the lit_ti rows: see ti_speed.Timer)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                now = time.perf_counter()
                if done == 1:
                    first = now - start
                if done >= warmup and now - start >= warmup_s:
                    t0, t0_step = now, done
            elif done == t0_step + steps:
                break
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    return {"samples/s": steps * batch / elapsed, "ms/step": 1000 * elapsed / steps, "first step s": first}
