"""The one table of the files lit_ti reads and writes: extension -> container (how its bytes are read and
written) and which kinds of file use it.

Everything that lists extensions asks this table: the embedding and hypernetwork readers and writers, the
single-file model loader, the export formats a method offers, `generate.py`'s folder scan, and the run
folder's "finished run" check. The
layout *inside* a container (A1111's dict, kohya's `emb_params`, diffusers' `{token: tensor}`) belongs to the
kind's own module (`io/embeddings.py`, `io/hypernetworks.py`, `io/loras.py`).
"""

from dataclasses import dataclass
from pathlib import Path

from lit_ti.errors import UserError

EMBEDDING, HYPERNETWORK, MODEL = "embedding", "hypernetwork", "model"  # MODEL: a single-file SD checkpoint
LORA = "lora"  # kohya/A1111 LoRA (pivotal tuning's bundle, the embedding inside) and diffusers' LoRA layout
PICKLE, SAFETENSORS, IMAGE = "pickle", "safetensors", "image"  # containers: io.pickles, safetensors, PNG chunks


@dataclass(frozen=True)
class FileFormat:
    suffix: str  # lower case, with the dot
    container: str  # PICKLE (torch.save/load, io.pickles), SAFETENSORS or IMAGE (io.png_embeddings)
    reads: frozenset[str]  # kinds read from such files
    writes: frozenset[str]  # kinds written as such files

    @property
    def name(self) -> str:
        """The name `callbacks.export.formats` uses: the suffix without its dot."""
        return self.suffix[1:]


def _format(suffix: str, container: str, reads: tuple[str, ...], writes: tuple[str, ...] = ()) -> FileFormat:
    return FileFormat(suffix, container, frozenset(reads), frozenset(writes))


BOTH = (EMBEDDING, HYPERNETWORK)
FORMATS = (
    _format(".pt", PICKLE, (*BOTH, MODEL), BOTH),  # A1111's layouts (what the webui and ComfyUI load)
    # kohya embeddings; lit_ti's hypernetworks; LoRAs (io/loras.py tells its layouts apart by their keys)
    _format(".safetensors", SAFETENSORS, (*BOTH, MODEL, LORA), (*BOTH, LORA)),
    _format(".bin", PICKLE, BOTH, (EMBEDDING,)),  # diffusers' learned_embeds.bin
    _format(".ckpt", PICKLE, (*BOTH, MODEL)),  # original textual inversion's embeddings; SD checkpoints
    _format(".pth", PICKLE, (MODEL,)),
    # A1111's "embedding in PNG": written as PNG (the preview), read from every image type the webui reads
    _format(".png", IMAGE, (EMBEDDING,), (EMBEDDING,)),
    _format(".webp", IMAGE, (EMBEDDING,)),
    _format(".jxl", IMAGE, (EMBEDDING,)),
    _format(".avif", IMAGE, (EMBEDDING,)),
)
BY_SUFFIX = {f.suffix: f for f in FORMATS}


def readable(kind: str) -> tuple[str, ...]:
    """Every suffix the `kind`'s reader accepts (what a folder scan for that kind must pick up)."""
    return tuple(f.suffix for f in FORMATS if kind in f.reads)


def exportable(kind: str) -> tuple[str, ...]:
    """Format names (`pt`, ...) a method can export its `kind` as; image embeddings are written by previews."""
    return tuple(f.name for f in FORMATS if kind in f.writes and f.container != IMAGE)


def final_suffixes() -> tuple[str, ...]:
    """Suffixes of the files a finished run leaves in its folder (any kind)."""
    return tuple(f.suffix for f in FORMATS if f.writes and f.container != IMAGE)


def is_image(path: str | Path) -> bool:
    found = BY_SUFFIX.get(Path(path).suffix.lower())
    return found is not None and found.container == IMAGE


def format_of(path: str | Path, kind: str) -> FileFormat:
    """The format of `path` for reading a `kind` from it; a UserError naming the accepted ones otherwise."""
    path = Path(path)
    found = BY_SUFFIX.get(path.suffix.lower())
    if found is None or kind not in found.reads:
        raise UserError(
            f"{path}: unsupported {kind} file type {path.suffix.lower()!r}; use {', '.join(readable(kind))}"
        )
    return found
