"""A tiny random SD-shaped backbone built in code: the fixture of the tests and of quick CPU runs.

The tokenizer is the real CLIP BPE vocabulary (49,408 tokens), read from the `bpe_simple_vocab_16e6.txt.gz`
data file that the `openai-clip` package ships; the package itself is never imported (its `__init__` needs
torchvision).
"""

import copy
import gzip
import importlib.util
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.utils import logging as diffusers_logging
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from lit_ti.errors import UserError
from lit_ti.models.backbone import Backbone, check_prediction_type

# Sizes in the spirit of diffusers' own dummy test components; "small" and the SD1.5-shaped "sd15"
# (real SD1.5 layer sizes, random weights) are for benchmarks: speed does not depend on weight values.
SIZES = {
    "tiny": dict(
        image=64,  # -> latent 4x8x8
        vae=dict(block_out_channels=(8, 16, 32, 32), norm_num_groups=8, layers_per_block=1),
        unet=dict(
            block_out_channels=(32, 64),
            attention_head_dim=(2, 4),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            layers_per_block=1,
        ),
        text=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4),
    ),
    "small": dict(
        image=128,  # -> latent 4x16x16
        vae=dict(block_out_channels=(32, 64, 128, 128), norm_num_groups=32, layers_per_block=1),
        unet=dict(
            block_out_channels=(64, 128, 256),
            attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            layers_per_block=2,
        ),
        text=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4),
    ),
    # SD2-shaped: an OpenCLIP-like encoder (gelu, pads with "!") and linear attention projections
    "sd2_tiny": dict(
        image=64,
        vae=dict(block_out_channels=(8, 16, 32, 32), norm_num_groups=8, layers_per_block=1),
        unet=dict(
            block_out_channels=(32, 64),
            attention_head_dim=(2, 4),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            layers_per_block=1,
            use_linear_projection=True,
        ),
        text=dict(hidden_size=40, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4),
        open_clip=True,
    ),
    # SDXL-shaped: two text encoders of different widths (so a mix-up cannot pass), pooled + size conditioning
    "sdxl_tiny": dict(
        image=64,
        vae=dict(block_out_channels=(8, 16, 32, 32), norm_num_groups=8, layers_per_block=1),
        unet=dict(
            block_out_channels=(32, 64),
            attention_head_dim=(2, 4),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            layers_per_block=1,
            transformer_layers_per_block=(1, 2),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 48,  # 6 size/crop numbers × 8 + the pooled width
        ),
        text=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4),
        # 10 layers: diffusers recognises a bigG encoder in a single file by its 10th block
        text_2=dict(hidden_size=48, intermediate_size=64, num_hidden_layers=10, num_attention_heads=4),
    ),
    "sd15": dict(
        image=512,  # -> latent 4x64x64
        vae=dict(block_out_channels=(128, 256, 512, 512), norm_num_groups=32, layers_per_block=2),
        unet=dict(
            block_out_channels=(320, 640, 1280, 1280),
            attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            layers_per_block=2,
        ),
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
    ),
}


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable-character table."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return dict(zip(keep + extra, [chr(c) for c in keep] + [chr(256 + i) for i in range(len(extra))]))


def _find_bpe_file() -> Path:
    spec = importlib.util.find_spec("clip")  # locates the package without running its __init__
    if spec and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
        if path.is_file():
            return path
    raise UserError(
        "the built-in tiny backbone needs the CLIP vocabulary from the `openai-clip` package; "
        "install it with `pip install openai-clip`"
    )


def clip_tokenizer(pad: str = "<|endoftext|>") -> CLIPTokenizer:
    """The CLIP tokenizer (49,408 tokens), built offline from the openai-clip BPE file.

    pad: the padding token: `<|endoftext|>` for SD1.x and SDXL's first encoder; `!` for the OpenCLIP
        encoders (SD2.x, SDXL's second), which pad with token 0.
    Each call returns its own copy: loaders such as diffusers' `load_textual_inversion` add tokens to it.
    """
    tokenizer = copy.deepcopy(_clip_tokenizer())
    if pad != tokenizer.pad_token:
        tokenizer.pad_token = pad
    return tokenizer


def _clip_vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    with gzip.open(_find_bpe_file()) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]  # line 0 is a header
    chars = list(_bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(vocab)}, merges


@lru_cache(maxsize=1)
def _clip_tokenizer() -> CLIPTokenizer:
    vocab, merges = _clip_vocabulary()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def write_clip_vocabulary(folder: Path) -> None:
    """The tokenizer as the classic `vocab.json` + `merges.txt` pair (what SD model folders ship)."""
    vocab, merges = _clip_vocabulary()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8"
    )
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "pad_token": "<|endoftext|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")


@dataclass
class TinyBackbone:
    """Random-weight SD-shaped components (no files, no downloads).

    Args:
        size: `tiny` (64 px, 2.6 M parameters), `small` (128 px, 38 M), `sd15` (512 px, SD1.5's shapes),
            `sd2_tiny` (64 px, SD2-shaped: OpenCLIP-like encoder, linear projections) or `sdxl_tiny` (64 px,
            SDXL-shaped: two text encoders, pooled and size conditioning).
        seed: weight initialisation seed; the same seed gives bit-identical weights.
        prediction_type: `epsilon` or `v_prediction`.
    """

    size: str = "tiny"
    seed: int = 0
    prediction_type: str = "epsilon"

    def load(self, dtype: torch.dtype = torch.float32) -> Backbone:
        if self.size not in SIZES:
            raise UserError(f"model.size={self.size!r} is unknown; use one of {', '.join(SIZES)}")
        check_prediction_type(self.prediction_type, "model.prediction_type")
        cfg = SIZES[self.size]
        open_clip = cfg.get("open_clip", False)  # SD2's encoder: OpenCLIP, padding with "!"
        tokenizer = clip_tokenizer(pad="!" if open_clip else "<|endoftext|>")
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(self.seed)
        try:
            n_vae = len(cfg["vae"]["block_out_channels"])
            vae = AutoencoderKL(
                down_block_types=("DownEncoderBlock2D",) * n_vae,
                up_block_types=("UpDecoderBlock2D",) * n_vae,
                latent_channels=4,
                sample_size=cfg["image"],
                **cfg["vae"],
            )
            text_encoder = clip_text_encoder(
                CLIPTextModel, tokenizer, cfg["text"], "gelu" if open_clip else "quick_gelu"
            )
            width = cfg["text"]["hidden_size"]
            text_encoder_2 = tokenizer_2 = None
            if "text_2" in cfg:  # SDXL's second (OpenCLIP bigG-like) encoder, with the pooled projection
                tokenizer_2 = clip_tokenizer(pad="!")
                text_encoder_2 = clip_text_encoder(CLIPTextModelWithProjection, tokenizer_2, cfg["text_2"], "gelu")
                width += cfg["text_2"]["hidden_size"]
            unet = UNet2DConditionModel(
                sample_size=cfg["image"] // 2 ** (n_vae - 1),
                in_channels=4,
                out_channels=4,
                cross_attention_dim=width,
                norm_num_groups=32,
                **cfg["unet"],
            )
        finally:
            torch.random.set_rng_state(generator_state)  # building a model must not disturb training RNG
        scheduler = DDPMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            num_train_timesteps=1000,
            clip_sample=False,
            steps_offset=1,
            prediction_type=self.prediction_type,
        )
        if dtype != torch.float32:
            verbosity = diffusers_logging.get_verbosity()
            diffusers_logging.set_verbosity_error()  # a fresh model has no fp32-only modules to warn about
            unet, text_encoder = unet.to(dtype), text_encoder.to(dtype)
            text_encoder_2 = None if text_encoder_2 is None else text_encoder_2.to(dtype)
            diffusers_logging.set_verbosity(verbosity)
        return Backbone(
            unet=unet,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            scheduler=scheduler,
            name=f"lit_ti-{self.size}-seed{self.seed}",
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
        ).freeze()


def clip_text_encoder(cls, tokenizer: CLIPTokenizer, sizes: dict, act: str):
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_act=act,
        projection_dim=sizes["hidden_size"],
        **sizes,
    )
    return cls(config)
