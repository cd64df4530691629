"""Generate images: `python generate.py prompt="a photo of my-cat" embeddings_dir=... [key=value ...]`."""

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import hydra
from omegaconf import DictConfig

import lit_ti.train  # noqa: F401  (registers the lit_ti.* config resolvers)
from lit_ti.cli import entry
from lit_ti.errors import report_user_errors
from lit_ti.generate import run


@hydra.main(version_base="1.3", config_path="configs", config_name="generate")
def generate(cfg: DictConfig) -> None:
    report_user_errors(run, cfg)


if __name__ == "__main__":
    entry(generate, __file__, "generate")  # the command line checked first: one line for a mistake; --help
