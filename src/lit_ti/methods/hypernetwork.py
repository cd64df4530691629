"""Hypernetwork training (AUTOMATIC1111 style): small residual MLPs on attention K/V inputs learn a style
while the whole backbone stays frozen. Same data, templates, callbacks and resume as textual inversion.

Prompts are plain text (`[name]` is just a word here, as in A1111), so the text encoder's output is cached per
prompt string: a run reuses a handful of template lines.
"""

from collections.abc import Sequence
from pathlib import Path

import torch

from lit_ti import io
from lit_ti.errors import UserError, check_number, quote
from lit_ti.io.formats import HYPERNETWORK, exportable
from lit_ti.methods.base import DiffusionMethod
from lit_ti.models import Backbone
from lit_ti.modules.embedding_bank import EmbeddingBank
from lit_ti.modules.hypernetwork import Hypernetwork, attach, check_settings
from lit_ti.modules.text_conditioning import Conditioning, PromptEncoder

FORMATS = exportable(HYPERNETWORK)  # pt, safetensors
MAX_STRENGTH = 10.0  # A1111's slider ends at 1; prompts may ask for more


def as_list(key: str, value, example: str) -> list | None:
    """A config list (a Hydra ListConfig, a list or tuple) as a list; None stays None."""
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise UserError(f"{key}={quote(value)}: write a list, e.g. {key}={example}, or null")
    return list(value)


class HypernetworkMethod(DiffusionMethod):
    """Args (besides the base ones):

    name: the file name (and the word `[name]` becomes in prompts).
    sizes: context widths to create modules for; null = what the backbone uses (its text width, plus its
        self-attention widths when `self_attention`), like A1111's 768/320/640/1280 for SD1.
    layer_structure, activation_func, weight_initialization, add_layer_norm, activate_output,
    dropout_structure: A1111's creation options (`dropout_structure` null = no dropout).
    self_attention: also transform self-attention K/V at matching widths (A1111 does).
    strength: the multiplier used outside training (previews, evaluation); training always uses 1.
    init_file: an A1111 `.pt` or our `.safetensors` hypernetwork to continue from (its settings win).
    """

    checkpointed = ("hypernetwork",)
    periodic_dirname = "hypernetworks"

    def __init__(
        self,
        backbone,
        name: str,
        sizes: list[int] | None = None,
        layer_structure: list[float] = (1, 2, 1),
        activation_func: str = "linear",
        weight_initialization: str = "Normal",
        add_layer_norm: bool = False,
        activate_output: bool = False,
        dropout_structure: list[float] | None = None,
        self_attention: bool = True,
        strength: float = 1.0,
        init_file: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(backbone, name, **kwargs)
        self.save_hyperparameters(ignore=["backbone", "optimizer", "lr_scheduler"])
        self.sizes = as_list("method.sizes", sizes, "[768,320,640,1280]") or None
        self.hn_settings = dict(
            layer_structure=as_list("method.layer_structure", layer_structure, "[1,2,1]"),
            activation_func=activation_func,
            weight_init=weight_initialization,
            add_layer_norm=add_layer_norm,
            activate_output=activate_output,
            dropout_structure=as_list("method.dropout_structure", dropout_structure, "[0,0.3,0]") or None,
        )
        check_settings(**self.hn_settings)
        for size in self.sizes or []:
            check_number("method.sizes", size, 1, 16384, integer=True, hint="each entry a context width")
        self.self_attention = self_attention
        self.strength = check_number("method.strength", strength, 0, MAX_STRENGTH, hint="0 = off, 1 = as trained")
        self.init_file = init_file
        self.cond_cache: dict[str, Conditioning] = {}  # prompt -> its unbatched conditioning

    def build_trainables(self, backbone: Backbone) -> None:
        if self.init_file:
            self.hypernetwork, _ = io.load_hypernetwork(self.init_file)
        else:
            widths = self.backbone_widths(backbone)
            if self.sizes and not set(self.sizes) & set(widths):
                raise UserError(
                    f"method.sizes={self.sizes}: this model's attention layers take widths {widths}, so no module "
                    "would ever be used; pick from those, or null"
                )
            self.hypernetwork = Hypernetwork(self.sizes or widths, **self.hn_settings)
        self.hypernetwork.set_strength(self.strength)
        attach(self.unet, self.hypernetwork, self.self_attention)
        self.prompt_encoder = PromptEncoder(backbone, EmbeddingBank(), self.clip_skip)

    def backbone_widths(self, backbone: Backbone) -> list[int]:
        cfg = backbone.unet.config
        if backbone.is_sd3:  # the joint attention's context stream (and SD3.5's image-only attention)
            return [int(cfg.num_attention_heads * cfg.attention_head_dim)]
        widths = {int(cfg.cross_attention_dim)}
        if self.self_attention:
            widths |= {int(c) for c in cfg.block_out_channels}
        return sorted(widths)

    def param_groups(self) -> list[dict]:
        return [{"params": list(self.hypernetwork.parameters())}]

    @property
    def concept_bank(self) -> None:
        return None  # no prompt token trains; judged by `toy.style` instead

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Frozen text encoder output, cached per prompt (nothing upstream of the UNet trains)."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self.cond_cache]
        if missing:
            cond = self.prompt_encoder(missing, self.device)
            for i, prompt in enumerate(missing):
                self.cond_cache[prompt] = Conditioning(cond.states[i], None if cond.pooled is None else cond.pooled[i])
        rows = [self.cond_cache[p] for p in prompts]
        pooled = None if rows[0].pooled is None else torch.stack([r.pooled for r in rows])
        return Conditioning(torch.stack([r.states for r in rows]), pooled)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        if not self.log_now:
            return
        norm = torch.stack([p.detach().norm() for p in self.hypernetwork.parameters()]).norm()
        self.log("train/hypernetwork_norm", norm, batch_size=1)

    def export(self, directory: Path, step: int, tag: str = "", formats=("pt", "safetensors")) -> list[Path]:
        """`<directory>/<name><tag>.pt` (A1111 layout) and `.safetensors`; the stored name stays `name` (A1111)."""
        unknown = set(formats) - set(FORMATS)
        if unknown:
            raise UserError(
                f"callbacks.export.formats: hypernetworks are written as {' or '.join(FORMATS)}, not {sorted(unknown)}"
            )
        return [
            io.save_hypernetwork(
                Path(directory) / f"{self.name}{tag}.{fmt}",
                self.hypernetwork,
                name=self.name,
                step=step,
                sd_checkpoint=self.backbone.checkpoint_hash,
                sd_checkpoint_name=self.backbone.name,
            )
            for fmt in formats
        ]

    def export_images(self, directory: Path, step: int, preview) -> list[Path]:
        return []  # A1111 has no hypernetwork-in-PNG format


def attach_file(
    unet, path: str | Path, strength: float = 1.0, self_attention: bool = True
) -> tuple[Hypernetwork, dict]:
    """Load a hypernetwork file (A1111 `.pt` or ours) onto a diffusers UNet for generation:

    hn, original = attach_file(pipe.unet, "style.pt", strength=0.8)
    images = pipe("a red circle").images
    detach(pipe.unet, original)
    """
    hn, _ = io.load_hypernetwork(path)
    hn.to(unet.device).eval().set_strength(strength)
    return hn, attach(unet, hn, self_attention)
