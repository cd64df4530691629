"""Write the trained files (embeddings, hypernetworks) every N optimizer steps and at the end (also after
Ctrl-C)."""

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from lit_ti.errors import UserError, check_period


class ExportEmbeddings(L.Callback):
    """Periodic copies go to `<dirpath>/embeddings/<name>-<step>.<fmt>` (`hypernetworks/` for hypernetworks;
    A1111 naming); the final files to `<dirpath>/<name>.<fmt>`.

    Args:
        dirpath: the run's output folder.
        every_n_steps: period in optimizer steps; 0 = only the final files.
        formats: any of `pt` (A1111), `safetensors` (kohya/A1111/ComfyUI), `bin` (diffusers).
    """

    def __init__(self, dirpath: str, every_n_steps: int = 500, formats: tuple[str, ...] = ("pt", "safetensors")):
        self.dirpath = Path(dirpath)
        self.every_n_steps = check_period("callbacks.export.every_n_steps", every_n_steps)
        if isinstance(formats, str) or not formats:
            raise UserError("callbacks.export.formats: a non-empty list, e.g. [pt, safetensors]")
        self.formats = tuple(formats)
        self.last_step = -1
        self.final_files: list[Path] = []

    @rank_zero_only
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0 and step != self.last_step:
            self.last_step = step
            folder = self.dirpath / getattr(pl_module, "periodic_dirname", "embeddings")
            pl_module.export(folder, step, tag=f"-{step}", formats=self.formats)

    @rank_zero_only
    def on_train_end(self, trainer, pl_module) -> None:
        self.final_files = pl_module.export(self.dirpath, trainer.global_step, formats=self.formats)

    @rank_zero_only
    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt) and pl_module.backbone is not None:
            self.final_files = pl_module.export(self.dirpath, trainer.global_step, formats=self.formats)
