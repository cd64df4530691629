"""Every backbone loader honours the trainer's precision: frozen UNet and text encoders in its dtype, the VAE
and every trained tensor in fp32, after loading the way training loads it (a real `Trainer.fit`, whose
precision reaches `spec.load(dtype)` through the method's `configure_model`)."""

from functools import partial

import lightning as L
import pytest
import torch

from lit_ti.data import ConceptDataModule
from lit_ti.errors import UserError
from lit_ti.methods import DreamArtist, HypernetworkMethod, TextualInversion
from lit_ti.models import DiffusersFolder, SingleFile, TinyBackbone, weight_dtype
from lit_ti.train import _asset
from tests.conftest import make_concept_dir
from tests.ldm_layout import write_single_file

# what each precision the trainer accepts on CPU must run the frozen UNet/text encoders in; Lightning runs
# 16-mixed as bf16-mixed on CPU (fp16 autocast is GPU-only), test_gpu covers fp16
EXPECTED = {"32-true": torch.float32, "bf16-mixed": torch.bfloat16, "16-mixed": torch.bfloat16}
LOADERS = ["tiny", "toy", "diffusers-sd1", "diffusers-sdxl", "single-sd1", "single-sd2", "single-sdxl"]


@pytest.fixture(scope="module")
def specs(tmp_path_factory) -> dict:
    """One spec per loader and family: tiny random models written as diffusers folders and as
    original-layout (A1111) single files stored in fp16, as most user files are."""
    root = tmp_path_factory.mktemp("loaders")
    out = {"tiny": TinyBackbone(), "toy": DiffusersFolder(_asset("toy_base"))}
    for family, size in (("sd1", "tiny"), ("sd2", "sd2_tiny"), ("sdxl", "sdxl_tiny")):
        backbone = TinyBackbone(size=size, seed=1).load()
        folder = root / family
        backbone.pipeline().save_pretrained(folder)
        path = write_single_file(backbone, root / f"{family}.safetensors", family=family, dtype=torch.float16)
        out[f"single-{family}"] = SingleFile(str(path), config=str(folder))
        if family != "sd2":
            out[f"diffusers-{family}"] = DiffusersFolder(str(folder))
    return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_concept_dir(tmp_path_factory.mktemp("concept"), n=1)


def fit_one_step(spec, precision: str, data_dir, method_cls=TextualInversion, **method_kw):
    """One optimizer step through Lightning, as `train.py` runs it (no callbacks, no logger)."""
    L.seed_everything(0, verbose=False)
    method = method_cls(spec, name="zz-thing", optimizer=partial(torch.optim.AdamW, lr=0.05), **method_kw)
    dm = ConceptDataModule(dir=str(data_dir), name="zz-thing", template="subject", resolution=64)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(method, datamodule=dm)
    assert trainer.global_step == 1
    return method


def dtypes(module: torch.nn.Module) -> set[torch.dtype]:
    return {p.dtype for p in module.parameters()}


def trained(method) -> dict[str, torch.Tensor]:
    """The tensors the optimizer updates (embedding vectors, hypernetwork weights)."""
    return {f"{i}.{j}": p for i, g in enumerate(method.param_groups()) for j, p in enumerate(g["params"])}


def assert_precision_layout(method, precision: str) -> None:
    frozen = EXPECTED[precision]
    assert dtypes(method.unet) == {frozen}, "unet"
    for key, (_, encoder) in method.backbone.text_encoders.items():
        assert dtypes(encoder) == {frozen}, key
    assert dtypes(method.vae) == {torch.float32}, "the VAE must stay fp32"
    assert method.unet_dtype == frozen
    assert {p.dtype for p in trained(method).values()} == {torch.float32}, "trained tensors must stay fp32"


@pytest.mark.parametrize("loader", LOADERS)
def test_every_loader_runs_frozen_parts_in_bf16_under_bf16_mixed(specs, data_dir, loader):
    assert_precision_layout(fit_one_step(specs[loader], "bf16-mixed", data_dir), "bf16-mixed")


@pytest.mark.parametrize("precision", list(EXPECTED))
def test_each_cpu_precision_reaches_the_loader(specs, data_dir, precision):
    assert_precision_layout(fit_one_step(specs["single-sd1"], precision, data_dir), precision)


@pytest.mark.parametrize("method_cls", [HypernetworkMethod, DreamArtist])
def test_every_method_keeps_its_trained_tensors_fp32(specs, data_dir, method_cls):
    assert_precision_layout(fit_one_step(specs["tiny"], "bf16-mixed", data_dir, method_cls), "bf16-mixed")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loader", LOADERS)
def test_every_loader_honours_the_dtype_it_is_given(specs, loader, dtype):
    """`load(dtype)` itself, for fp16 too (GPU runs reach it; a CPU trainer cannot)."""
    backbone = specs[loader].load(dtype)
    for key, (_, encoder) in backbone.text_encoders.items():
        assert dtypes(encoder) == {dtype}, key
    assert dtypes(backbone.unet) == {dtype} and dtypes(backbone.vae) == {torch.float32}


@pytest.mark.parametrize("precision", ["bf16-true", "16-true", "64-true"])
def test_true_half_or_double_precision_is_refused(precision):
    """Lightning's `*-true` precisions cast the whole module, trained vectors and VAE included."""
    with pytest.raises(UserError, match=f"trainer.precision={precision}"):
        weight_dtype(precision)
