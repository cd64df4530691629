"""Slow lane: real SD1.5 / SD2.1-v / SDXL architectures (random weights at the real layer sizes and CLIP
widths), each written as an A1111 single file (LDM layout, fp16 on disk) and as a diffusers folder, trained
for 2 steps by `python train.py` with every method in 32-true and bf16-mixed.

Each run is a subprocess: its peak RSS comes from `os.wait4`, and a probe callback (`FrozenProbe`) inside it
records the dtypes, hashes every frozen weight before and after, and times the steps. Run it with
`python -m pytest -m slow tests/test_real_arch.py -s` (about 25 GB of temporary files; SDXL needs ~14 GB RAM).
"""

import hashlib
import json
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lit_ti.models.backbone import built_in

FAMILIES = {"sd15": "sd1", "sd21": "sd2", "sdxl": "sdxl"}  # shipped config folder -> family
WIDTHS = {"sd15": {"clip_l": 768}, "sd21": {"clip_l": 1024}, "sdxl": {"clip_l": 768, "clip_g": 1280}}
METHODS = ("textual_inversion", "dreamartist", "hypernetwork")
PRECISIONS = ("32-true", "bf16-mixed")
# SDXL: every method at both precisions would be 12 runs of several minutes on 2 cores; these 4 cover each
# method, both layouts and both precisions (32-true SDXL needs ~16 GB of RAM)
SDXL_RUNS = {
    ("single_file", "textual_inversion", "bf16-mixed"),
    ("single_file", "dreamartist", "32-true"),
    ("diffusers", "hypernetwork", "bf16-mixed"),
    ("diffusers", "textual_inversion", "32-true"),
}
MATRIX = [
    (config, layout, method, precision)
    for config in FAMILIES
    for layout in ("single_file", "diffusers")
    for method in METHODS
    for precision in PRECISIONS
    if config != "sdxl" or (layout, method, precision) in SDXL_RUNS
]


# ----------------------------------------------------------------- inside the training process
def _digest(module: torch.nn.Module) -> str:
    h = hashlib.sha1()
    for key, t in module.state_dict().items():
        h.update(key.encode())
        h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


class FrozenProbe(Callback):
    """Writes `out` (JSON): frozen parts' dtypes and whether their weights stayed bit-identical, the trained
    tensors' dtypes and whether each changed, and seconds per step."""

    def __init__(self, out: str) -> None:
        self.out, self.steps, self.t0 = Path(out), [], 0.0

    def on_fit_start(self, trainer, method) -> None:  # after configure_model and the precision plugin
        self.frozen = {
            n: m for n, m in method.named_children() if n in ("unet", "vae", "text_encoder", "text_encoder_2")
        }
        self.before = {n: _digest(m) for n, m in self.frozen.items()}
        self.trained = [p for g in method.param_groups() for p in g["params"]]
        self.start = [p.detach().clone() for p in self.trained]

    def on_train_batch_start(self, *args) -> None:
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        self.steps.append(time.perf_counter() - self.t0)

    def on_fit_end(self, trainer, method) -> None:
        report = {
            "dtypes": {n: sorted({str(p.dtype) for p in m.parameters()}) for n, m in self.frozen.items()},
            "frozen_same": {n: _digest(m) == self.before[n] for n, m in self.frozen.items()},
            "trained_dtypes": sorted({str(p.dtype) for p in self.trained}),
            "trained_changed": [not torch.equal(a, p.detach()) for a, p in zip(self.start, self.trained)],
            "step_s": self.steps,
        }
        self.out.write_text(json.dumps(report))


# ----------------------------------------------------------------- building the models
def random_backbone(config: str, dtype: torch.dtype = torch.float16):
    """The shipped configs' architecture with random weights, built directly in `dtype` (an SDXL UNet is
    10 GB in fp32)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from lit_ti.models import Backbone, clip_tokenizer
    from lit_ti.models.single_file import shipped_config

    folder = shipped_config(FAMILIES[config])
    torch.manual_seed(0)
    with built_in(dtype):
        parts = {
            "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet")),
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae")),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder")),
        }
        if config == "sdxl":
            encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2"))
            parts.update(text_encoder_2=encoder_2, tokenizer_2=clip_tokenizer(pad="!"))
    scheduler = DDPMScheduler.from_pretrained(folder / "scheduler")
    tokenizer = clip_tokenizer(pad="!" if config == "sd21" else "<|endoftext|>")
    return Backbone(tokenizer=tokenizer, scheduler=scheduler, name=config, **parts)


@pytest.fixture(scope="session")
def real_models(tmp_path_factory):
    """{config: (single file, diffusers folder)}, built once per session, one family in memory at a time."""
    from tests.ldm_layout import write_single_file

    made = {}

    def get(config: str) -> tuple[Path, Path]:
        if config not in made:
            root = tmp_path_factory.mktemp(config)
            backbone = random_backbone(config)
            path = write_single_file(backbone, root / f"{config}.safetensors", FAMILIES[config], torch.float16)
            backbone.pipeline().save_pretrained(root / "diffusers")
            del backbone
            made[config] = (path, root / "diffusers")
        return made[config]

    return get


# ----------------------------------------------------------------- one run
def check_files(run: Path, config: str, method: str) -> None:
    """The written files at the real widths, and loadable where others load them."""
    from lit_ti import io

    if method == "hypernetwork":
        hn, _ = io.load_hypernetwork(run / "toy-concept.pt")
        context = sum(WIDTHS[config].values())  # SDXL: 768 + 1280 concatenated
        assert hn.sizes == sorted({context, 320, 640, 1280}), hn.sizes
        return
    for stem in ("toy-concept", "toy-concept-neg") if method == "dreamartist" else ("toy-concept",):
        vectors = io.load_embedding(run / f"{stem}.safetensors")[stem]
        vectors = vectors if isinstance(vectors, dict) else {"clip_l": vectors}
        assert {k: v.shape[1] for k, v in vectors.items()} == WIDTHS[config]
        assert_diffusers_loads(run / f"{stem}.safetensors", stem, config, vectors)


def assert_diffusers_loads(path: Path, token: str, config: str, vectors: dict) -> None:
    """diffusers' `load_textual_inversion` into text encoders of the real widths (one layer each: it checks
    the width against the encoder's embedding table)."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from lit_ti.models import TinyBackbone, clip_tokenizer
    from lit_ti.models.single_file import shipped_config

    folder = shipped_config(FAMILIES[config])
    for key, sub in (("clip_l", "text_encoder"), ("clip_g", "text_encoder_2")):
        if key not in vectors:
            continue
        encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / sub, num_hidden_layers=1))
        tiny = TinyBackbone().load()
        pipe = StableDiffusionPipeline(
            vae=tiny.vae, text_encoder=encoder, tokenizer=clip_tokenizer(), unet=tiny.unet,
            scheduler=tiny.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )  # fmt: skip
        # SD1/SD2 files as they are; SDXL's two parts one encoder at a time (the README's recipe)
        pipe.load_textual_inversion(load_file(path)[key] if config == "sdxl" else str(path), token=token)
        ids = pipe.tokenizer.convert_tokens_to_ids([token] + [f"{token}_{i}" for i in range(1, len(vectors[key]))])
        rows = pipe.text_encoder.get_input_embeddings().weight[ids]
        assert torch.equal(rows, vectors[key].to(rows.dtype))


@pytest.mark.slow
@pytest.mark.parametrize(("config", "layout", "method", "precision"), MATRIX)
def test_real_architecture_trains(real_models, train_measured, tmp_path, config, layout, method, precision):
    path, folder = real_models(config)
    run = tmp_path / "run"
    code, rss = train_measured(
        [
            "~experiment",
            f"method={method}",
            f"model={layout}",
            f"model.path={path if layout == 'single_file' else folder}",
            "data.resolution=64",
            "trainer.max_steps=2",
            f"trainer.precision={precision}",
            "callbacks.preview=null",
            "callbacks.toy_eval=null",
            "callbacks.model_checkpoint=null",
            "~logger",
            "+callbacks.probe._target_=tests.test_real_arch.FrozenProbe",
            f"+callbacks.probe.out={tmp_path / 'probe.json'}",
            f"hydra.run.dir={run}",
        ],
        tmp_path / "train.log",
    )
    assert code == 0, (tmp_path / "train.log").read_text()[-3000:]
    report = json.loads((tmp_path / "probe.json").read_text())
    frozen = "torch.float32" if precision == "32-true" else "torch.bfloat16"
    for part, kinds in report["dtypes"].items():
        assert kinds == ["torch.float32" if part == "vae" else frozen], (part, kinds)
    assert set(report["dtypes"]) == {"unet", "vae", "text_encoder"} | (
        {"text_encoder_2"} if config == "sdxl" else set()
    )
    assert all(report["frozen_same"].values()), report["frozen_same"]
    assert report["trained_dtypes"] == ["torch.float32"] and all(report["trained_changed"])
    check_files(run, config, method)
    row = dict(config=config, layout=layout, method=method, precision=precision, rss_gib=round(rss, 2))
    print("REALARCH", json.dumps({**row, "step_s": [round(s, 2) for s in report["step_s"]]}))
