"""Prompt templates: one prompt per line with `[name]` (the concept) and `[filewords]` (the caption)."""

import random
import re
from importlib import resources
from pathlib import Path

from lit_ti.errors import UserError, quote

SHIPPED = (
    "subject",
    "subject_filewords",
    "style",
    "style_filewords",
    "hypernetwork",
    "none",
    "toy",
    "toy_captions",
    "filewords",
)


def load_templates(template: str) -> list[str]:
    """Lines of a shipped template (by name, e.g. `subject`) or of a text file (by path)."""
    if template in SHIPPED:
        text = resources.files("lit_ti.data").joinpath("templates", f"{template}.txt").read_text("utf-8")
    else:
        path = Path(template).expanduser()
        if not path.is_file():
            raise UserError(
                f"data.template={template!r} is neither a shipped template ({', '.join(SHIPPED)}) nor a file"
            )
        text = path.read_text(encoding="utf-8", errors="replace")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise UserError(f"data.template={template!r} has no prompt lines; write one prompt per line")
    return lines


def check_names(template: str, lines: list[str], captions: list[str] = ()) -> None:
    """Every prompt of an embedding method must hold `[name]`: a prompt without the trained token gives its
    sample nothing to train (A1111 would train on it anyway; the step would have no gradient). A line may leave
    `[name]` to the caption (`[filewords]` with captions such as "a large [name] on a gray background": A1111
    fills `[filewords]` before `[name]`), then every caption must hold it."""
    unnamed = [c for c in captions if "[name]" not in c]
    for number, line in enumerate(lines, 1):
        if "[name]" in line or ("[filewords]" in line and captions and not unnamed):
            continue
        if "[filewords]" in line and captions:
            raise UserError(
                f"data.template={quote(template)}: line {number} ({quote(line)}) leaves [name] to the captions, but "
                f"{len(unnamed)} of {len(captions)} captions lack it (e.g. {quote(unnamed[0])}); write [name] where "
                "the concept is in every caption, or put [name] in the template line"
            )
        raise UserError(
            f"data.template={quote(template)}: line {number} ({quote(line)}) lacks [name], so its samples "
            "would not train the embedding; put [name] in every line (e.g. the subject or style template)"
        )


def without_filewords(template: str, lines: list[str]) -> list[str]:
    """The same lines without the caption, line for line (DreamArtist's "positive filewords only").

    As A1111/DreamArtist: a `*_filewords` template's sibling without `_filewords` (shipped or next to the
    file) when it has as many lines; otherwise `[filewords]` is cut out with its joining words.
    """
    if "_filewords" in template:
        sibling = template.replace("_filewords", "")
        if sibling in SHIPPED or Path(sibling).expanduser().is_file():
            plain = load_templates(sibling)
            if len(plain) == len(lines):
                return plain
    cut = re.compile(r"\s*(?:,\s*|\bof\s+)?\[filewords\]")
    return [re.sub(r"\s+,", ",", cut.sub("", line)).strip(" ,") for line in lines]


def fill(
    line: str,
    name: str,
    caption: str,
    rng: random.Random,
    shuffle: bool = False,
    dropout: float = 0.0,
    keep: int = 0,
) -> str:
    """A1111's create_text: optional tag dropout/shuffle on the comma-separated caption, then `[filewords]`,
    then `[name]`. The first `keep` tags stay in place and are never dropped (kohya's `keep_tokens`)."""
    if shuffle or dropout > 0:
        tags = caption.split(",")
        fixed, tags = tags[:keep], tags[keep:]
        tags = [t for t in tags if dropout <= 0 or rng.random() > dropout]
        if shuffle:
            rng.shuffle(tags)
        caption = ",".join(fixed + tags)
    return line.replace("[filewords]", caption).replace("[name]", name)
