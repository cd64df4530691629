"""Single-file (A1111-layout) checkpoints: offline loading, the short hash in every embedding, shipped configs."""

import hashlib
import os

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from lit_ti import io
from lit_ti.errors import UserError
from lit_ti.models import SingleFile, TinyBackbone
from lit_ti.models.single_file import shipped_config
from tests.conftest import make_concept_dir
from tests.ldm_layout import write_single_file

PUBLISHED = {  # parameter counts of the real models
    "sd15": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "sd21": {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840},
    "sdxl": {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840},
}


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_shipped_configs_build_the_published_models(family):
    folder = shipped_config(family)
    counts = {}
    with torch.device("meta"):
        counts["unet"] = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        counts["vae"] = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        counts["text_encoder"] = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
        if family == "sdxl":
            config = CLIPTextConfig.from_pretrained(folder / "text_encoder_2")
            counts["text_encoder_2"] = CLIPTextModelWithProjection(config)
    counts = {k: sum(p.numel() for p in m.parameters()) for k, m in counts.items()}
    assert counts == PUBLISHED[folder.name]


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].float(), sb[k].float()) for k in sa)


@pytest.fixture(scope="module", params=["tiny", "sdxl_tiny"])
def single_file(request, tmp_path_factory):
    """(original backbone, checkpoint path, config folder) for an SD1-shaped and an SDXL-shaped model."""
    folder = tmp_path_factory.mktemp(request.param)
    original = TinyBackbone(size=request.param).load()
    original.pipeline().save_pretrained(folder / "config")  # the configs a user would point model.config at
    return original, write_single_file(original, folder / "my-model.safetensors"), folder / "config"


def test_single_file_loads_every_weight_offline(single_file, monkeypatch):
    original, path, config = single_file
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = SingleFile(str(path), config=str(config)).load()
    assert loaded.is_sdxl == original.is_sdxl
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if getattr(original, part) is not None:
            assert same_weights(getattr(loaded, part), getattr(original, part)), part
    assert loaded.checkpoint_hash == hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    assert loaded.name == "my-model"
    assert loaded.scheduler.config.prediction_type == "epsilon"


@pytest.mark.parametrize("single_file", ["tiny"], indirect=True)  # SDXL training is tested in test_sdxl
def test_training_on_a_single_file_records_its_hash(single_file, tmp_path, cli):
    original, path, config = single_file
    run = cli.train(
        "model=single_file",
        f"model.path={path}",
        f"model.config={config}",
        "data=concept",
        f"data.dir={make_concept_dir(tmp_path / 'data')}",
        "name=zz-concept",
        "trainer.max_steps=2",
        "callbacks.preview=null",
        "callbacks.toy_eval=null",
        "callbacks.model_checkpoint=null",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    expected = hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    if not original.is_sdxl:
        data = torch.load(tmp_path / "run" / "zz-concept.pt", weights_only=True)
        assert (data["sd_checkpoint"], data["sd_checkpoint_name"]) == (expected, "my-model")
    entry = io.read_embedding(tmp_path / "run" / "zz-concept.safetensors")[0]
    assert (entry.sd_checkpoint, entry.sd_checkpoint_name) == (expected, "my-model")


def test_a_file_that_is_no_sd_checkpoint_is_named(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(UserError, match=r"model.path: .*lora.safetensors is not an SD1.x/SD2.x/SDXL checkpoint"):
        SingleFile(str(path)).load()
    for key, message in [
        ("joint_blocks.0.x_block.attn.qkv.weight", "is a single file of SD3/SD3.5; load it with model=sd3_single_file"),
        ("double_blocks.0.img_attn.qkv.weight", "is a Flux single file, which lit_ti does not read"),
    ]:
        save_file({f"model.diffusion_model.{key}": torch.zeros(2, 2)}, tmp_path / "other.safetensors")
        with pytest.raises(UserError, match=message):
            SingleFile(str(tmp_path / "other.safetensors")).load()
    with pytest.raises(UserError, match="is not a file"):
        SingleFile(str(tmp_path / "missing.safetensors")).load()
    (tmp_path / "broken.safetensors").write_bytes(os.urandom(64))
    with pytest.raises(UserError, match="not a readable safetensors file"):
        SingleFile(str(tmp_path / "broken.safetensors")).load()
