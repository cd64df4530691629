import re
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lit_ti.errors import UserError
from lit_ti.modules.embedding_bank import EmbeddingBank
from lit_ti.modules.text_conditioning import PromptTokenizer, check_name, encode, init_vectors, shorten


def clip_states(backbone, prompt: str, clip_skip: int = 1) -> torch.Tensor:
    tok, te = backbone.tokenizer, backbone.text_encoder
    ids = tok([prompt], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    out = te(ids, output_hidden_states=True)
    return (
        out.last_hidden_state
        if clip_skip == 1
        else getattr(te, "text_model", te).final_layer_norm(out.hidden_states[-clip_skip])
    )


def bank_with(backbone, **concepts) -> EmbeddingBank:
    bank = EmbeddingBank()
    for name, (text, n) in concepts.items():
        bank.add(
            name.replace("_", "-"),
            {"text_encoder": init_vectors(backbone.tokenizer, backbone.text_encoder, text, n)},
        )
    return bank


@torch.no_grad()
@pytest.mark.parametrize("clip_skip", [1, 2])
def test_splice_equals_the_words_it_was_initialised_from(backbone, clip_skip):
    """A concept initialised from 'red dog' (2 vectors) encodes exactly like the words 'red dog'."""
    bank = bank_with(backbone, my_thing=("red dog", 2))
    ids, slots = PromptTokenizer(backbone.tokenizer, bank)(["a photo of my-thing, outdoors"])
    ours = encode(backbone.text_encoder, ids, slots, bank.table("text_encoder"), clip_skip)
    assert torch.allclose(ours, clip_states(backbone, "a photo of red dog, outdoors", clip_skip), atol=1e-6)
    assert not torch.allclose(ours, clip_states(backbone, "a photo of blue cat, outdoors", clip_skip), atol=1e-3)


def test_init_text_is_spread_over_the_vectors(backbone):
    tok, te = backbone.tokenizer, backbone.text_encoder
    rows = te.get_input_embeddings().weight
    red, dog = tok("red dog", add_special_tokens=False).input_ids
    v = init_vectors(tok, te, "red dog", 5)  # floor(i*2/5) = 0,0,0,1,1
    assert torch.equal(v, rows[[red, red, red, dog, dog]])
    assert torch.equal(init_vectors(tok, te, "red dog cat", 2), rows[[red, dog]])  # truncated to n tokens
    assert torch.equal(init_vectors(tok, te, "", 3), torch.zeros(3, rows.shape[1]))
    with pytest.raises(ValueError, match="n=76"):
        init_vectors(tok, te, "x", 76)


def test_slots_several_concepts_longest_name_first(backbone):
    bank = bank_with(backbone, zz_obj=("cat", 2), zz_obj_neg=("dog", 3))
    ids, slots = PromptTokenizer(backbone.tokenizer, bank)(["zz-obj-neg and ZZ-OBJ"])
    row = slots[0].tolist()
    assert row[1:4] == [2, 3, 4]  # zz-obj-neg occupies rows 2..4 of the table
    assert row[5:7] == [0, 1]  # case-insensitive match of zz-obj
    assert ids.shape == slots.shape == (1, 77)
    assert ids[0, 0] == backbone.tokenizer.bos_token_id


def test_gradient_reaches_only_the_vectors_in_the_prompt(backbone):
    bank = bank_with(backbone, zz_a=("cat", 1), zz_b=("dog", 1))
    ids, slots = PromptTokenizer(backbone.tokenizer, bank)(["a photo of zz-a"])
    encode(backbone.text_encoder, ids, slots, bank.table("text_encoder")).sum().backward()
    grads = {k: p.grad for k, p in bank.vectors.items()}
    assert grads["text_encoder__0"].abs().sum() > 0
    assert grads["text_encoder__1"] is None or grads["text_encoder__1"].abs().sum() == 0
    assert all(p.grad is None for p in backbone.text_encoder.parameters())


def test_long_prompt_is_cut_with_a_warning(backbone):
    bank = bank_with(backbone, zz_a=("cat", 4))
    with pytest.warns(UserWarning, match="budget"):
        ids, slots = PromptTokenizer(backbone.tokenizer, bank)(["word " * 100 + "zz-a"])
    assert ids.shape == (1, 77) and ids[0, -1] == backbone.tokenizer.eos_token_id
    assert slots[0].tolist()[-5:] == [0, 1, 2, 3, -1]  # the name at the end survives


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.sampled_from(["word", "red", "zz-a", "zz-b", "a, b", "photo of"]), min_size=1, max_size=120),
    st.integers(1, 30),
)
def test_shortened_prompts_keep_every_concept_token(backbone, pieces, vectors):
    """Whatever the words around them, a prompt over the budget loses words, never a concept vector (as long as
    the names alone fit), keeps its order, and the warning comes once per tokenizer."""
    bank = bank_with(backbone, zz_a=("cat", vectors), zz_b=("dog", 2))
    tokenizer = PromptTokenizer(backbone.tokenizer, bank)
    prompt = " ".join(pieces)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids, slots = tokenizer([prompt, prompt + " word"])
    wanted = [s for name in re.findall(r"zz-[ab]", prompt) for s in bank_slots(bank, name)]
    kept = [s for s in slots[0].tolist() if s >= 0]
    if len(wanted) <= 75:
        assert kept == wanted
    assert ids.shape == (2, 77) and ids[0, 0] == backbone.tokenizer.bos_token_id
    assert len([w for w in caught if "budget" in str(w.message)]) <= 1


def bank_slots(bank: EmbeddingBank, name: str) -> list[int]:
    start = bank.offsets()[name]
    return list(range(start, start + bank.num_vectors(name)))


def test_shorten_cuts_the_longest_stretch_of_words():
    # [name] between a short and a long stretch: the long one (the caption) loses its end
    ids = [1, 2, 0, 3, 4, 5, 6, 7]
    slots = [-1, -1, 0, -1, -1, -1, -1, -1]
    assert shorten(ids, slots, 6) == ([1, 2, 0, 3, 4, 5], [-1, -1, 0, -1, -1, -1])
    assert shorten(ids, slots, 1) == ([0], [0])  # only the concept token is left
    assert shorten([0, 0, 1], [0, 1, -1], 1) == ([0], [0])  # names alone over the budget: their first vectors


@pytest.mark.parametrize("name", ["cat", "Cat", "photo", "", "two words", "a,b", "(x)", "x:1", "[name]"])
def test_bad_names_are_refused(backbone, name):
    with pytest.raises(UserError, match="name="):
        check_name(backbone.tokenizer, name)


@pytest.mark.parametrize("name", ["<cat-toy>", "lit-example", "my_concept2", "zzqx"])
def test_made_up_names_are_accepted(backbone, name):
    check_name(backbone.tokenizer, name)


def test_bank_refuses_mismatched_vectors():
    bank = EmbeddingBank()
    bank.add("a", {"text_encoder": torch.zeros(2, 4), "text_encoder_2": torch.zeros(2, 6)})
    assert bank.encoders() == ["text_encoder", "text_encoder_2"]
    assert bank.num_vectors("a") == 2
    with pytest.raises(ValueError, match="same n"):
        bank.add("b", {"text_encoder": torch.zeros(2, 4), "text_encoder_2": torch.zeros(3, 6)})
    with pytest.raises(ValueError, match="already"):
        bank.add("a", {"text_encoder": torch.zeros(1, 4)})
    assert bank.vectors["text_encoder__0"].dtype == torch.float32
