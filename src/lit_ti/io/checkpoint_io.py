"""Lightning checkpoints: written atomically, read only once they are known to be lit_ti's.

Lightning's own `_atomic_save` stages the file in the system temp folder and moves it into place, which is a
copy (not a rename) whenever that folder is on another filesystem: a kill mid-copy leaves a torn
`last.ckpt`. Here the temp file sits beside the checkpoint and is renamed over it.

`read_checkpoint` is what `ckpt_path=` goes through: a truncated or damaged file, another format, another
program's checkpoint (an SD `.ckpt` is a Lightning checkpoint too) or a pickle that would run code gets one
line, without running anything from the file and in bounded memory (tensors are memory-mapped, and the
pickle's size is checked before it is read).
"""

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO

from lit_ti.errors import UserError
from lit_ti.io.atomic import atomic_path

MAX_PICKLE = 64 * 2**20  # a lit_ti checkpoint's pickle is kilobytes; tensors live beside it in the zip
TRAINED = ("bank", "ema", "hypernetwork", "lora")  # the only modules lit_ti checkpoints hold (methods' `checkpointed`)
FIX = "use a checkpoints/last.ckpt written by lit_ti, or start a fresh run without ckpt_path"


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        return read_checkpoint(path)


def read_checkpoint(path: str | Path, key: str = "ckpt_path") -> dict[str, Any]:
    """A lit_ti Lightning checkpoint's contents (tensors on the CPU, memory-mapped); a UserError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{key}={path}: no such checkpoint; use a run's checkpoints/last.ckpt")
    _check_container(path, key)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        call = found.group(1) if found else "a non-tensor object"
        raise UserError(f"{key}={path}: refused: loading it would call {call}, which can run code; {FIX}") from None
    except Exception as e:
        raise UserError(f"{key}={path}: damaged, cannot be read ({type(e).__name__}); {FIX}") from None
    if not isinstance(ckpt, dict) or not {"state_dict", "global_step", "pytorch-lightning_version"} <= ckpt.keys():
        raise UserError(f"{key}={path}: not a Lightning checkpoint (no training state in it); {FIX}")
    state = ckpt["state_dict"]
    foreign = [k for k in state if str(k).split(".", 1)[0] not in TRAINED]
    if not state or foreign:
        what = f"it holds {foreign[0]!r}, ..." if foreign else "it holds no trained tensors"
        raise UserError(f"{key}={path}: another program's checkpoint, not lit_ti's ({what}); {FIX}")
    _check_crc(path, key)
    return ckpt


def _check_container(path: Path, key: str) -> None:
    """torch's zip layout, intact, with a pickle of sane size (checked before anything is unpickled)."""
    if not zipfile.is_zipfile(path):
        raise UserError(f"{key}={path}: not a Lightning checkpoint (truncated, damaged or another format); {FIX}")
    try:
        with zipfile.ZipFile(path) as zf:
            pickles = [i for i in zf.infolist() if i.filename.endswith("data.pkl")]
            if len(pickles) != 1:
                raise UserError(f"{key}={path}: not a torch checkpoint (no single data.pkl inside); {FIX}")
            if pickles[0].file_size > MAX_PICKLE:
                raise UserError(
                    f"{key}={path}: refused unread: its pickle is {pickles[0].file_size / 2**20:.0f} MiB, far "
                    f"more than a checkpoint's; {FIX}"
                )
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise UserError(f"{key}={path}: damaged ({e}); {FIX}") from None


def _check_crc(path: Path, key: str) -> None:
    """Every member's CRC, streamed (after the structure checks, so a foreign multi-GB file is not read)."""
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        bad = str(e)
    if bad is not None:
        raise UserError(f"{key}={path}: damaged (bad data in {bad}); {FIX}")
