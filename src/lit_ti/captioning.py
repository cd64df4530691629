"""Captions for preprocessing, from local models only: a BLIP captioner and a multi-label tagger.

`blip`: a transformers BLIP captioning folder (`BlipForConditionalGeneration` + its processor).
`tagger`: a transformers image-classification folder whose labels are tags (WD/deepbooru style, sigmoid
scores); its tags are formatted with A1111's deepbooru options. Nothing is downloaded: a missing or wrong
folder is a UserError that says so.
"""

import re
from pathlib import Path

import torch
from PIL import Image

from lit_ti.errors import UserError


def _load(path: str, key: str, what: str, *classes):
    """`cls.from_pretrained(folder)` for each class, from a local folder only; one UserError otherwise."""
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise UserError(
            f"{key}: {folder} is not a local transformers model folder (no config.json); captioning runs only "
            "from models on disk; download one elsewhere and point the key at it, or set it to null"
        )
    try:
        return [cls.from_pretrained(folder) for cls in classes]
    except (OSError, ValueError) as e:
        raise UserError(f"{key}: cannot load {what} from {folder}: {e}") from None


class BlipCaptioner:
    def __init__(self, path: str, max_new_tokens: int = 30) -> None:
        from transformers import BlipForConditionalGeneration, BlipProcessor

        self.processor, model = _load(
            path, "caption.blip", "a BLIP captioner", BlipProcessor, BlipForConditionalGeneration
        )
        self.model = model.eval()
        self.max_new_tokens = max_new_tokens

    @torch.no_grad()
    def __call__(self, image: Image.Image) -> str:
        inputs = self.processor(images=image, return_tensors="pt")
        ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens)
        return self.processor.decode(ids[0], skip_special_tokens=True).strip()


def format_tags(
    scores: dict[str, float],
    threshold: float = 0.5,
    sort: str = "alphabetical",
    spaces: bool = True,
    escape_brackets: bool = True,
    ranks: bool = False,
    exclude: tuple[str, ...] = (),
) -> str:
    """A1111's deepbooru formatting: keep scores >= threshold, drop `rating:*` and excluded tags, sort,
    `_` -> space, escape brackets, optionally `(tag:0.xxx)`, joined with ", "."""
    if sort not in ("alphabetical", "score"):
        raise UserError(f"caption.sort={sort!r}: use alphabetical or score")
    kept = [(t, s) for t, s in scores.items() if s >= threshold and not t.startswith("rating:") and t not in exclude]
    kept.sort(key=(lambda ts: ts[0]) if sort == "alphabetical" else (lambda ts: -ts[1]))
    out = []
    for tag, score in kept:
        if spaces:
            tag = tag.replace("_", " ")
        if escape_brackets:
            tag = re.sub(r"([\\()\[\]])", r"\\\1", tag)
        out.append(f"({tag}:{score:.3f})" if ranks else tag)
    return ", ".join(out)


class Tagger:
    def __init__(self, path: str, **format_kw) -> None:
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        self.processor, model = _load(
            path, "caption.tagger", "an image tagger", AutoImageProcessor, AutoModelForImageClassification
        )
        self.model = model.eval()
        self.labels = self.model.config.id2label
        self.format_kw = format_kw

    @torch.no_grad()
    def __call__(self, image: Image.Image) -> str:
        logits = self.model(**self.processor(images=image, return_tensors="pt")).logits[0]
        scores = torch.sigmoid(logits).tolist()  # multi-label: every tag on its own
        return format_tags({self.labels[i]: s for i, s in enumerate(scores)}, **self.format_kw)
