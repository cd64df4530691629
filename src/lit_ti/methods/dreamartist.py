"""DreamArtist ("APT"): a positive embedding `<name>` and a negative `<name>-neg` learned together, with
classifier-free guidance inside the loss.

Dong et al., "DreamArtist" (arXiv 2211.11337) and its webui extension, re-implemented from the algorithm
(see docs/dreamartist.md). Each step encodes the negative and positive prompts in one text-encoder pass,
runs the UNet once on the doubled batch, and scores the guided prediction ε̂ = ε_neg + w·(ε_pos − ε_neg).
Optional: L1 reconstruction of the training image through the VAE decoder (with gradient), EMA with
reset per embedding, attention-map weighting (from the datamodule).

Fixed relative to the extension: dynamic guidance is per sample (batch > 1), gradient accumulation is the
Trainer's (correct for any count), the negative's lr weight survives LR-schedule boundaries, and the
reconstruction term always carries gradient (a test proves it).
"""

import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from lit_ti import losses
from lit_ti.data import ConceptDataModule
from lit_ti.errors import UserError, check_choice, check_number
from lit_ti.io.embeddings import to_file
from lit_ti.io.paths import STEP
from lit_ti.methods.textual_inversion import TextualInversion, check_vectors
from lit_ti.models import Backbone
from lit_ti.modules.ema import BankEMA
from lit_ti.modules.embedding_bank import swapped
from lit_ti.modules.text_conditioning import PromptEncoder, check_name

EXPORTS = ("ema", "live", "both")
MAX_CFG = 30.0  # training guidance; the guides use 3-5, A1111's sampling slider ends at 30
MAX_WEIGHT = 100.0  # lr and loss weights
MAX_PERIOD = 10**7  # steps


def check_cfg(spec, key: str = "method.cfg_scale") -> tuple[float, float, str]:
    """The training guidance as (lo, hi, ramp), both ends in [1, MAX_CFG] (1 = no guidance)."""
    lo, hi, ramp = losses.parse_cfg(spec, key)
    for end in (lo, hi):
        check_number(key, end, 1, MAX_CFG, hint="1 = no guidance; the guides train at 3-5")
    return lo, hi, ramp


class DreamArtist(TextualInversion):
    """Args (besides TextualInversion's, which describe the positive embedding):

    neg_num_vectors / neg_init_text / neg_init_file: the negative embedding `<name>-neg`.
    neg_init_noise: std of the noise added to the negative's initial vectors (breaks their symmetry).
    cfg_scale: training guidance `w`, a number or a range `lo-hi[:ln|cos|cos2|sqrt]` over the timestep.
    positive_filewords_only: the negative prompt leaves out the caption (the template line without
        `[filewords]`); otherwise it is the positive prompt with `<name>` replaced by `<name>-neg`.
    neg_lr_weight: the negative's lr is the optimizer's lr times this.
    embedding_clip_norm: clip each embedding's gradient to this L2 norm (null = off).
    reconstruction / reconstruction_weight: add λ·mean|x − D(x̂0)|, x̂0 from the guided prediction.
    vae_checkpointing: gradient checkpointing in the VAE decoder (reconstruction memory).
    ema_decay / ema_reset_every, neg_ema_decay / neg_ema_reset_every: EMA per embedding (decay 1 = off).
    export_vectors: `ema` (the averages; equal to the live vectors when EMA is off), `live`, or `both`
        (the live pair also as `<name>-live.pt` / `<name>-live-neg.pt`).
    """

    checkpointed = ("bank", "ema")
    stem_suffixes = (f"{STEP}-live-neg.safetensors",)  # export_vectors=both: `<name>-<step>-live-neg`

    def __init__(
        self,
        backbone,
        name: str,
        num_vectors: int = 3,
        init_text: str = "*",
        init_file: str | None = None,
        neg_num_vectors: int = 6,
        neg_init_text: str = "*",
        neg_init_file: str | None = None,
        neg_init_noise: float = 1e-3,
        cfg_scale: str | float = 3.0,
        positive_filewords_only: bool = False,
        neg_lr_weight: float = 1.0,
        embedding_clip_norm: float | None = 1.0,
        reconstruction: bool = False,
        reconstruction_weight: float = 1.0,
        vae_checkpointing: bool = False,
        ema_decay: float = 1.0,
        ema_reset_every: int = 25,
        neg_ema_decay: float = 1.0,
        neg_ema_reset_every: int = 25,
        export_vectors: str = "ema",
        **kwargs,
    ) -> None:
        super().__init__(backbone, name, num_vectors, init_text, init_file, **kwargs)
        check_choice("method.export_vectors", export_vectors, EXPORTS)
        for key, decay in (("ema_decay", ema_decay), ("neg_ema_decay", neg_ema_decay)):
            check_number(f"method.{key}", decay, 0, 1, low_open=True, hint="1 switches EMA off")
        for key, every in (("ema_reset_every", ema_reset_every), ("neg_ema_reset_every", neg_ema_reset_every)):
            check_number(f"method.{key}", every, 0, MAX_PERIOD, integer=True, hint="0 = never reset")
        check_number("method.neg_lr_weight", neg_lr_weight, 0, MAX_WEIGHT, low_open=True)
        check_number("method.reconstruction_weight", reconstruction_weight, 0, MAX_WEIGHT)
        check_number("method.embedding_clip_norm", embedding_clip_norm, 0, 1e6, low_open=True, optional=True)
        check_number("method.neg_init_noise", neg_init_noise, 0, 1)
        neg_num_vectors = check_vectors("method.neg_num_vectors", neg_num_vectors)
        self.neg_name = f"{name}-neg"
        self.neg_num_vectors = neg_num_vectors
        self.neg_init_text = neg_init_text
        self.neg_init_file = neg_init_file
        self.neg_init_noise = neg_init_noise
        self.cfg = check_cfg(cfg_scale)  # (lo, hi, ramp)
        self.positive_filewords_only = positive_filewords_only
        self.neg_lr_weight = neg_lr_weight
        self.embedding_clip_norm = embedding_clip_norm
        self.reconstruction = reconstruction
        self.reconstruction_weight = reconstruction_weight
        self.vae_checkpointing = vae_checkpointing
        self.ema_settings = {name: (ema_decay, ema_reset_every), self.neg_name: (neg_ema_decay, neg_ema_reset_every)}
        self.export_vectors = export_vectors
        # the positive name as a whole word (not inside "<name>-neg")
        self.name_pattern = re.compile(rf"(?<![\w-]){re.escape(name)}(?![\w-])", re.IGNORECASE)

    # ----------------------------------------------------------------- model
    def build_trainables(self, backbone: Backbone) -> None:
        super().build_trainables(backbone)  # the positive
        check_name(backbone.tokenizer, self.neg_name, "name (its negative)")
        neg = self.initial_vectors(
            backbone, self.neg_init_text, self.neg_num_vectors, self.neg_init_file, "method.neg_init_file"
        )
        if not self.neg_init_file:
            neg = {enc: v + self.neg_init_noise * torch.randn_like(v) for enc, v in neg.items()}
        self.bank.add(self.neg_name, neg)
        self.prompt_encoder = PromptEncoder(backbone, self.bank, self.clip_skip)
        self.ema = BankEMA(self.bank, self.ema_settings)
        if self.vae_checkpointing:
            self.vae.enable_gradient_checkpointing()

    def param_groups(self) -> list[dict]:
        return [
            {"params": list(self.bank.get(self.name).values())},
            {"params": list(self.bank.get(self.neg_name).values()), "lr_weight": self.neg_lr_weight},
        ]

    @property
    def needs_pixels(self) -> bool:
        return self.reconstruction

    # ----------------------------------------------------------------- step
    def on_fit_start(self) -> None:
        datamodule = self.trainer.datamodule
        if self.positive_filewords_only and isinstance(datamodule, ConceptDataModule):
            datamodule.setup("fit")
            if not all("[name]" in line for line in datamodule.plain_templates):
                raise UserError(
                    f"method.positive_filewords_only=true, but data.template={datamodule.template!r} leaves [name] to "
                    "the captions, so the negative prompt (the template without [filewords]) would never hold "
                    f"{self.neg_name!r}; set method.positive_filewords_only=false or put [name] in the template"
                )
        super().on_fit_start()

    def negative_prompts(self, batch: dict) -> list[str]:
        if self.positive_filewords_only and "template_plain" in batch:
            return [line.replace("[name]", self.neg_name) for line in batch["template_plain"]]
        return [self.name_pattern.sub(self.neg_name, p) for p in batch["prompt"]]

    def trained_samples(self, batch: dict) -> list[bool]:
        carries = self.prompt_encoder.carries
        return [p or n for p, n in zip(carries(batch["prompt"]), carries(self.negative_prompts(batch)))]

    def predict(self, noisy: Tensor, timesteps: Tensor, batch: dict) -> Tensor:
        """Guided prediction `[B, 4, h, w]` (fp32) from one UNet pass over the doubled batch."""
        cond = self.encode_prompts(self.negative_prompts(batch) + list(batch["prompt"]))  # [2B, 77, d]
        out = self.call_unet(torch.cat([noisy, noisy]), torch.cat([timesteps, timesteps]), cond)
        pred_neg, pred_pos = out.float().chunk(2)  # same noise and t in both halves
        w = losses.cfg_weights(*self.cfg, timesteps, self.backbone.scheduler.config.num_train_timesteps)
        return losses.guided(pred_neg, pred_pos, w)

    def step_loss(self, out: dict) -> Tensor:
        """The diffusion loss plus, with `reconstruction`, λ·mean|x − D(x̂0)| (both parts logged)."""
        if not self.reconstruction or out["skipped"]:
            return out["loss"]
        batch = out["batch"]  # the samples that can train
        if "pixels" not in batch:
            raise RuntimeError("reconstruction needs the training images; the datamodule did not keep them")
        x0 = self.objective.x0(out["noisy"], out["pred"], out["timesteps"])
        rec = losses.reconstruction_l1(self.decode(x0), batch["pixels"])
        if self.log_now:
            size = batch["latents"].shape[0]
            self.log("train/loss_diffusion", out["loss"], batch_size=size, sync_dist=True)
            self.log("train/loss_reconstruction", rec, batch_size=size, sync_dist=True)
        return out["loss"] + self.reconstruction_weight * rec

    def decode(self, latents: Tensor) -> Tensor:
        """VAE decoder *with* gradient: scaled latents `[B, 4, h, w]` -> pixels `[B, 3, H, W]`."""
        cfg = self.vae.config
        z = latents / cfg.scaling_factor + (cfg.get("shift_factor") or 0.0)
        return self.vae.decode(z.to(self.vae.dtype)).sample

    # ----------------------------------------------------------------- optimisation
    def on_before_optimizer_step(self, optimizer) -> None:
        super().on_before_optimizer_step(optimizer)
        if self.embedding_clip_norm:  # per embedding, as the original (after AMP unscaling)
            for name in self.bank.names:
                torch.nn.utils.clip_grad_norm_(list(self.bank.get(name).values()), self.embedding_clip_norm)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # once per optimizer step, so β means the same for any accumulation count (the original
        # updated after every micro-batch)
        self.ema.update(self.bank, self.trainer.global_step)

    # ----------------------------------------------------------------- export
    @contextmanager
    def as_exported(self) -> Iterator[None]:
        """The EMA averages while inside, unless the files named `<name>` hold the live pair
        (`export_vectors: live`). Between two resets (every `ema_reset_every` steps) the live vectors and the
        averages differ, so a run stopped early is measured and judged on what it writes."""
        with super().as_exported():
            if self.export_vectors == "live":
                yield
            else:
                with swapped(self.bank, self.ema.shadows()):
                    yield

    def concepts(self, tag: str = "") -> dict[str, Tensor]:
        """`{file stem: [n, d]}`: `<name><tag>` and `<name><tag>-neg`, so periodic copies stay usable pairs."""
        averaged = lambda n: self.ema.averaged(self.bank, n)  # noqa: E731
        pairs = {
            "ema": {"": averaged},
            "live": {"": self.bank.get},
            "both": {"": averaged, "-live": self.bank.get},
        }[self.export_vectors]
        out = {}
        for suffix, vectors in pairs.items():
            out[f"{self.name}{tag}{suffix}"] = to_file(vectors(self.name))
            out[f"{self.name}{tag}{suffix}-neg"] = to_file(vectors(self.neg_name))
        return out
