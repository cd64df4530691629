"""Prepare a training folder: `python preprocess.py src=raw/ dst=data/my-cat [width=512 crop=focal ...]`."""

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import hydra
from omegaconf import DictConfig

from lit_ti.cli import entry
from lit_ti.errors import report_user_errors
from lit_ti.preprocess import run


@hydra.main(version_base="1.3", config_path="configs", config_name="preprocess")
def preprocess(cfg: DictConfig) -> None:
    report_user_errors(run, cfg)


if __name__ == "__main__":
    entry(preprocess, __file__, "preprocess")  # the command line checked first: one line for a mistake; --help
