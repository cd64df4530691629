"""The `train_measured` and `fit` fixtures: `python train.py` measured in its own process, and short seeded
in-process fits on the tiny backbone (a pytest plugin that tests/conftest.py loads)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import FIT_METHOD, NAME, ROOT


# ---------------------------------------------------------------- measured runs (slow lane)
def _train_measured(args: list[str], log: Path, timeout: float = 3600) -> tuple[int, float]:
    """`python train.py ARGS` in a subprocess: (exit status, its peak RSS in GiB)."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    peak = log.with_suffix(".peak")
    with open(log, "w") as out:
        cmd = [sys.executable, "-c", _LAUNCH, str(peak), str(timeout), sys.executable, "train.py", *args]
        proc = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=out, env=env)
    return proc.returncode, (int(peak.read_text()) / 2**20 if peak.exists() else float("nan"))  # none: timed out


# train.py is started by a small launcher, which reports its child's peak RSS (KiB). Measured from pytest directly,
# ru_maxrss would include pytest's own high-water mark: Linux carries it into a child across fork and exec.
_LAUNCH = (
    "import resource, subprocess, sys; code = subprocess.run(sys.argv[3:], timeout=float(sys.argv[2])).returncode;"
    "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); sys.exit(code)"
)


@pytest.fixture(scope="session")
def train_measured():
    """`train_measured(args, log, timeout=3600) -> (exit status, peak RSS GiB)`: `python train.py ARGS` in its
    own process, output into `log` (see _train_measured)."""
    return _train_measured


# ---------------------------------------------------------------- short in-process fits on the tiny backbone
def _fit(
    tmp_path,
    concept_dir,
    max_steps=6,
    ckpt_path=None,
    precision="32-true",
    accumulate=1,
    every=3,
    accelerator="cpu",
    extra_callbacks=(),
    trainer_kw=None,
    method_cls=None,
    dm_kw=None,
    base_kw=FIT_METHOD,
    backbone=None,
    backbone_kw=None,
    **method_kw,
):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    from lit_ti.callbacks import ExportEmbeddings, LossCSV, PreviewImages
    from lit_ti.data import ConceptDataModule
    from lit_ti.methods import TextualInversion
    from lit_ti.models import TinyBackbone

    L.seed_everything(0, verbose=False)
    method = (method_cls or TextualInversion)(
        backbone or TinyBackbone(**(backbone_kw or {})), **{**base_kw, **method_kw}
    )
    dm = ConceptDataModule(dir=str(concept_dir), name=NAME, **{"template": "subject", **(dm_kw or {})})
    callbacks = [
        ExportEmbeddings(str(tmp_path), every_n_steps=every),
        PreviewImages(str(tmp_path), every_n_steps=every, num_inference_steps=2),
        LossCSV(str(tmp_path)),
        ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=every, save_top_k=-1, save_last=True),
        *extra_callbacks,
    ]
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=1,
        max_steps=max_steps,
        precision=precision,
        accumulate_grad_batches=accumulate,
        logger=TensorBoardLogger(str(tmp_path), name="tb", version=""),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        **(trainer_kw or {}),
    )
    trainer.fit(method, datamodule=dm, ckpt_path=ckpt_path)
    return method, trainer


@pytest.fixture(scope="session")
def fit():
    """`fit(folder, concept_dir, max_steps=6, ...) -> (method, trainer)`: a seeded fit of `NAME` (textual
    inversion with FIT_METHOD unless `method_cls`/`base_kw` say otherwise, on `backbone` if given, else
    `TinyBackbone(**backbone_kw)`) writing the run's files into `folder` every `every` steps."""
    return _fit
