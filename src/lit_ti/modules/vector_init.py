"""Where new token vectors start and which norm they keep: the vocabulary's own scale.

A1111 copies the init text's token embeddings (`init_vectors`). Two other starts are offered:
* `cross`: the text encoder's output for the init text at its tokens' positions (Cross Initialization, Pang et
  al., arXiv 2312.15905): the vector the UNet already sees for that word, so the first steps need not learn
  what the encoder's layers do to a token.
* `median_norm`: the token copy rescaled to the vocabulary's median norm (a `*` or a rare word can sit far from
  the typical norm, and the step size of Adam is the same whatever the norm).

`rescale` keeps trained vectors at a norm (OneTrainer's `preserve_embedding_norm`): vectors whose norm grows far
past the vocabulary's make a prompt ignore everything but the concept (Directional TI, arXiv 2512.13672).
"""

import torch
from torch import Tensor

from lit_ti.errors import check_choice
from lit_ti.modules.text_conditioning import init_vectors

INIT_MODES = ("copy", "cross", "median_norm")


def vocabulary_norm(text_encoder) -> float:
    """The median L2 norm of the text encoder's token-embedding rows (robust to the few odd tokens)."""
    return float(text_encoder.get_input_embeddings().weight.detach().float().norm(dim=-1).median())


@torch.no_grad()
def cross_vectors(tokenizer, text_encoder, init_text: str, n: int) -> Tensor:
    """The encoder's last hidden states `[n, d]` at the init text's tokens, spread over `n` vectors as
    `init_vectors` spreads the embeddings; an empty init text gives zeros."""
    ids = tokenizer(init_text, add_special_tokens=False).input_ids[:n]
    width = text_encoder.get_input_embeddings().weight.shape[1]
    if not ids:
        return torch.zeros(n, width)
    device = text_encoder.get_input_embeddings().weight.device
    start = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]  # T5 has no start token
    full = torch.tensor([[*start, *ids, tokenizer.eos_token_id]], device=device)
    states = text_encoder(full).last_hidden_state[0, len(start) : len(start) + len(ids)].float().cpu()  # [k, d]
    return states[[i * len(ids) // n for i in range(n)]]


def rescale(vectors: Tensor, norm: float) -> Tensor:
    """Each row of `[n, d]` scaled to L2 norm `norm` (zero rows stay zero)."""
    lengths = vectors.norm(dim=-1, keepdim=True)
    return torch.where(lengths > 0, vectors * (norm / lengths.clamp_min(1e-12)), vectors)


def start_vectors(mode: str, tokenizer, text_encoder, init_text: str, n: int) -> Tensor:
    """Initial vectors `[n, d]` fp32 for one text encoder by `mode` (one of INIT_MODES)."""
    check_choice("method.init_mode", mode, INIT_MODES)
    if mode == "cross":
        return cross_vectors(tokenizer, text_encoder, init_text, n)
    vectors = init_vectors(tokenizer, text_encoder, init_text, n)
    return rescale(vectors, vocabulary_norm(text_encoder)) if mode == "median_norm" else vectors
