"""Prior images (DreamBooth's class images, kohya's regularisation folder): pictures of other things, each with
its own caption, which a method that changes the model (pivotal tuning's LoRA) goes on drawing as asked, so
that it learns the concept without unlearning the words around it ("large", "on a black background").

A prior image's prompt is its sidecar `.txt` caption as written, else `data.prior_prompt` (DreamBooth's class
prompt, "a photo of a person"), else its file name's words; it is never filled into the concept's template.
Every training sample is paired with one prior image drawn from the sample's own seed, so resumes and DDP
ranks see the same pairs. Prior latents are encoded once at the square training size (one size: a batch of
them stacks whatever bucket the concept's images are in) and sampled once (`random` is taken as `once`).
"""

import warnings
from pathlib import Path

import torch
from torch import Tensor

from lit_ti.data import images as img
from lit_ti.data.latents import Encoder, LatentCache, encode_folder
from lit_ti.errors import UserError

KEY = "data.prior_dir"


class PriorImages:
    """The images of `folder` and their prompts; `cache` encodes them, `draw` picks one for a sample."""

    def __init__(self, folder: Path, prompt: str | None = None) -> None:
        self.paths = img.list_images(folder, KEY)
        self.prompts = [
            prompt if prompt is not None and not p.with_suffix(".txt").is_file() else img.caption(p) for p in self.paths
        ]
        unnamed = [img.shown(p) for p, text in zip(self.paths, self.prompts) if not text.strip()]
        if unnamed:
            raise UserError(
                f"{KEY}: {len(unnamed)} image(s) have no caption to train them under: {img.listing(unnamed)}; add "
                "<image>.txt captions, or set data.prior_prompt (e.g. 'a photo of a person') for all of them"
            )
        self.latents: list[Tensor] = []  # per image [4, h, w]

    def cache(self, encode: Encoder, size: int, crop: str, sampling: str, seed: int, cache: LatentCache | None):
        """Encode every prior image at `size`² once; `deterministic` keeps the posterior mean, else one draw."""
        done = encode_folder(self.paths, [(size, size)] * len(self.paths), encode, crop, 1, 8, cache)
        if done.broken:
            listed = img.listing(done.broken, "; ")
            warnings.warn(f"{KEY}: skipped {len(done.broken)} unreadable image(s): {listed}", stacklevel=3)
        if not done.kept:
            raise UserError(f"{KEY}: no image could be decoded: {done.broken[0]}")
        self.paths = [self.paths[i] for i in done.kept]
        self.prompts = [self.prompts[i] for i in done.kept]
        g = torch.Generator().manual_seed(seed + 1)  # not the concept's draws: those stay as without a prior
        self.latents = [
            m[0] if sampling == "deterministic" else m[0] + s[0] * torch.randn(m[0].shape, generator=g)
            for m, s in zip(done.mean, done.std)
        ]

    def draw(self, g: torch.Generator) -> dict:
        """A prior image for one training sample, from that sample's generator (after its own draws)."""
        j = int(torch.randint(len(self.latents), (), generator=g))
        return {
            "prior_latents": self.latents[j],  # [4, h, w]
            "prior_prompt": self.prompts[j],
            "prior_noise_seed": int(torch.randint(2**62, (), generator=g)),
        }
