"""Train a concept: `python train.py [experiment=ti_subject] [key=value ...]` (see configs/)."""

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # hides torchvision notices irrelevant here

import hydra
from omegaconf import DictConfig

import lit_ti.train
from lit_ti.cli import entry


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def train(cfg: DictConfig) -> float | None:
    return lit_ti.train.main(cfg)


if __name__ == "__main__":
    entry(train, __file__, "train")  # the command line checked first: one line for a mistake; --help
