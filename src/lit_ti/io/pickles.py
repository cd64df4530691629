"""Reading `.pt`/`.bin`/`.ckpt` pickles without ever running code from them.

`torch.load(weights_only=True)` only rebuilds tensors and plain containers; a pickle that asks for any other
global (`os.system`, a class with `__reduce__`, ...) is refused before anything runs. This module turns that
refusal into a message that says what the file wanted to call.
"""

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from lit_ti.errors import UserError


def load_pickle(path: Path, what: str) -> Any:
    """The file's contents (tensors, dicts, lists, numbers, strings only); a UserError for anything else."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        call = found.group(1) if found else "a non-tensor object"
        raise UserError(
            f"{path}: refused: loading this {what} would call {call}, which can run code; only files holding "
            "tensors and plain containers load. Ask for a .safetensors file instead"
        ) from None
    except Exception as e:
        raise UserError(
            f"{path}: cannot be read as a{'n' if what[0] in 'aeiou' else ''} {what} "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from None
