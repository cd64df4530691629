"""Write the trained files (embeddings, hypernetworks) every N optimizer steps and at the end (also after
Ctrl-C, and after a resume whose checkpoint was already at the last step).

A periodic copy the system refuses to write (disk full, read-only) is a warning and training goes on; the
final files failing stops the run with one line (the last checkpoint stays intact, so a resume writes them).
"""

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from lit_ti.errors import UserError, check_period
from lit_ti.io.paths import WriteFailed
from lit_ti.optimizers import evaluation_weights


class ExportEmbeddings(L.Callback):
    """Periodic copies go to `<dirpath>/<periodic_dirname>/<name>-<step>.<fmt>` (the method's folder:
    `embeddings/`, `hypernetworks/`; A1111 naming); the final files to `<dirpath>/<name>.<fmt>`.

    Args:
        dirpath: the run's output folder.
        every_n_steps: period in optimizer steps; 0 = only the final files.
        formats: any of `pt` (A1111), `safetensors` (kohya/A1111/ComfyUI), `bin` (diffusers) that the method
            writes (`io.formats.exportable`).
    """

    def __init__(self, dirpath: str, every_n_steps: int = 500, formats: tuple[str, ...] = ("pt", "safetensors")):
        self.dirpath = Path(dirpath)
        self.every_n_steps = check_period("callbacks.export.every_n_steps", every_n_steps)
        if isinstance(formats, str) or not formats:
            raise UserError("callbacks.export.formats: a non-empty list, e.g. [pt, safetensors]")
        self.formats = tuple(formats)
        self.last_step = -1
        self.final_files: list[Path] = []
        self.wrote_final = False

    @rank_zero_only
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0 and step != self.last_step:
            self.last_step = step
            folder = self.dirpath / pl_module.periodic_dirname
            try:
                with evaluation_weights(trainer.optimizers):
                    pl_module.export(folder, step, tag=f"-{step}", formats=self.formats)
            except WriteFailed as e:
                rank_zero_warn(f"{e}. Training goes on; the periodic copy of step {step} is missing")

    @rank_zero_only
    def on_train_end(self, trainer, pl_module) -> None:
        with evaluation_weights(trainer.optimizers):
            self.final_files = pl_module.export(self.dirpath, trainer.global_step, formats=self.formats)
        self.wrote_final = True

    @rank_zero_only
    def on_fit_end(self, trainer, pl_module) -> None:
        # a resume from a checkpoint at max_steps runs no step and no on_train_end: a run killed during its
        # final export still gets its final files
        if not self.wrote_final and trainer.global_step > 0 and pl_module.backbone is not None:
            self.on_train_end(trainer, pl_module)

    @rank_zero_only
    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # a stop before the first step (a model still loading) has nothing trained to write
        if isinstance(exception, KeyboardInterrupt) and pl_module.backbone is not None and trainer.global_step > 0:
            with evaluation_weights(trainer.optimizers):
                self.final_files = pl_module.export(self.dirpath, trainer.global_step, formats=self.formats)
