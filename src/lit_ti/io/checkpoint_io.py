"""Lightning checkpoints written atomically.

Lightning's own `_atomic_save` stages the file in the system temp folder and moves it into place, which is a
copy (not a rename) whenever that folder is on another filesystem: a kill mid-copy leaves a torn
`last.ckpt`. Here the temp file sits beside the checkpoint and is renamed over it.
"""

from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO

from lit_ti.io.atomic import atomic_path


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)
