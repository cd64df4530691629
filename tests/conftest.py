import os
import subprocess
import sys
import time
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# Fixture groups kept in their own modules: runs and fits, the trust harness, hostile files.
pytest_plugins = ("tests.fits", "tests.trust_harness", "tests.hostile_files")

# ---------------------------------------------------------------- paths, test lanes, the tiny backbone, data, configs
ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


# The quick lane (`python -m pytest --quick`, under 2 minutes on 2 idle cores) is the edit-test loop: it leaves
# out the modules (or single tests, by function name) that start `python train.py` processes or a second backbone
# family, and those that run a whole pipeline (toy evaluation, single-file conversion, sampling, torch.compile,
# every loader x precision). The default lane runs everything.
QUICK_SKIPS = {
    # processes
    "test_cli",
    "test_crash",
    "test_ddp",
    "test_sweeps",
    "test_notebook",
    "test_sdxl",
    "test_sd3",  # a second model family end to end, as test_sdxl
    "test_sd3_single_file",
    "test_latent_cache",
    "test_every_documented_command_line_parses",  # a bash per docs block, a Hydra composition per command
    # whole pipelines
    "test_toy",
    "test_toy_evaluation",
    "test_single_file",
    "test_generate",
    "test_speed_switches",
    "test_precision",
    "test_resume",  # every method interrupted and resumed
    "test_bad_input",  # a hundred inputs, some through `python train.py`
    "test_pivotal",  # trains and exports with a LoRA
    "test_pivotal_loaders",  # generate.py and diffusers with a LoRA
    "test_time_to_quality",  # short fits per option
}


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true", help="the edit-test loop (under 2 minutes): see QUICK_SKIPS")


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip)
    if config.getoption("--quick"):
        kept = [i for i in items if not {i.module.__name__.rsplit(".", 1)[-1], i.originalname} & QUICK_SKIPS]
        config.hook.pytest_deselected(items=[i for i in items if i not in kept])
        items[:] = kept


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


def make_tagger(folder: Path) -> Path:
    """A tiny local image-classification tagger (transformers ViT) whose every tag but the rating scores
    sigmoid(10): tags `red`, `square_shape`, `rating:safe`."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    tags = ["red", "square_shape", "rating:safe"]
    config = ViTConfig(
        image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    config.id2label = dict(enumerate(tags))
    config.label2id = {t: i for i, t in enumerate(tags)}
    model = ViTForImageClassification(config)
    for p in model.classifier.parameters():
        p.data.zero_()
    model.classifier.bias.data.fill_(10.0)
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture
def concept_dir(tmp_path) -> Path:
    return make_concept_dir(tmp_path / "concept")


def compose(*overrides: str, hydra: bool = False, config: str = "train"):
    """The config as `python <config>.py <overrides>` would see it (Hydra's compose API)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import lit_ti.train  # noqa: F401  (registers the lit_ti.asset resolver)

    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIGS)):
        return hydra_compose(config, overrides=list(overrides), return_hydra_config=hydra)


# The concept every short fit (`fit`, tests/fits.py) trains; its files are named after it.
NAME = "zz-thing"
FIT_METHOD = dict(
    name=NAME, num_vectors=2, init_text="square thing", optimizer=partial(torch.optim.AdamW, lr=0.05, weight_decay=0.0)
)


# ---------------------------------------------------------------- `python train.py` as a user runs it
class TrainCommand:
    """`python train.py ARGS` in a subprocess from the project root, with Hydra's short errors (what a user sees)."""

    @staticmethod
    def _env() -> dict[str, str]:
        return {**os.environ, "HYDRA_FULL_ERROR": "0"}

    def train(self, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "train.py", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self._env(),
        )

    def train_ok(self, run_dir, *args: str) -> subprocess.CompletedProcess:
        """A run into `run_dir` that must succeed."""
        run = self.train(*args, f"hydra.run.dir={run_dir}")
        assert run.returncode == 0, run.stderr[-3000:]
        return run

    def start(self, run_dir, *args: str, timeout: float = 180, ready: str | None = None) -> subprocess.Popen:
        """`python train.py` in the background, returned once it has logged 3 steps (loss CSV rows), or once the
        file `ready` names exists in `run_dir` (the final exports: the end-of-run work has begun)."""
        proc = subprocess.Popen(
            [sys.executable, "train.py", *args, "callbacks.loss_csv.every_n_steps=1", f"hydra.run.dir={run_dir}"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self._env(),
        )
        csv = run_dir / "textual_inversion_loss.csv"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            if (run_dir / ready).is_file() if ready else csv.is_file() and len(csv.read_text().splitlines()) > 3:
                break
            time.sleep(0.2)
        return proc


@pytest.fixture(scope="session")
def cli() -> TrainCommand:
    """`cli.train(*args)`, `cli.train_ok(run_dir, *args)`, `cli.start(run_dir, *args)` (see TrainCommand)."""
    return TrainCommand()


# ---------------------------------------------------------------- SD3 single files
@pytest.fixture(scope="session")
def sd3_single_file(tmp_path_factory):
    """`sd3_single_file(size="sd3_tiny", inside=("clip_l", "clip_g", "t5"))` -> (backbone, files): a tiny SD3
    saved as a diffusers folder (`files["config"]`, T5's tokenizer in `files["t5_tokenizer"]`) and as an
    original-layout single file (`files["path"]`: MMDiT, VAE and the encoders named in `inside`), with each
    encoder also as its own ComfyUI-style file (`files["clip_l"]`, `["clip_g"]`, `["t5"]`); see
    tests/ldm_layout.py. Its CLIP-L projection is the identity: SD3 uses CLIP-L's pooled output unprojected,
    and diffusers' single-file loader sets that projection so. Built once per (size, inside)."""
    from lit_ti.models import TinySD3
    from tests.ldm_layout import write_sd3_single_file

    made = {}

    def make(size: str = "sd3_tiny", inside=("clip_l", "clip_g", "t5")):
        if (size, tuple(inside)) not in made:
            backbone = TinySD3(size=size).load()
            width = backbone.text_encoder.config.hidden_size
            with torch.no_grad():
                backbone.text_encoder.text_projection.weight.copy_(torch.eye(width))
            folder = tmp_path_factory.mktemp(size)
            backbone.pipeline().save_pretrained(folder / "config")
            files = write_sd3_single_file(backbone, folder / "files", inside=inside)
            files.update(config=folder / "config", t5_tokenizer=folder / "config" / "tokenizer_3")
            made[size, tuple(inside)] = backbone, files
        return made[size, tuple(inside)]

    return make


# ---------------------------------------------------------------- generation and the webui's file check
@pytest.fixture
def generate(tmp_path):
    """`generate(*overrides)`: the images `python generate.py` writes (4 steps, seed 5), each call into a fresh
    `tmp_path/out<n>`."""

    def run(*overrides: str) -> list[Image.Image]:
        import lit_ti.generate

        out = tmp_path / f"out{len(list(tmp_path.glob('out*')))}"
        paths = lit_ti.generate.run(compose(f"out_dir={out}", "steps=4", "seed=5", *overrides, config="generate"))
        assert all(p.parent == out for p in paths)
        return [Image.open(p) for p in paths]

    return run


@pytest.fixture(scope="session")
def pixels():
    """`pixels(images)`: the images as one int16 array [n, h, w, 3], so that they can be subtracted."""
    return lambda images: np.stack([np.asarray(im.convert("RGB"), dtype=np.int16) for im in images])


@pytest.fixture(scope="session")
def webui_accepts():
    """`webui_accepts(path)`: True if the A1111 webui's pre-load check would let the file through."""
    from tests.webui_check import webui_accepts

    return webui_accepts


@pytest.fixture(scope="session")
def a1111_lora():
    """`a1111_lora.a1111_load_lora(state_dict, layer_names)`, `.embedding_from_data(data)`: the A1111 webui's
    LoRA loader key rules (tests/a1111_lora.py)."""
    import tests.a1111_lora

    return tests.a1111_lora
