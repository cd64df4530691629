import hashlib
import os
import stat
import sys
import warnings
from dataclasses import dataclass
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


# ---------------------------------------------------------------- the trust harness
@dataclass
class Outcome:
    """What one entry-point run did, as its user would see it."""

    code: int  # exit status (0 = finished)
    stderr: str
    errors: list[str]  # the `error: ...` lines
    warnings: list[str]  # warnings.warn messages and `warning: ...` lines
    out: Path  # the run folder


def _snapshot(root: Path, skip: Path) -> dict[str, str]:
    """sha256 of every file under `root` outside `skip` (symlinks by their target text)."""
    seen = {}
    for p in sorted(root.rglob("*")):
        if p == skip or skip in p.parents or not (p.is_file() or p.is_symlink()):
            continue
        if p.is_symlink():
            seen[str(p)] = "link:" + os.readlink(p)
        elif stat.S_ISREG(p.lstat().st_mode):
            seen[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return seen


class Entry:
    """Runs lit_ti's four entry points in-process, as their command lines would, and checks the trust rules
    on every run: no traceback, nothing outside the run folder changed, nothing the user put into the run
    folder deleted or changed. The neighbourhood is `root` (a tmp folder); the run folder is
    `root/user/projects/run`, deep enough that `../../x` still lands inside what is watched."""

    def __init__(self, root: Path, capsys):
        self.root, self.capsys = root, capsys
        self.out = root / "user" / "projects" / "run"

    def _guarded(self, out: Path, fn) -> Outcome:
        before = _snapshot(self.root, out)
        user_files = _snapshot(out, out / ".lit_ti-none") if out.is_dir() else {}
        code = 0
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                fn()
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
        err = self.capsys.readouterr().err
        assert "Traceback" not in err, err[-3000:]
        assert _snapshot(self.root, out) == before, "a file outside the run folder was written or deleted"
        after = _snapshot(out, out / ".lit_ti-none") if out.is_dir() else {}
        lost = {p for p in user_files if p not in after}
        assert not lost, f"files the user put in the run folder were deleted: {sorted(lost)}"
        lines = err.splitlines()
        errors = [line for line in lines if line.startswith("error: ")]
        warned = [str(w.message) for w in caught] + [line for line in lines if line.startswith("warning: ")]
        return Outcome(code, err, errors, warned, out)

    def train(self, *overrides: str) -> Outcome:
        import lit_ti.train

        cfg = compose(f"paths.output_dir={self.out}", *overrides)
        return self._guarded(self.out, lambda: lit_ti.train.main(cfg))

    def generate(self, *overrides: str) -> Outcome:
        import lit_ti.generate
        from lit_ti.errors import report_user_errors

        cfg = compose(f"out_dir={self.out}", *overrides, config="generate")
        return self._guarded(self.out, lambda: report_user_errors(lit_ti.generate.run, cfg))

    def preprocess(self, *overrides: str) -> Outcome:
        import lit_ti.preprocess
        from lit_ti.errors import report_user_errors

        cfg = compose(f"dst={self.out}", "progress=false", *overrides, config="preprocess")
        return self._guarded(self.out, lambda: report_user_errors(lit_ti.preprocess.run, cfg))

    def evaluate(self, *argv: str) -> Outcome:
        """`python evaluate.py ARGV` (it writes nothing; its run folder is only watched)."""
        import runpy

        def call():
            old = sys.argv
            sys.argv = ["evaluate.py", *argv]
            try:
                runpy.run_path(str(ROOT / "evaluate.py"), run_name="__main__")
            finally:
                sys.argv = old

        return self._guarded(self.out, call)


@pytest.fixture
def entry(tmp_path, capsys) -> Entry:
    """The four entry points under the trust rules (see Entry)."""
    return Entry(tmp_path, capsys)
