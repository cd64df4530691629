import hashlib
import os
import stat
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# ---------------------------------------------------------------- paths, test lanes, the tiny backbone, data, configs
ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


# The quick lane (`python -m pytest --quick`, under 2 minutes on 2 idle cores) is the edit-test loop: it leaves
# out the modules that start `python train.py` processes or a second backbone family, and those that run a
# whole pipeline (toy evaluation, single-file conversion, sampling, torch.compile, every loader x precision).
# The default lane runs everything.
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
    # whole pipelines
    "test_toy",
    "test_single_file",
    "test_generate",
    "test_speed_switches",
    "test_precision",
    "test_resume",  # every method interrupted and resumed
    "test_bad_input",  # a hundred inputs, some through `python train.py`
    "test_pivotal",  # trains, exports and generates with a LoRA
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
        kept = [i for i in items if i.module.__name__.rsplit(".", 1)[-1] not in QUICK_SKIPS]
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
NAME = "zz-thing"  # the concept every short fit trains (its files are named after it)
FIT_METHOD = dict(
    name=NAME, num_vectors=2, init_text="square thing", optimizer=partial(torch.optim.AdamW, lr=0.05, weight_decay=0.0)
)


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


# ---------------------------------------------------------------- the trust harness
@dataclass
class Outcome:
    """What one entry-point run did, as its user would see it."""

    code: int  # exit status (0 = finished)
    stderr: str
    stdout: str
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
            except KeyboardInterrupt:  # escaping, it would end pytest's session, and print a traceback for the user
                pytest.fail("a Ctrl-C escaped the entry point as a KeyboardInterrupt")
        captured = self.capsys.readouterr()
        err = captured.err
        assert "Traceback" not in err, err[-3000:]
        assert _snapshot(self.root, out) == before, "a file outside the run folder was written or deleted"
        after = _snapshot(out, out / ".lit_ti-none") if out.is_dir() else {}
        lost = {p for p in user_files if p not in after}
        assert not lost, f"files the user put in the run folder were deleted: {sorted(lost)}"
        lines = err.splitlines()
        errors = [line for line in lines if line.startswith("error: ")]
        warned = [str(w.message) for w in caught] + [line for line in lines if line.startswith("warning: ")]
        return Outcome(code, err, captured.out, errors, warned, out)

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


# ---------------------------------------------------------------- hostile files (readers' trust tests)
def _zip_bomb(path: Path, inflated: int) -> Path:
    """A torch zip whose storage entry deflates `inflated` bytes of zeros into a few KB (what a loader
    that trusts the zip directory allocates)."""
    import zipfile

    buffer = __import__("io").BytesIO()
    torch.save({"string_to_param": {"*": torch.zeros(2, 8)}}, buffer)
    with zipfile.ZipFile(buffer) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as out:
        for info in src.infolist():
            if info.filename.endswith("/data/0"):
                entry = zipfile.ZipInfo(info.filename)
                entry.compress_type = zipfile.ZIP_DEFLATED
                with out.open(entry, "w", force_zip64=True) as f:
                    chunk = bytes(2**24)
                    for _ in range(inflated // len(chunk)):
                        f.write(chunk)
            else:
                out.writestr(info.filename, src.read(info))
    return path


def _legacy_storage_lie(path: Path, numel: int) -> Path:
    """torch's legacy format, declaring one float storage of `numel` elements and holding 64 bytes."""
    import collections
    import pickle

    class Marker:
        pass

    class Tensor_:
        def __reduce__(self):
            return torch._utils._rebuild_tensor_v2, (Marker, 0, (numel,), (1,), False, collections.OrderedDict())

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", numel, None) if obj is Marker else None

    with open(path, "wb") as f:
        for record in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
            pickle.dump(record, f, protocol=2)
        Pickler(f, protocol=2).dump({"emb_params": Tensor_()})
        pickle.dump(["0"], f, protocol=2)
        f.write((16).to_bytes(8, "little") + bytes(64))
    return path


def _png_zlib_bomb(path: Path, inflated: int) -> Path:
    """An A1111 pixel-only embedding PNG whose payload inflates to `inflated` bytes of JSON whitespace."""
    import zlib

    import numpy as np

    from lit_ti.io.png_embeddings import encode_blocks

    deflate = zlib.compressobj(9)
    chunk = b" " * 2**24
    payload = b"".join(deflate.compress(chunk) for _ in range(inflated // len(chunk))) + deflate.flush()
    low, high = encode_blocks(payload, 64, torch.ones(8))
    gap = np.zeros((64, 1, 3), dtype=np.uint8)
    grey = np.full((64, 64, 3), 128, dtype=np.uint8)
    Image.fromarray(np.concatenate([low, gap, grey, gap, high], axis=1)).save(path)
    return path


def _png_text(path: Path, data: dict) -> Path:
    """An A1111 PNG embedding carrying `data` in its text chunk only (NaN allowed, as json writes it)."""
    import base64

    from PIL import PngImagePlugin

    from lit_ti.io.png_embeddings import to_json

    info = PngImagePlugin.PngInfo()
    info.add_text("sd-ti-embedding", base64.b64encode(to_json(data)).decode("ascii"))
    Image.new("RGB", (32, 32), (90, 90, 90)).save(path, pnginfo=info)
    return path


@pytest.fixture(scope="session")
def hostile(tmp_path_factory) -> dict[str, Path]:
    """Files a stranger could hand us, each small: bombs, lying sizes, non-finite values, and the one odd but
    honest layout (an original-TI `.pt` with `string_to_param` as an `nn.ParameterDict`). Width 32 (tiny)."""
    import json
    import struct

    from lit_ti import io
    from lit_ti.io.embeddings import a1111_dict
    from lit_ti.modules.hypernetwork import Hypernetwork

    d = tmp_path_factory.mktemp("hostile")
    nan = torch.randn(2, 32)
    nan[0, 3] = float("nan")
    files = {
        "zip_bomb": _zip_bomb(d / "zipbomb.pt", 2**27),
        "legacy_lie": _legacy_storage_lie(d / "legacylie.pt", 10**11),
        "png_bomb": _png_zlib_bomb(d / "pngbomb.png", 2**26),
        "nan_pt": d / "nanvec.pt",
        "nan_safetensors": d / "nanvec.safetensors",
        "nan_png": _png_text(d / "nanpng.png", a1111_dict(nan, "nanpng")),
        "stride0": d / "stride0.pt",
        "st_lie": d / "stlie.safetensors",
        "hn_structure": d / "hnbomb.pt",
        "hn_nan": d / "hnnan.pt",
        "huge": d / "overflow.pt",
        "parameterdict": d / "origti.pt",
    }
    torch.save(a1111_dict(nan, "nanvec"), files["nan_pt"])
    from safetensors.torch import save_file

    save_file({"emb_params": nan}, files["nan_safetensors"])
    torch.save({"emb_params": torch.zeros(1).expand(10**9)}, files["stride0"])
    header = json.dumps({"emb_params": {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 16]}}).encode()
    files["st_lie"].write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    hn = Hypernetwork([32], layer_structure=[1, 2, 1])
    io.save_hypernetwork(files["hn_structure"], hn)
    data = torch.load(files["hn_structure"], weights_only=True)
    widths = {1280: data.pop(32), "layer_structure": [1, 4000, 1]}  # KBs of weights declaring 100 GB of modules
    torch.save({**data, **widths}, files["hn_structure"])
    data[32] = widths[1280]
    with torch.no_grad():
        hn.pair(32)[0].linear[0].weight[0, 0] = float("inf")
    torch.save({**data, 32: (hn.pair(32)[0].state_dict(), hn.pair(32)[1].state_dict())}, files["hn_nan"])
    io.save_embedding(files["huge"], torch.full((2, 32), 1e30))  # finite, but overflows any model
    vectors = torch.nn.ParameterDict({"*": torch.nn.Parameter(torch.randn(2, 32))})
    torch.save({"string_to_token": {"*": torch.tensor(265)}, "string_to_param": vectors}, files["parameterdict"])
    return files


@pytest.fixture(scope="session")
def big_hostile(tmp_path_factory, hostile) -> dict[str, Path]:
    """The bombs at full size (seconds to build): a 6 GiB zip bomb (~6 MB), a PNG whose pixels inflate to
    2.4 GB, next to the small hostile files."""
    d = tmp_path_factory.mktemp("big_hostile")
    return {
        **hostile,
        "zip_bomb": _zip_bomb(d / "zipbomb6g.pt", 6 * 2**30),
        "png_bomb": _png_zlib_bomb(d / "pngbomb2g.png", 144 * 2**24),
    }
