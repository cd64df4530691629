import os
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _quiet():
    from lit_ti.train import QUIET

    for message in QUIET:
        warnings.filterwarnings("ignore", message=message)
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def backbone():
    """The tiny random backbone, built once (frozen; tests must not modify it)."""
    from lit_ti.models import TinyBackbone

    return TinyBackbone().load()


def make_concept_dir(folder: Path, n: int = 4, size: int = 48) -> Path:
    """`n` small coloured images with sidecar captions (and one caption only in the file name)."""
    folder.mkdir(parents=True, exist_ok=True)
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (200, 30, 200)]
    for i in range(n):
        im = Image.new("RGB", (size, size + 8 * i), colours[i % len(colours)])
        im.paste((255, 255, 255), (8, 8, 24, 24))
        im.save(folder / f"{i:03d}-a square thing.png")
        if i:
            (folder / f"{i:03d}-a square thing.txt").write_text(f"a square thing, colour {i}\n", encoding="utf-8")
    return folder


@pytest.fixture
def concept_dir(tmp_path) -> Path:
    return make_concept_dir(tmp_path / "concept")


def compose(*overrides: str, hydra: bool = False):
    """The training config as `python train.py <overrides>` would see it (Hydra's compose API)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import lit_ti.train  # noqa: F401  (registers the lit_ti.asset resolver)

    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIGS)):
        return hydra_compose("train", overrides=list(overrides), return_hydra_config=hydra)
