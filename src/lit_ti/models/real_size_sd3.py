"""SD3 / SD3.5 at the real layer sizes of a shipped config (random weights), for time and memory measurements.

SD3.5 large's MMDiT alone is 8.1 B parameters (16 GB in bf16) and T5-XXL 4.8 B: more than a small machine
holds. With `share_blocks`, every repeated block is ONE module used at each depth where that kind of block
sits (the MMDiT's dual-attention, plain and last blocks; each CLIP's layers; T5's blocks after the first,
which alone holds the relative position bias). The model then has the real widths, the real depth and the
real compute per step (every block runs at every depth, forward and backward), and holds only one block of
each kind in memory. Measured memory is then peak RSS with those weights; `weight_bytes` says what the
unshared weights would add.
"""

from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from lit_ti.errors import UserError
from lit_ti.models.backbone import Backbone, built_in
from lit_ti.models.sd3_single_file import SHIPPED
from lit_ti.models.single_file import shipped_folder
from lit_ti.models.tiny import clip_tokenizer
from lit_ti.models.tiny_sd3 import t5_tokenizer

CONFIGS = tuple(sorted(set(SHIPPED.values())))


@dataclass
class RealSizeSD3:
    """Random-weight SD3 / SD3.5 built from a shipped config (no files, no downloads).

    Args:
        config: `sd3_medium`, `sd35_medium` or `sd35_large` (folders of `assets/single_file/`).
        t5: build T5-XXL; false = run without it, as SD3 allows.
        share_blocks: one module per kind of repeated block (real depth and compute, one block's weights).
        seed: weight initialisation seed.
    """

    config: str = "sd35_medium"
    t5: bool = True
    share_blocks: bool = True
    seed: int = 0

    def load(self, dtype: torch.dtype = torch.float32) -> Backbone:
        if self.config not in CONFIGS:
            raise UserError(f"model.config={self.config!r} is unknown; use one of {', '.join(CONFIGS)}")
        folder = shipped_folder(self.config)
        tokenizer, tokenizer_2 = clip_tokenizer(), clip_tokenizer(pad="!")
        tokenizer_3 = t5_tokenizer() if self.t5 else None  # a small vocabulary: T5's 32128 rows stay
        state = torch.random.get_rng_state()
        torch.manual_seed(self.seed)
        try:
            with built_in(dtype):  # built in the precision's dtype, never fp32 first
                transformer = mmdit(SD3Transformer2DModel.load_config(folder / "transformer"), self.share_blocks)
                clip_l = clip(CLIPTextConfig.from_pretrained(folder / "text_encoder"), self.share_blocks)
                clip_g = clip(CLIPTextConfig.from_pretrained(folder / "text_encoder_2"), self.share_blocks)
                t5 = (
                    t5_encoder(T5Config.from_pretrained(folder / "text_encoder_3"), self.share_blocks)
                    if self.t5
                    else None
                )
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))  # fp32, as every loader's
        finally:
            torch.random.set_rng_state(state)
        # transformers builds some layers in the dtype its config names (the upstream files say float16)
        clip_l, clip_g = clip_l.to(dtype), clip_g.to(dtype)
        t5 = None if t5 is None else t5.to(dtype)
        return Backbone(
            unet=transformer,
            vae=vae,
            text_encoder=clip_l,
            tokenizer=tokenizer,
            scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler"),
            name=f"lit_ti-random-{self.config}",
            text_encoder_2=clip_g,
            tokenizer_2=tokenizer_2,
            text_encoder_3=t5,
            tokenizer_3=tokenizer_3,
        ).freeze()


def repeated(modules: torch.nn.ModuleList, kinds: list[int]) -> torch.nn.ModuleList:
    """A ModuleList holding `modules[kinds[i]]` at position i (the same module object at many depths)."""
    return torch.nn.ModuleList([modules[k] for k in kinds])


def mmdit(config: dict, share: bool) -> SD3Transformer2DModel:
    if not share:
        return SD3Transformer2DModel.from_config(config)
    n, dual = config["num_layers"], set(config.get("dual_attention_layers") or ())
    # one block per kind, in the order the kinds appear; the last block (no context output) must stay last
    kinds = ["dual" if i in dual else "last" if i == n - 1 else "plain" for i in range(n)]
    order = list(dict.fromkeys(kinds))
    small = {**config, "num_layers": len(order), "dual_attention_layers": (0,) if "dual" in order else ()}
    model = SD3Transformer2DModel.from_config(small)
    model.transformer_blocks = repeated(model.transformer_blocks, [order.index(k) for k in kinds])
    model.register_to_config(num_layers=n, dual_attention_layers=tuple(sorted(dual)))
    return model


def clip(config: CLIPTextConfig, share: bool) -> CLIPTextModelWithProjection:
    n = config.num_hidden_layers
    if share:
        config.num_hidden_layers = 1
    model = CLIPTextModelWithProjection(config)
    if share:
        model.text_model.encoder.layers = repeated(model.text_model.encoder.layers, [0] * n)
        model.config.num_hidden_layers = n
    return model


def t5_encoder(config: T5Config, share: bool) -> T5EncoderModel:
    n = config.num_layers
    if share:
        config.num_layers = 2  # block 0 holds the relative position bias, the others share block 1
    model = T5EncoderModel(config)
    if share:
        model.encoder.block = repeated(model.encoder.block, [0] + [1] * (n - 1))
        model.config.num_layers = n
    return model


def weight_bytes(config: str, dtype: torch.dtype, t5: bool = True) -> dict[str, int]:
    """Bytes of each part's unshared weights in `dtype` (the VAE in fp32), from the shipped config."""
    with torch.device("meta"):
        spec = RealSizeSD3(config, t5=t5, share_blocks=False)
        backbone = spec.load(dtype)
    return {
        part: sum(p.numel() * p.element_size() for p in module.parameters())
        for part, module in (
            ("transformer", backbone.unet),
            ("vae", backbone.vae),
            ("clip_l", backbone.text_encoder),
            ("clip_g", backbone.text_encoder_2),
            *((("t5", backbone.text_encoder_3),) if t5 else ()),
        )
    }
