"""Prompts with concept names -> CLIP hidden states, with the bank's vectors spliced in.

A concept name in a prompt stands for its `n` vectors: the prompt is tokenized around the names, each name
becomes `n` slots, and a forward hook on the frozen token-embedding layer writes the vectors into those
slots. Gradients flow into the vectors only.
"""

import re
import warnings
from typing import NamedTuple

import torch
from torch import Tensor
from transformers import CLIPTextModel, CLIPTokenizer

from lit_ti.errors import UserError, quote
from lit_ti.modules.embedding_bank import MAX_VECTORS, EmbeddingBank

FORBIDDEN = re.compile(r"[\s()\[\]{}:,|\\]")  # prompt syntax (emphasis, BREAK, separators)


def check_name(tokenizer: CLIPTokenizer, name: str, key: str = "name") -> None:
    """Refuse names that other tools would mistake for ordinary words or could not find in a prompt."""
    if not name or FORBIDDEN.search(name):
        raise UserError(
            f"{key}={name!r}: a concept name must be non-empty, without spaces or any of ( ) [ ] {{ }} : , | \\"
        )
    vocab = tokenizer.get_vocab()
    if name in vocab or name.lower() in vocab or name.lower() + "</w>" in vocab:
        raise UserError(
            f"{key}={name!r} is already a token of the tokenizer, so prompts could not tell the concept from "
            f"the word; pick a made-up name such as '<{name}-concept>'"
        )
    alone = tokenizer(name, add_special_tokens=False).input_ids
    in_context = tokenizer(f"a photo of {name} in a room", add_special_tokens=False).input_ids
    if not any(in_context[i : i + len(alone)] == alone for i in range(len(in_context))):
        raise UserError(
            f"{key}={name!r} tokenizes differently inside a prompt than alone, so A1111 would not find it; "
            "use letters, digits, '-', '_', '<' and '>' only"
        )


def init_vectors(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, init_text: str, n: int) -> Tensor:
    """A1111 initialisation: the init text's token embeddings spread over `n` vectors; `[n, d]` fp32.

    Vector i copies token floor(i*k/n) of the k (<= n) init tokens; an empty init text gives zeros.
    """
    if not 1 <= n <= MAX_VECTORS:  # the methods' constructors tell users; this guards other callers
        raise ValueError(f"init_vectors: n={n} is outside [1, {MAX_VECTORS}]")
    weight = text_encoder.get_input_embeddings().weight
    ids = tokenizer(init_text, add_special_tokens=False).input_ids[:n]
    if not ids:
        return torch.zeros(n, weight.shape[1])
    rows = weight[torch.tensor(ids, device=weight.device)].detach().float().cpu()
    return rows[[i * len(ids) // n for i in range(n)]]


def shorten(ids: list[int], slots: list[int], limit: int) -> tuple[list[int], list[int]]:
    """A prompt's tokens cut to `limit`, concept tokens kept: the overflow goes from the end of the longest
    stretch of plain words (usually the caption), then of the next longest. Only concept names that alone
    exceed the budget lose their last vectors."""
    runs, start = [], None  # [start, end) of the stretches without concept tokens
    for i, slot in enumerate([*slots, 0]):  # the sentinel closes the last stretch
        if slot < 0 and start is None:
            start = i
        elif slot >= 0 and start is not None:
            runs.append([start, i])
            start = None
    over, drop = len(ids) - limit, set()
    while over > 0 and runs:
        run = max(runs, key=lambda r: (r[1] - r[0], r[0]))  # the longest; the last of equals
        take = min(over, run[1] - run[0])
        drop.update(range(run[1] - take, run[1]))
        runs.remove(run)
        over -= take
    keep = [i for i in range(len(ids)) if i not in drop][:limit]
    return [ids[i] for i in keep], [slots[i] for i in keep]


def name_pattern(names: list[str]) -> re.Pattern | None:
    """Where a prompt names a concept: the whole word, any case (None for no names). Longest first, so that
    "x-neg" is found before "x"."""
    if not names:
        return None
    names = sorted(names, key=len, reverse=True)
    return re.compile(r"(?<![\w-])(" + "|".join(map(re.escape, names)) + r")(?![\w-])", re.IGNORECASE)


def replace_names(prompt: str, names: list[str], word: str) -> str:
    """`prompt` with every concept name in it replaced by `word` ("" drops it, with the space before it)."""
    pattern = name_pattern(names)
    if pattern is None:
        return prompt
    if word:
        return pattern.sub(word, prompt)
    return re.sub(r"\s{2,}", " ", pattern.sub("", prompt)).strip()


class PromptTokenizer:
    """Tokenizes prompts whose concept names stand for their bank vectors.

    Returns `input_ids [B, L]` and `slots [B, L]` (L = 77 for CLIP, 256 for SD3's T5), where `slots` is the row
    of `bank.table()` that goes at each position, or -1. Results are cached per prompt string, since a run reuses a handful of
    template lines.
    """

    def __init__(
        self, tokenizer: CLIPTokenizer, bank: EmbeddingBank, encoder: str | None = None, length: int | None = None
    ) -> None:
        self.tokenizer = tokenizer
        self.length = length or tokenizer.model_max_length  # tokens per prompt, the special ones included
        self.counts = {name: bank.num_vectors(name) for name in bank.names}
        # a concept without vectors for this encoder leaves no token in its prompts (as ComfyUI skips them)
        self.served = {name for name in bank.names if encoder is None or encoder in bank.get(name)}
        self.offsets = bank.offsets()
        self.pattern = name_pattern(list(self.counts))
        self.lower = {name.lower(): name for name in self.counts}
        self.cache: dict[str, tuple[list[int], list[int]]] = {}
        self.warned = False

    def _one(self, prompt: str) -> tuple[list[int], list[int]]:
        tok = self.tokenizer
        ids: list[int] = []
        slots: list[int] = []
        pieces = self.pattern.split(prompt) if self.pattern else [prompt]
        for i, piece in enumerate(pieces):
            if i % 2:  # odd pieces are the captured names
                name = self.lower[piece.lower()]
                if name not in self.served:
                    continue
                ids += [0] * self.counts[name]  # placeholder ids; the hook overwrites these rows
                slots += range(self.offsets[name], self.offsets[name] + self.counts[name])
            elif piece.strip():
                piece_ids = tok(piece, add_special_tokens=False).input_ids
                ids += piece_ids
                slots += [-1] * len(piece_ids)
        start = [] if tok.bos_token_id is None else [tok.bos_token_id]  # T5 has no start token
        limit = self.length - len(start) - 1
        if len(ids) > limit:
            if not self.warned:  # once per run: a long-caption folder would otherwise warn on every prompt
                self.warned = True
                warnings.warn(
                    f"prompts over the {limit}-token budget are shortened: words are cut from the end of their "
                    f"longest stretch without a concept name, and every concept token is kept (first such prompt, "
                    f"{len(ids)} tokens: {quote(prompt)})",
                    stacklevel=3,
                )
            ids, slots = shorten(ids, slots, limit)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        ids = [*start, *ids, tok.eos_token_id]
        slots = [-1] * len(start) + [*slots, -1]
        fill = self.length - len(ids)
        return ids + [pad] * fill, slots + [-1] * fill

    def carries(self, prompts: list[str]) -> list[bool]:
        """Whether each prompt holds at least one concept vector (after shortening)."""
        return [any(s >= 0 for s in self._cached(p)[1]) for p in prompts]

    def _cached(self, prompt: str) -> tuple[list[int], list[int]]:
        if prompt not in self.cache:
            self.cache[prompt] = self._one(prompt)
        return self.cache[prompt]

    def __call__(self, prompts: list[str], device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        rows = [self._cached(prompt) for prompt in prompts]
        ids = torch.tensor([r[0] for r in rows], device=device)
        slots = torch.tensor([r[1] for r in rows], device=device)
        return ids, slots


class Conditioning(NamedTuple):
    """What the denoiser is conditioned on: hidden states `[B, L, d]` and a pooled embedding, or None.

    SD1/SD2: `[B, 77, d]`. SDXL: `[B, 77, 768 + 1280]` (both encoders side by side) and CLIP-G's pooled
    `[B, 1280]`. SD3: `[B, 77 + 256, 4096]` (CLIP-L and CLIP-G side by side, zero-padded to T5's width, then
    T5's 256 tokens) and both CLIP encoders' pooled outputs `[B, 768 + 1280]`."""

    states: Tensor
    pooled: Tensor | None = None

    def to(self, dtype: torch.dtype) -> "Conditioning":
        return Conditioning(self.states.to(dtype), None if self.pooled is None else self.pooled.to(dtype))


def token_embedding(text_encoder) -> torch.nn.Module:
    """The token-embedding layer the encoder's forward calls. T5's stack holds its own module tied to
    `get_input_embeddings()` (the same weight, another module), so a hook on the latter would never run."""
    stack = getattr(text_encoder, "encoder", None)
    return getattr(stack, "embed_tokens", None) or text_encoder.get_input_embeddings()


def _run(text_encoder, input_ids: Tensor, slots: Tensor, table: Tensor | None, hidden_states: bool):
    """The encoder's output with `table[slots]` written over the token embeddings."""

    def splice(_module, _args, out: Tensor) -> Tensor:
        rows = table[slots.clamp(min=0)].to(out.dtype)  # [B, 77, d]
        return torch.where((slots >= 0).unsqueeze(-1), rows, out)

    handle = None
    if table is not None and bool((slots >= 0).any()):
        handle = token_embedding(text_encoder).register_forward_hook(splice)
    try:
        return text_encoder(input_ids, output_hidden_states=hidden_states)
    finally:
        if handle is not None:
            handle.remove()


def encode(
    text_encoder: CLIPTextModel, input_ids: Tensor, slots: Tensor, table: Tensor | None, clip_skip: int = 1
) -> Tensor:
    """CLIP hidden states `[B, 77, d]` with `table[slots]` written over the token embeddings.

    clip_skip follows A1111: 1 = last layer; N > 1 = hidden state N from the end, then the final layer norm.
    """
    out = _run(text_encoder, input_ids, slots, table, clip_skip > 1)
    if clip_skip <= 1:
        return out.last_hidden_state
    final_norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm
    return final_norm(out.hidden_states[-clip_skip])


T5_TOKENS = 256  # SD3's T5 sequence length (diffusers' `max_sequence_length` default)


class PromptEncoder:
    """Prompts -> `Conditioning` through every text encoder of a backbone, the bank's vectors spliced in.

    SD1.x/SD2.x: one encoder, A1111's clip skip. SDXL and SD3 (as their diffusers pipelines do): each CLIP
    encoder's hidden state `clip_skip + 1` from the end without the final norm (the penultimate layer by
    default), concatenated along the feature axis, and the projected pooled output (SDXL: CLIP-G's; SD3: both,
    concatenated). SD3 pads the CLIP states to T5's width and appends T5's last hidden states (zeros without T5).
    """

    def __init__(self, backbone, bank: EmbeddingBank, clip_skip: int = 1) -> None:
        self.family = "sd3" if backbone.is_sd3 else "sdxl" if backbone.is_sdxl else "sd"
        self.bank = bank
        self.clip_skip = clip_skip
        self.parts = [
            (key, PromptTokenizer(tok, bank, key, T5_TOKENS if key == "text_encoder_3" else None), enc)
            for key, (tok, enc) in backbone.text_encoders.items()
        ]
        self.width = backbone.unet.config.get("joint_attention_dim")  # SD3: T5's width

    def carries(self, prompts: list[str]) -> list[bool]:
        """Whether each prompt holds at least one of the bank's vectors (a sample that can train them)."""
        per_part = [tokenizer.carries(list(prompts)) for _, tokenizer, _ in self.parts]
        return [any(flags) for flags in zip(*per_part)]

    def _inputs(self, prompts: list[str], device):
        for key, tokenizer, text_encoder in self.parts:
            ids, slots = tokenizer(list(prompts), device)
            table = self.bank.table(key) if key in self.bank.encoders() else None
            yield key, ids, slots, table, text_encoder

    def __call__(self, prompts: list[str], device: torch.device | str = "cpu") -> Conditioning:
        states, pooled, t5 = [], [], None
        for key, ids, slots, table, text_encoder in self._inputs(prompts, device):
            if self.family == "sd":
                return Conditioning(encode(text_encoder, ids, slots, table, self.clip_skip))
            if key == "text_encoder_3":
                t5 = _run(text_encoder, ids, slots, table, hidden_states=False).last_hidden_state
                continue
            out = _run(text_encoder, ids, slots, table, hidden_states=True)
            states.append(out.hidden_states[-(self.clip_skip + 1)])
            if hasattr(out, "text_embeds"):  # SDXL: only the second encoder has a projection
                pooled.append(out.text_embeds)
        clip = torch.cat(states, dim=-1)
        if self.family == "sdxl":
            return Conditioning(clip, pooled[-1])
        if t5 is None:  # SD3 without T5: its tokens are zeros
            t5 = clip.new_zeros(clip.shape[0], T5_TOKENS, self.width)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return Conditioning(torch.cat([clip, t5.to(clip.dtype)], dim=-2), torch.cat(pooled, dim=-1))
