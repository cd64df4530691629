"""A tiny random SD3-shaped backbone built in code: an MMDiT, CLIP-L and CLIP-G with projections, a T5 encoder
with a tokenizer built offline, and a 16-channel VAE.

The T5 tokenizer is a small SentencePiece-style Unigram vocabulary (letters, digits, punctuation and a few
words) in transformers' `T5TokenizerFast`, so that it splits text as the real one does (words on whitespace,
`▁` word starts, `</s>` appended, `<pad>` = 0); the real SD3 vocabulary comes with the model's folder.
"""

import string
from dataclasses import dataclass
from functools import lru_cache

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel, T5TokenizerFast

from lit_ti.errors import UserError
from lit_ti.models.backbone import Backbone
from lit_ti.models.tiny import clip_text_encoder, clip_tokenizer

# The CLIP widths differ (a mix-up cannot pass) and T5's is wider than both together, as in SD3
# (768 + 1280 <= 4096): the CLIP states are zero-padded to T5's width.
SIZES = {
    "sd3_tiny": dict(
        image=64,  # -> latent 16x8x8
        vae=dict(block_out_channels=(8, 16, 32, 32), norm_num_groups=8, layers_per_block=1),
        transformer=dict(num_layers=2, attention_head_dim=8, num_attention_heads=4, pos_embed_max_size=16),
        clip_l=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4),
        clip_g=dict(hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4),
        t5=dict(d_model=96, d_kv=16, d_ff=128, num_layers=2, num_heads=4),
    ),
    # sd3_tiny with SD3.5's MMDiT-X parts: a second image-only attention in block 0, RMS-normed q and k
    "sd35_tiny": dict(
        image=64,
        vae=dict(block_out_channels=(8, 16, 32, 32), norm_num_groups=8, layers_per_block=1),
        transformer=dict(
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            pos_embed_max_size=16,
            dual_attention_layers=(0,),
            qk_norm="rms_norm",
        ),
        clip_l=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4),
        clip_g=dict(hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4),
        t5=dict(d_model=96, d_kv=16, d_ff=128, num_layers=2, num_heads=4),
    ),
    # SD3.5 medium's layer sizes (random weights; for time and memory measurements only)
    "sd35_medium": dict(
        image=1024,
        vae=dict(block_out_channels=(128, 256, 512, 512), norm_num_groups=32, layers_per_block=2),
        transformer=dict(
            num_layers=24,
            attention_head_dim=64,
            num_attention_heads=24,
            pos_embed_max_size=384,
            dual_attention_layers=tuple(range(13)),
            qk_norm="rms_norm",
        ),
        clip_l=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
        clip_g=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20),
        t5=dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64),
    ),
}
T5_WORDS = "a an the of in on at with and by photo picture painting drawing style art room background plain portrait"


@lru_cache(maxsize=1)
def _t5_backend() -> str:
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    chars = [c for c in string.printable if not c.isspace()]
    pieces += [(f"▁{w}", -2.0) for w in T5_WORDS.split()]
    pieces += [(f"▁{c}", -4.0) for c in chars] + [(c, -5.0) for c in chars]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    metaspace = dict(replacement="▁", prepend_scheme="always", split=True)
    # what transformers' T5 tokenizer sets: whitespace is a separator, never a token of its own
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(**metaspace)]
    )
    tok.decoder = decoders.Metaspace(**metaspace)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return tok.to_str()


def t5_tokenizer() -> T5TokenizerFast:
    """A small T5-style tokenizer (its own copy per call: loaders add tokens to it)."""
    return T5TokenizerFast(
        tokenizer_object=Tokenizer.from_str(_t5_backend()),
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_ids=0,
        model_max_length=512,
    )


@dataclass
class TinySD3:
    """Random-weight SD3-shaped components (no files, no downloads).

    Args:
        size: `sd3_tiny` (64 px), `sd35_tiny` (the same with SD3.5's dual attention and q/k norms) or
            `sd35_medium` (SD3.5 medium's layer sizes at 1024 px; benchmarks only).
        seed: weight initialisation seed; the same seed gives bit-identical weights.
        t5: build the T5 encoder; false = run without it, as SD3 allows (its part of the prompt is zeros).
    """

    size: str = "sd3_tiny"
    seed: int = 0
    t5: bool = True

    def load(self, dtype: torch.dtype = torch.float32) -> Backbone:
        if self.size not in SIZES:
            raise UserError(f"model.size={self.size!r} is unknown; use one of {', '.join(SIZES)}")
        cfg = SIZES[self.size]
        tokenizer, tokenizer_2 = clip_tokenizer(), clip_tokenizer(pad="!")  # as SDXL's two CLIP encoders
        tokenizer_3 = t5_tokenizer() if self.t5 else None
        state = torch.random.get_rng_state()
        torch.manual_seed(self.seed)
        try:
            n_vae = len(cfg["vae"]["block_out_channels"])
            vae = AutoencoderKL(
                down_block_types=("DownEncoderBlock2D",) * n_vae,
                up_block_types=("UpDecoderBlock2D",) * n_vae,
                latent_channels=16,
                sample_size=cfg["image"],
                scaling_factor=1.5305,  # SD3's VAE
                shift_factor=0.0609,
                use_quant_conv=False,
                use_post_quant_conv=False,
                **cfg["vae"],
            )
            clip_l = clip_text_encoder(CLIPTextModelWithProjection, tokenizer, cfg["clip_l"], "quick_gelu")
            clip_g = clip_text_encoder(CLIPTextModelWithProjection, tokenizer_2, cfg["clip_g"], "gelu")
            t5 = None
            if tokenizer_3 is not None:
                t5 = T5EncoderModel(
                    T5Config(
                        vocab_size=len(tokenizer_3),
                        feed_forward_proj="gated-gelu",
                        pad_token_id=tokenizer_3.pad_token_id,
                        eos_token_id=tokenizer_3.eos_token_id,
                        is_encoder_decoder=False,
                        **cfg["t5"],
                    )
                )
            sizes = cfg["transformer"]
            transformer = SD3Transformer2DModel(
                sample_size=cfg["image"] // 2 ** (n_vae - 1),
                patch_size=2,
                in_channels=16,
                out_channels=16,
                joint_attention_dim=cfg["t5"]["d_model"],
                caption_projection_dim=sizes["num_attention_heads"] * sizes["attention_head_dim"],
                pooled_projection_dim=cfg["clip_l"]["hidden_size"] + cfg["clip_g"]["hidden_size"],
                **sizes,
            )
        finally:
            torch.random.set_rng_state(state)  # building a model must not disturb training RNG
        if dtype != torch.float32:
            transformer, clip_l, clip_g = transformer.to(dtype), clip_l.to(dtype), clip_g.to(dtype)
            t5 = None if t5 is None else t5.to(dtype)
        return Backbone(
            unet=transformer,
            vae=vae,
            text_encoder=clip_l,
            tokenizer=tokenizer,
            scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
            name=f"lit_ti-{self.size}-seed{self.seed}",
            text_encoder_2=clip_g,
            tokenizer_2=tokenizer_2,
            text_encoder_3=t5,
            tokenizer_3=tokenizer_3,
        ).freeze()
