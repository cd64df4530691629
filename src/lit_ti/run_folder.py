"""The run folder is the user's: lit_ti deletes only what it made, and never a finished run's outputs.

* A fresh run (no `ckpt_path`) into a folder that already holds a run's checkpoints or final files is
  refused: writing there would overwrite them, and versioned copies would break the A1111 naming (the file
  stem is the prompt word) and the printed resume commands.
* A run stopped by a user error before training began leaves nothing behind: what this process made in the
  run folder (TensorBoard's first event file, Hydra's `.hydra/` and log file, the folder itself) is removed.
  Anything that was there before, or that lit_ti does not make, is kept.
* Temp files of killed runs are removed only once the run is validated, only in the folders lit_ti writes,
  and only when their writer is dead (see `lit_ti.io.atomic`).
"""

import logging
import os
import tempfile
import time
from pathlib import Path

import lightning as L

from lit_ti.errors import UserError
from lit_ti.io.atomic import remove_stale, temp_prefix
from lit_ti.io.formats import final_suffixes
from lit_ti.io.paths import write_failed

# When this process began, as far as the run folder can tell: lit_ti.train is imported by train.py before
# Hydra makes the run folder. A little slack for filesystems' coarse clocks.
STARTED = time.time() - 0.05
METHOD_FOLDERS = ("embeddings", "hypernetworks", "loras")  # the methods' `periodic_dirname`s (a test checks)
MADE = ("tensorboard", "checkpoints", *METHOD_FOLDERS, "previews", "image_embeddings", "lightning_logs")
# temp files only here (`.hydra` holds the config record written when training begins; a test checks the list)
WRITTEN = ("", ".hydra", *METHOD_FOLDERS, "previews", "image_embeddings", "checkpoints")


def _new(path: Path) -> bool:
    return path.lstat().st_mtime >= STARTED


class RunFolder:
    """What a run found in its folder when it began, so that a failed start can undo its own traces only."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).absolute()
        self.training = False  # set by `callback()` when the first step begins: from then on, outputs stay
        self.hydra = self._hydra_made()
        self.created = self._created_folders()
        self.before = self._inventory() - {q for p in self.hydra for q in (p, *self._below(p))}

    # ----------------------------------------------------------------- what is whose
    def _hydra_made(self) -> list[Path]:
        """`.hydra/` and the log file, when Hydra made them for this very run (not a previous one's)."""
        try:
            from hydra.core.hydra_config import HydraConfig

            hc = HydraConfig.get()
        except (ImportError, ValueError):
            return []
        if Path(hc.runtime.output_dir).absolute() != self.root:
            return []
        candidates = [self.root / hc.output_subdir] if hc.output_subdir else []
        candidates += [
            Path(h.baseFilename)
            for h in logging.root.handlers
            if isinstance(h, logging.FileHandler) and Path(h.baseFilename).parent == self.root
        ]
        return [p for p in candidates if p.exists() and _new(p)]

    def _created_folders(self) -> list[Path]:
        """The run folder and the parents this run created (innermost first)."""
        chain, p = [], self.root
        if not p.exists():
            while not p.exists():
                chain.append(p)
                p = p.parent
            return chain
        if not self.hydra or any(q not in self.hydra for q in p.iterdir()) or not _new(p.parent):
            return []  # it was there before: Hydra only added its files
        chain, cwd = [p], Path.cwd().absolute()
        p = p.parent
        while p not in (cwd, p.parent) and _new(p.parent) and [q.name for q in p.iterdir()] == [chain[-1].name]:
            chain.append(p)  # an `outputs/<name>/` made for this run alone
            p = p.parent
        return chain

    @staticmethod
    def _below(p: Path) -> list[Path]:
        return list(p.rglob("*")) if p.is_dir() and not p.is_symlink() else []

    def _inventory(self) -> set[Path]:
        """Top-level entries, and everything inside the folders lit_ti (or Hydra) makes."""
        if not self.root.is_dir():
            return set()
        found = set()
        ours = set(MADE) | {p.name for p in self.hydra}
        for p in self.root.iterdir():
            found.add(p)
            if p.name in ours:
                found.update(self._below(p))
        return found

    # ----------------------------------------------------------------- rules
    def refuse_finished(self, name: str, checkpoint_dirs: list[Path]) -> None:
        """A fresh run must not overwrite another run's checkpoints or final files."""
        found = [d / f for d in checkpoint_dirs if d.is_dir() for f in sorted(os.listdir(d)) if f.endswith(".ckpt")]
        found += [self.root / f"{stem}{suffix}" for stem in (name, f"{name}-neg") for suffix in final_suffixes()]
        found = [p for p in found if p.is_file()]
        if found:
            resume = next((p for p in found if p.name == "last.ckpt"), None) or next(
                (p for p in found if p.suffix == ".ckpt"), None
            )
            hint = f", or resume it with ckpt_path={resume}" if resume else ""
            raise UserError(
                f"hydra.run.dir={self.root}: holds another run's outputs ({found[0].name}); a fresh run would "
                f"overwrite them: choose a new hydra.run.dir{hint}"
            )

    def check_writable(self) -> None:
        """Make the folder and write a probe (a lit_ti temp file, removed at once): a read-only or full disk is
        one line now, not a traceback at the first save."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=temp_prefix("probe"), suffix=".tmp", dir=self.root)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise write_failed(self.root, e) from None

    def record_config(self, cfg) -> None:
        """`.hydra/config.yaml` and `overrides.yaml`, written by us when training begins, after every check (a
        resume's identity included; Hydra's own `output_subdir` is off: it would overwrite a finished run's
        record before any check could refuse)."""
        from omegaconf import OmegaConf

        from lit_ti.io.atomic import atomic_path

        try:
            from hydra.core.hydra_config import HydraConfig

            overrides = list(HydraConfig.get().overrides.task)
        except ValueError:
            overrides = []
        config = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
        for name, text in (
            ("config.yaml", OmegaConf.to_yaml(config)),
            ("overrides.yaml", OmegaConf.to_yaml(overrides)),
        ):
            with atomic_path(self.root / ".hydra" / name) as tmp:
                tmp.write_text(text, encoding="utf-8")

    def remove_stale(self, checkpoint_dirs: list[Path]) -> list[Path]:
        return remove_stale([self.root / sub for sub in WRITTEN] + checkpoint_dirs)

    def callback(self, cfg=None) -> L.Callback:
        folder = self

        class TrainingBegan(L.Callback):
            def on_train_start(self, trainer, pl_module) -> None:
                folder.training = True
                if cfg is not None and trainer.is_global_zero:
                    folder.record_config(cfg)

        return TrainingBegan()

    def undo(self) -> list[Path]:
        """Remove what this process made, if training never began; return what was removed."""
        if self.training:
            return []
        self._close_logs()
        ours = set(MADE) | {p.name for p in self.hydra}
        new = [p for p in self._inventory() - self.before if p.relative_to(self.root).parts[0] in ours]
        removed = []
        for p in sorted(new, key=lambda p: len(p.parts), reverse=True):  # contents before their folders
            try:
                if p.is_dir() and not p.is_symlink():
                    if any(p.iterdir()):
                        continue  # something not made by this run is inside
                    p.rmdir()
                else:
                    p.unlink()
                removed.append(p)
            except OSError:
                pass  # not empty (someone else's file), or already gone
        for folder in self.created:
            try:
                folder.rmdir()  # only when empty
                removed.append(folder)
            except OSError:
                break
        return removed

    def _close_logs(self) -> None:
        for h in list(logging.root.handlers):
            if isinstance(h, logging.FileHandler) and Path(h.baseFilename) in self.hydra:
                logging.root.removeHandler(h)
                h.close()
