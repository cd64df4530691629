import pytest
import torch

from lit_ti.errors import UserError
from lit_ti.models import DiffusersFolder, TinyBackbone, weight_dtype


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    """The tiny backbone saved in diffusers layout, as a user's local SD folder would be."""
    pipe = TinyBackbone(seed=3).load().pipeline()
    folder = tmp_path_factory.mktemp("sd") / "my-model"
    pipe.save_pretrained(folder)
    return folder


def test_diffusers_folder_loads_frozen_and_equal(sd_folder):
    ref = TinyBackbone(seed=3).load()
    bb = DiffusersFolder(str(sd_folder)).load()
    assert len(bb.tokenizer) == 49408 and bb.tokenizer.model_max_length == 77
    assert bb.name == "my-model" and bb.prediction_type == "epsilon" and bb.resolution == 64
    for part in ("unet", "vae", "text_encoder"):
        mine, theirs = getattr(bb, part).state_dict(), getattr(ref, part).state_dict()
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
        assert not any(p.requires_grad for p in getattr(bb, part).parameters())
        assert not getattr(bb, part).training


def test_dtype_follows_precision_and_vae_stays_fp32(sd_folder):
    bb = DiffusersFolder(str(sd_folder), prediction_type="v_prediction").load(weight_dtype("bf16-mixed"))
    assert bb.unet.dtype == bb.text_encoder.dtype == torch.bfloat16
    assert bb.vae.dtype == torch.float32
    assert bb.prediction_type == "v_prediction"
    assert weight_dtype("16-mixed") == torch.float16 and weight_dtype("32-true") == torch.float32


def test_missing_or_incomplete_folders_are_user_errors(sd_folder, tmp_path):
    with pytest.raises(UserError, match="model.path: .* is not a folder"):
        DiffusersFolder(str(tmp_path / "nowhere")).load()
    partial = tmp_path / "partial"
    (partial / "unet").mkdir(parents=True)
    with pytest.raises(UserError, match="lacks vae/, text_encoder/, tokenizer/, scheduler/"):
        DiffusersFolder(str(partial)).load()
    broken = tmp_path / "broken"
    broken.mkdir()
    for sub in ("unet", "vae", "text_encoder", "scheduler"):
        (broken / sub).symlink_to(sd_folder / sub)
    (broken / "tokenizer").mkdir()  # no vocabulary files: transformers would hand back a 2-token tokenizer
    with pytest.raises(UserError, match="tokenizer"):
        DiffusersFolder(str(broken)).load()
    with pytest.raises(UserError, match="model.prediction_type"):
        DiffusersFolder(str(sd_folder), prediction_type="sample").load()


def test_tiny_backbone_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = TinyBackbone(seed=1).load()
    assert torch.equal(torch.rand(3), expected)
    b, c = TinyBackbone(seed=1).load(), TinyBackbone(seed=2).load()
    w = "conv_in.weight"
    assert torch.equal(a.unet.state_dict()[w], b.unet.state_dict()[w])
    assert not torch.equal(a.unet.state_dict()[w], c.unet.state_dict()[w])
    with pytest.raises(UserError, match="model.size"):
        TinyBackbone(size="huge").load()
