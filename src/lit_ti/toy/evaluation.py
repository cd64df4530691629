"""Did the method learn the concept? Two measures on a toy concept whose truth we know.

* **recovery** = (L_init − L_learned) / (L_init − L_oracle): the denoising loss of held-out images of the
  concept (fixed images, noise and timesteps) when prompted with the initial vectors, the learned vectors
  and the oracle caption ("a purple star"; for a shape the base model never saw, `world.NOVEL_SHAPES`, the
  nearest shape it knows: "a red circle" for `red_ring`). 0 = nothing learned, 1 = as good as the true words;
  nan where the oracle's loss is not below the initial one (then compare `loss_learned` with `loss_init`). For
  DreamArtist the learned and initial losses are those of its guided prediction (ε_neg + w·(ε_pos − ε_neg)
  at the training guidance, what the pair was trained to predict); the oracle's is the plain caption's.
* **accuracy**: the share of samples generated with the learned token that the toy classifier reads as the
  concept (`accuracy_oracle`: the same for the oracle caption, the ceiling the base model allows).
  DreamArtist samples put `a <name>-neg` in the negative prompt, as it is meant to be used.
* **accuracy_neighbours** (methods that change the model, `changes_model`: pivotal tuning): the accuracy of
  the true captions of four concepts the base model draws, next to the concept (its shape in two other colours,
  two other shapes in its colour: `neighbours`), with the trained tensors on; `_base`: with them off. A LoRA
  that redraws every circle as the ring it learned ("class bleed") scores below its base here.
* **editability**: the share of samples for "a {small|large} <name> on a {white|black|gray} background" (the
  six prompts equally) that obey the rest of the prompt: the object's size and the background as asked
  (`editability_concept`: and the classifier reads the concept; `_oracle`: the same with the true words).
  A method that learns the concept but ignores the prompt (pivotal tuning's known failure) scores low here.

Oracle and initial measures run on the base model (`DiffusionMethod.base_model`: pivotal tuning's LoRA off),
so they are the same ceiling and floor for every method.
"""

import random
from contextlib import nullcontext
from pathlib import Path

import torch
from diffusers import DDIMScheduler
from torch import Tensor

from lit_ti import io
from lit_ti.errors import UserError, check_number, quote
from lit_ti.losses import denoising_loss
from lit_ti.methods import DiffusionMethod, DreamArtist, TextualInversion
from lit_ti.methods.base import MAX_TIMESTEPS
from lit_ti.methods.dreamartist import check_cfg
from lit_ti.models import DiffusersFolder
from lit_ti.modules import lora as lora_layers
from lit_ti.modules.embedding_bank import swapped
from lit_ti.modules.text_conditioning import init_vectors
from lit_ti.toy import classifier as toy_classifier
from lit_ti.toy.style import background, object_extent
from lit_ti.toy.world import (
    BACKGROUNDS,
    NEAREST_KNOWN,
    SIZES,
    concept_parts,
    oracle_words,
    random_scene,
    render,
    seen_concepts,
)

EVAL_SEED = 12345  # held-out images: never the training renders (those use seeds 0..)
MAX_SAMPLES = 4096  # generated images per measure (32 take about a minute on a CPU)
# object extent (`toy.style.object_extent`) between small renders (0.27-0.39) and large ones (0.46-0.63)
SIZE_SPLIT = 0.425
# background level (mean of the border's median colour in [-1, 1]): black -0.81, gray 0.00, white 0.87
BACKGROUND_SPLITS = ((-0.4, "black"), (0.43, "gray"), (float("inf"), "white"))


def check_samples(key: str, samples, low: int = 0) -> int:
    return check_number(key, samples, low, MAX_SAMPLES, integer=True, hint="images generated for the accuracy")


def check_concept(key: str, concept) -> str:
    """A toy concept name `<colour>_<shape>`, or one UserError naming `key`."""
    try:
        concept_parts(concept if isinstance(concept, str) else "")
    except ValueError:
        raise UserError(
            f"{key}={quote(concept)}: not a toy concept; write <colour>_<shape>, e.g. purple_star"
        ) from None
    return concept


def heldout_pixels(concept: str, n: int = 16) -> Tensor:
    rng = random.Random(f"eval-{concept}-{EVAL_SEED}")
    return toy_classifier.to_tensor([render(random_scene(rng, concept)) for _ in range(n)])


@torch.no_grad()
def evaluate(
    method: DiffusionMethod,
    concept: str,
    init_vectors: dict[str, Tensor],
    samples: int = 32,
    guidance: float = 5.0,
    extras: bool = True,
    first_seed: int = 0,
) -> dict:
    """Recovery and classifier accuracy of `method`'s concept (its `name`; its `concept_bank` is what
    `init_vectors` stand in for) against the toy `concept`; `extras`: also editability and the oracle's samples
    (three more sample sets: a quarter of the time without them). The accuracy's samples start at seed
    `first_seed` (`sample_accuracy`): a copy chosen as the best on seeds 0-31 is judged fairly from 32 on."""
    words = oracle_words(concept)  # `purple star`; for a novel shape the nearest known: `red circle`
    pixels = heldout_pixels(concept)
    mean, _ = method.encode_images(pixels)
    prompt = f"a {method.name}"

    def loss(text: str, predict=method.predict) -> float:
        return denoising_loss(predict, method.objective, mean, text)

    def conditional(noisy, t, batch):  # plain words: the prediction without the method's guidance
        return DiffusionMethod.predict(method, noisy, t, batch)

    learned = loss(prompt)
    with method.base_model():
        with swapped(method.concept_bank, init_vectors):
            initial = loss(prompt)
        oracle = loss(f"a {words}", conditional)
        other = next(c for c in ("green_circle", "red_square") if c != concept).replace("_", " ")
        unrelated = loss(f"a {other}", conditional)
    recovery = _recovery(initial, learned, oracle)

    negative = method.negative_prompts({"prompt": [prompt]})[0]  # DreamArtist: `a <name>-neg`
    accuracy = sample_accuracy(method, prompt, concept, samples, guidance, negative, first_seed)
    results = {"recovery": recovery, "accuracy": accuracy}
    if extras:
        edit, edit_concept = editability(method, method.name, concept, samples, guidance, negative)
        with method.base_model():
            oracle_accuracy = sample_accuracy(method, f"a {words}", concept, samples, guidance)
            edit_oracle, edit_concept_oracle = editability(method, words, concept, samples, guidance)
        if method.changes_model:  # a LoRA may also redraw what it was not trained on (class bleed)
            results["accuracy_neighbours"] = neighbour_accuracy(method, concept, samples, guidance)
            with method.base_model():
                results["accuracy_neighbours_base"] = neighbour_accuracy(method, concept, samples, guidance)
        results |= {
            "accuracy_oracle": oracle_accuracy,
            "editability": edit,
            "editability_concept": edit_concept,
            "editability_oracle": edit_oracle,
            "editability_concept_oracle": edit_concept_oracle,
        }
    results |= {"loss_init": initial, "loss_learned": learned, "loss_oracle": oracle, "loss_unrelated": unrelated}
    if not extras:
        return results
    if negative:  # a method with a learned negative: also judge its positive alone (plain CFG, "" negative)
        with swapped(method.concept_bank, init_vectors):
            initial_alone = loss(prompt, conditional)
        alone = loss(prompt, conditional)
        results["recovery_positive_only"] = _recovery(initial_alone, alone, oracle)
        results["accuracy_positive_only"] = sample_accuracy(method, prompt, concept, samples, guidance)
    return results


def _recovery(initial: float, learned: float, oracle: float) -> float:
    """The share of the way from the initial loss to the oracle's; undefined (nan) where the oracle's words are
    no better than the start (a shape the base model never saw: its nearest known words only mislead)."""
    return (initial - learned) / (initial - oracle) if oracle < initial else float("nan")


@torch.no_grad()
def sample_accuracy(
    method, prompt: str, concept: str, samples: int, guidance: float = 5.0, negative: str = "", first_seed: int = 0
) -> float:
    """Share of `samples` images generated from `prompt` that the toy classifier reads as `concept`. They come in
    batches of 16, whose noise is seeded `first_seed`, `first_seed` + 16, ...: a `first_seed` at or past another
    score's `samples` (a multiple of 16) shares no image with it."""
    if not samples:
        return float("nan")
    scheduler = DDIMScheduler.from_config(method.backbone.scheduler.config)
    judge = toy_classifier.judge(concept).to(method.device)
    hits = 0
    for start in range(0, samples, 16):
        n = min(16, samples - start)
        seed = first_seed + start
        images = method.sample(prompt, negative, n, steps=20, guidance_scale=guidance, seed=seed, scheduler=scheduler)
        hits += sum(read == concept for read in judge.read(images * 2 - 1))
    return hits / samples


def neighbours(concept: str) -> list[str]:
    """Concepts the base model draws that a LoRA for `concept` is likeliest to redraw: its shape (a novel
    shape's nearest known one) in two other colours, and two other shapes in its colour."""
    colour, shape = concept_parts(concept)
    shape = NEAREST_KNOWN.get(shape, shape)
    seen = seen_concepts()
    same_shape = [c for c in seen if c.endswith(f"_{shape}") and not c.startswith(f"{colour}_")]
    same_colour = [c for c in seen if c.startswith(f"{colour}_") and not c.endswith(f"_{shape}")]
    return same_shape[:2] + same_colour[:2]


def neighbour_accuracy(method, concept: str, samples: int, guidance: float = 5.0) -> float:
    """Mean accuracy of the true captions of `neighbours(concept)` ("a red circle"), about `samples` images."""
    others = neighbours(concept)
    per = -(-samples // len(others))
    return sum(sample_accuracy(method, f"a {c.replace('_', ' ')}", c, per, guidance) for c in others) / len(others)


def toy_base() -> DiffusersFolder:
    """The embedded toy base model's spec (`model=toy`)."""
    from lit_ti.train import _asset  # the shipped assets' one path rule (train imports this module's callers)

    return DiffusersFolder(_asset("toy_base"))


def sizes_seen(images: Tensor) -> list[str]:
    """`small` or `large` for each image `[B, 3, H, W]` in [-1, 1]: its object's extent against `SIZE_SPLIT`."""
    return ["large" if float(e) > SIZE_SPLIT else "small" for e in object_extent(images)]


def backgrounds_seen(images: Tensor) -> list[str]:
    """`black`, `gray` or `white` for each image `[B, 3, H, W]` in [-1, 1]: its border's level."""
    level = background(images).mean(dim=(1, 2, 3))
    return [next(name for split, name in BACKGROUND_SPLITS if float(v) < split) for v in level]


def obeys(images: Tensor, size: str, background_name: str) -> Tensor:
    """`[B]` bool: the images `[B, 3, H, W]` in [-1, 1] show an object of `size` on `background_name`."""
    pairs = zip(sizes_seen(images), backgrounds_seen(images), strict=True)
    return torch.tensor([s == size and b == background_name for s, b in pairs])


@torch.no_grad()
def editability(
    method, words: str, concept: str, samples: int, guidance: float = 5.0, negative: str = ""
) -> tuple[float, float]:
    """Shares of samples for "a {size} <words> on a {background} background" (every size x background, about
    `samples` images in all) that obey size and background, and that also show `concept`."""
    if not samples:
        return float("nan"), float("nan")
    scheduler = DDIMScheduler.from_config(method.backbone.scheduler.config)
    judge = toy_classifier.judge(concept).to(method.device)
    cases = [(size, bg) for size in SIZES for bg in BACKGROUNDS]
    per = -(-samples // len(cases))
    obeyed = both = 0
    for i, (size, bg) in enumerate(cases):
        prompt = f"a {size} {words} on a {bg} background"
        images = method.sample(
            prompt, negative, per, steps=20, guidance_scale=guidance, seed=1000 * i, scheduler=scheduler
        )
        images = images.to(method.device) * 2 - 1
        ok = obeys(images.cpu(), size, bg)
        read = torch.tensor([r == concept for r in judge.read(images)])
        obeyed += int(ok.sum())
        both += int((ok & read).sum())
    return obeyed / (per * len(cases)), both / (per * len(cases))


class WithLora(TextualInversion):
    """An embedding with a LoRA file on the backbone at `strength` (A1111's `<lora:name:strength>`): a finished
    pivotal-tuning run as the webui or `generate.py` applies it. Its base model has the LoRA off, as in
    training's own evaluation, so the oracle and initial measures are those of every other method."""

    changes_model = True

    def __init__(self, backbone, name: str, init_file: str, lora: str, strength: float) -> None:
        super().__init__(backbone, name=name, init_file=init_file)
        self.lora, self.strength = Path(lora), strength

    def configure_model(self) -> None:
        from lit_ti.generate import apply_lora

        super().configure_model()
        try:
            apply_lora(self.backbone, self.lora, self.strength)
        except UserError as e:
            raise UserError(f"--lora: {e}") from None

    def base_model(self):
        roots = [self.backbone.unet, *(encoder for _, encoder in self.backbone.text_encoders.values())]
        return lora_layers.switched_off(roots, self.strength)

    def applied_at(self, strength: float, max_timestep: int | None = None):
        if strength != self.strength:  # attached at its strength in configure_model
            raise ValueError(f"this LoRA is applied at {self.strength}, not {strength}")
        return lora_layers.below_timestep(self.backbone.unet, max_timestep)


def evaluate_file(
    path: str,
    concept: str,
    samples: int = 32,
    init_text: str = "*",
    cfg_scale: str = "3.0",
    extras: bool = True,
    lora: str | None = None,
    lora_strength: float = 1.0,
    lora_max_timestep: int | None = None,
    first_seed: int = 0,
) -> dict:
    """Evaluate an embedding file trained on the toy model; recovery is measured from `init_text`.

    A DreamArtist pair is recognised by its `<stem>-neg` file next to `path`; its denoising loss is the
    guided one at `cfg_scale` (the training guidance) and its samples use the negative. `lora`: a LoRA file
    (pivotal tuning's `<name>-lora.safetensors`, which may also be `path`: its bundled embedding) applied at
    `lora_strength` for the learned measures, and with `lora_max_timestep` only below that timestep.
    """
    path = Path(path)
    check_concept("concept", concept)
    samples = check_samples("--samples", samples)
    check_number("--first-seed", first_seed, 0, 2**31 - MAX_SAMPLES, integer=True, hint="the first sample seed")
    check_cfg(cfg_scale, "--cfg-scale")
    if lora is None and lora_strength != 1.0:
        raise UserError("--lora-strength: there is no LoRA to scale; add --lora FILE")
    if lora is None and lora_max_timestep is not None:
        raise UserError("--lora-max-timestep: there is no LoRA to gate; add --lora FILE")
    if lora is not None:
        check_number("--lora-strength", lora_strength, -10, 10)
        if lora_max_timestep is not None:
            check_number("--lora-max-timestep", lora_max_timestep, 1, MAX_TIMESTEPS, integer=True)
        if not Path(lora).is_file():
            raise UserError(f"--lora: {quote(lora)}: no such LoRA file")
    try:
        name = io.read_embedding(path)[0].name
    except UserError as e:
        raise UserError(f"embedding: {e}") from None
    neg = path.with_name(f"{path.stem}-neg{path.suffix}")
    backbone = toy_base()
    if lora is not None:
        if neg.is_file():
            raise UserError(f"--lora: {path} is a DreamArtist pair; a LoRA is scored with a single embedding")
        method = WithLora(backbone, name=name, init_file=str(path), lora=lora, strength=lora_strength)
    elif neg.is_file():
        method = DreamArtist(backbone, name=name, init_file=str(path), neg_init_file=str(neg), cfg_scale=cfg_scale)
    else:
        method = TextualInversion(backbone, name=name, init_file=str(path))
    method.configure_model()
    bb = method.backbone
    start = {}
    for concept_name in method.bank.names:
        vectors = init_vectors(bb.tokenizer, bb.text_encoder, init_text, method.bank.num_vectors(concept_name))
        start[method.bank.key(concept_name, "text_encoder")] = vectors
    with method.applied_at(lora_strength, lora_max_timestep) if lora is not None else nullcontext():
        return evaluate(method, concept, start, samples=samples, extras=extras, first_seed=first_seed)
