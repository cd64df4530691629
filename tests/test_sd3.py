"""SD3 / SD3.5: one concept owns CLIP-L, CLIP-G and T5 parts, encoded exactly as diffusers' SD3 pipeline does,
trained by flow matching, and written as `clip_l` + `clip_g` + `t5xxl` files the other tools load."""

import pytest
import torch

from lit_ti.models import TinySD3
from lit_ti.modules.embedding_bank import EmbeddingBank
from lit_ti.modules.text_conditioning import PromptEncoder

NAME = "toy-concept"
PARTS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2", "text_encoder_3": "tokenizer_3"}


@pytest.fixture(scope="module")
def sd3():
    return TinySD3().load()


@pytest.fixture(scope="module")
def sd3_no_t5():
    return TinySD3(t5=False).load()


def random_concept(backbone, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        key: torch.randn(n, enc.get_input_embeddings().weight.shape[1], generator=g)
        for key, (_, enc) in backbone.text_encoders.items()
    }


def diffusers_with_tokens(backbone, vectors: dict[str, torch.Tensor]):
    """The backbone's diffusers SD3 pipeline with the concept added as diffusers users do it by hand: a token
    per vector (`name`, `name_1`, ...) in each encoder's tokenizer, and its embedding row set to the vector."""
    pipe = backbone.pipeline()
    n = next(iter(vectors.values())).shape[0]
    tokens = [NAME] + [f"{NAME}_{i}" for i in range(1, n)]
    for key, v in vectors.items():
        tokenizer, encoder = getattr(pipe, PARTS[key]), getattr(pipe, key)
        tokenizer.add_tokens(tokens)
        encoder.resize_token_embeddings(len(tokenizer))
        with torch.no_grad():
            encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(tokens)] = v
    return pipe, " ".join(tokens)


PROMPTS = [f"a photo of {NAME} in a room", f"{NAME}, painting by an artist", "a plain background"]


@pytest.mark.parametrize("clip_skip", [1, 2])
@pytest.mark.parametrize("t5", [True, False])
def test_sd3_conditioning_equals_diffusers_encode_prompt(sd3, sd3_no_t5, t5, clip_skip):
    backbone = sd3 if t5 else sd3_no_t5
    vectors = random_concept(backbone, n=2)
    pipe, spelled = diffusers_with_tokens(backbone, vectors)
    bank = EmbeddingBank()
    bank.add(NAME, vectors)
    with torch.no_grad():
        ours = PromptEncoder(backbone, bank, clip_skip=clip_skip)(PROMPTS)
        theirs, _, pooled, _ = pipe.encode_prompt(
            [p.replace(NAME, spelled) for p in PROMPTS],
            None,
            None,
            device="cpu",
            do_classifier_free_guidance=False,
            clip_skip=None if clip_skip == 1 else clip_skip - 1,  # diffusers counts the layers skipped past -2
        )
    assert ours.states.shape == theirs.shape == (3, 77 + 256, 96)
    assert ours.pooled.shape == pooled.shape == (3, 32 + 48)
    torch.testing.assert_close(ours.states, theirs, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.pooled, pooled, atol=1e-5, rtol=0)
    # the vectors do reach every part: other vectors give other states in the CLIP and in the T5 rows
    other = EmbeddingBank()
    other.add(NAME, random_concept(backbone, n=2, seed=1))
    with torch.no_grad():
        moved = PromptEncoder(backbone, other, clip_skip=clip_skip)(PROMPTS[:1]).states[0] - ours.states[0]
    assert moved[:77, :32].abs().max() > 1e-3 and moved[:77, 32:80].abs().max() > 1e-3
    assert (moved[77:].abs().max() > 1e-3) == t5
