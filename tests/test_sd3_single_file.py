"""SD3 / SD3.5 single files (A1111 / ComfyUI layout): the shipped configs are the published models, every
weight arrives unchanged whether the text encoders are inside the file or separate files, the prompt is
encoded as from the diffusers folder, a run records the file's hash, and bad inputs are one line."""

import hashlib
import logging

import pytest
import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from lit_ti import io
from lit_ti.errors import UserError
from lit_ti.models import SD3Folder, SD3SingleFile, SingleFile
from lit_ti.models.sd3_single_file import SHIPPED
from lit_ti.models.single_file import shipped_folder
from lit_ti.modules.embedding_bank import EmbeddingBank
from lit_ti.modules.text_conditioning import PromptEncoder
from tests.conftest import make_concept_dir
from tests.ldm_layout import sd3_transformer_state

# parameter counts of the shipped configs built on the meta device; the MMDiTs are the models Stability calls
# 2 B (SD3 medium), 2.5 B (SD3.5 medium: 2.24 B in the diffusers MMDiT) and 8.1 B (SD3.5 large)
ENCODERS = {"text_encoder": 123_650_304, "text_encoder_2": 694_659_840, "text_encoder_3": 4_762_310_656}
PUBLISHED = {
    "sd3_medium": {"transformer": 2_028_328_000, "vae": 83_819_683, **ENCODERS},
    "sd35_medium": {"transformer": 2_243_171_520, "vae": 83_819_683, **ENCODERS},
    "sd35_large": {"transformer": 8_056_627_520, "vae": 83_819_683, **ENCODERS},
}
PROMPTS = ["a photo of toy-concept in a room", "toy-concept, painting by an artist", "a plain background"]
ALL = ("clip_l", "clip_g", "t5")


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_shipped_sd3_configs_build_the_published_models(name):
    folder = shipped_folder(name)
    with torch.device("meta"):
        parts = {
            "transformer": SD3Transformer2DModel.from_config(SD3Transformer2DModel.load_config(folder / "transformer")),
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae")),
            "text_encoder": CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder")),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2")),
            "text_encoder_3": T5EncoderModel(T5Config.from_pretrained(folder / "text_encoder_3")),
        }
        # the file of each model (every MMDiT weight under its original name) is recognised as that model
        checkpoint = sd3_transformer_state(parts["transformer"])
    assert {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items()} == PUBLISHED[name]
    assert SD3SingleFile("unused").config_folder(checkpoint, folder) == folder
    assert SHIPPED[{"sd3_medium": "sd3"}.get(name, name)] == name


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def conditioning(backbone) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    bank = EmbeddingBank()
    widths = {k: enc.get_input_embeddings().weight.shape[1] for k, (_, enc) in backbone.text_encoders.items()}
    bank.add("toy-concept", {k: torch.randn(2, w, generator=g) for k, w in sorted(widths.items())})
    with torch.no_grad():
        out = PromptEncoder(backbone, bank)(PROMPTS)
    return out.states, out.pooled


CASES = {  # id -> (tiny size, encoders inside the file, encoders given as files, T5 tokenizer given)
    "sd3-all-inside": ("sd3_tiny", ALL, (), True),
    "sd35-all-inside": ("sd35_tiny", ALL, (), True),
    "comfyui-files": ("sd3_tiny", (), ALL, True),
    "clips-inside-no-t5": ("sd3_tiny", ("clip_l", "clip_g"), (), False),
    "t5-inside-no-tokenizer": ("sd3_tiny", ALL, (), False),
}


@pytest.mark.parametrize("case", CASES)
def test_sd3_single_file_loads_every_weight_and_encodes_as_the_folder(case, sd3_single_file, caplog):
    size, inside, separate, tokenizer = CASES[case]
    original, files = sd3_single_file(size, inside)
    kw = {key: str(files[key]) for key in separate}
    with caplog.at_level(logging.INFO):
        loaded = SD3SingleFile(
            str(files["path"]),
            config=str(files["config"]),
            t5_tokenizer=str(files["t5_tokenizer"]) if tokenizer else None,
            **kw,
        ).load()
    with_t5 = tokenizer
    assert loaded.is_sd3 and (loaded.text_encoder_3 is not None) == with_t5
    assert ("running without T5" in caplog.text) == (not with_t5)  # said in one line
    for part in ("unet", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        if getattr(loaded, part) is not None:
            assert same_weights(getattr(loaded, part), getattr(original, part)), part
    assert loaded.checkpoint_hash == hashlib.sha256(files["path"].read_bytes()).hexdigest()[:10]
    assert loaded.name == "model"
    folder = SD3Folder(str(files["config"]), t5=with_t5).load()
    for got, want in zip(conditioning(loaded), conditioning(folder), strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_training_on_an_sd3_single_file_records_its_hash(sd3_single_file, tmp_path, entry):
    _, files = sd3_single_file("sd3_tiny", ("clip_l", "clip_g"))
    outcome = entry.train(
        "model=sd3_single_file",
        f"model.path={files['path']}",
        f"model.config={files['config']}",
        f"model.t5={files['t5']}",
        f"model.t5_tokenizer={files['t5_tokenizer']}",
        "method.encoders=[clip_l,clip_g,t5]",
        "data=concept",
        f"data.dir={make_concept_dir(tmp_path / 'data')}",
        "name=zz-concept",
        "trainer.max_steps=2",
        "callbacks.preview=null",
        "callbacks.toy_eval=null",
        "callbacks.model_checkpoint=null",
    )
    assert outcome.code == 0, outcome.stderr[-3000:]
    entry_ = io.read_embedding(outcome.out / "zz-concept.safetensors")[0]
    assert (entry_.sd_checkpoint, entry_.sd_checkpoint_name) == (
        hashlib.sha256(files["path"].read_bytes()).hexdigest()[:10],
        "model",
    )
    assert {k: v.shape[1] for k, v in entry_.vectors.items()} == {"clip_l": 32, "clip_g": 48, "t5xxl": 96}


def test_bad_sd3_single_file_inputs_are_one_line_naming_the_key(sd3_single_file, tmp_path, entry):
    _, files = sd3_single_file("sd3_tiny", ())  # no encoders inside
    config = str(files["config"])

    def refused(key_pattern: str, **kw):
        with pytest.raises(UserError, match=key_pattern):
            SD3SingleFile(str(kw.pop("path", files["path"])), config=kw.pop("config", config), **kw).load()

    clip_l, clip_g, t5 = (str(files[k]) for k in ALL)
    refused(r"^model.clip_l: .* holds no CLIP-L text encoder; give its file")
    refused(r"^model.clip_g: .* holds no CLIP-G", clip_l=clip_l)
    refused(
        r"^model.clip_g: .*missing.safetensors is not a file",
        clip_l=clip_l,
        clip_g=str(tmp_path / "missing.safetensors"),
    )
    refused(r"^model.t5: .* is not a T5-XXL text encoder", clip_l=clip_l, clip_g=clip_g, t5=clip_g)
    refused(r"^model.clip_g: .* is not a CLIP-G text encoder", clip_l=clip_l, clip_g=t5)
    refused(r"^model.t5_tokenizer: T5 from model.t5 needs its tokenizer", clip_l=clip_l, clip_g=clip_g, t5=t5)
    refused(
        r"^model.t5_tokenizer: .* holds no T5 tokenizer",
        clip_l=clip_l,
        clip_g=clip_g,
        t5=t5,
        t5_tokenizer=str(tmp_path),
    )
    refused(r"^model.path: .* is not an SD3/SD3.5 checkpoint .* model=single_file", path=files["clip_l"])
    # a config of another MMDiT: the difference in one line, not diffusers' shape error deep inside
    refused(
        r"^model.config: .* describes another MMDiT .*num_layers 2 \(config: 24\)",
        config=str(shipped_folder("sd3_medium")),
        clip_l=clip_l,
        clip_g=clip_g,
    )
    # no config given and a size none of the shipped ones has
    refused(
        r"^model.config: .* an SD3-layout MMDiT of 2 blocks that matches none",
        config=None,
        clip_l=clip_l,
        clip_g=clip_g,
    )
    # model=single_file points SD3 files here
    with pytest.raises(UserError, match=r"is a single file of SD3/SD3.5; load it with model=sd3_single_file"):
        SingleFile(str(files["path"])).load()
    # through the command line: one `error:` line, exit 2
    outcome = entry.train(
        "model=sd3_single_file",
        f"model.path={files['path']}",
        f"model.config={config}",
        "name=zz-concept",
        "data=concept",
        f"data.dir={make_concept_dir(tmp_path / 'data')}",
        "trainer.max_steps=1",
    )
    assert outcome.code == 2 and len(outcome.errors) == 1 and outcome.errors[0].startswith("error: model.clip_l: "), (
        outcome.stderr[-2000:]
    )


def test_a_damaged_or_foreign_encoder_file_is_named(sd3_single_file, tmp_path):
    _, files = sd3_single_file("sd3_tiny", ())
    broken = tmp_path / "clip_l.safetensors"
    broken.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(UserError, match=r"^model.clip_l: .* is not a readable checkpoint"):
        SD3SingleFile(str(files["path"]), config=str(files["config"]), clip_l=str(broken)).load()
    # the same encoder under the prefix variants ComfyUI users meet: `transformer.text_model.*`, no `text_model.`
    clip_l = load_file(files["clip_l"])
    for name, state in {
        "prefixed": {f"transformer.{k}": v for k, v in clip_l.items()},
        "flat": {k.removeprefix("text_model."): v for k, v in clip_l.items()},
    }.items():
        save_file(state, tmp_path / f"{name}.safetensors")
        loaded = SD3SingleFile(
            str(files["path"]),
            config=str(files["config"]),
            clip_l=str(tmp_path / f"{name}.safetensors"),
            clip_g=str(files["clip_g"]),
            t5=False,
        ).load()
        assert torch.equal(
            loaded.text_encoder.text_model.embeddings.position_embedding.weight,
            clip_l["text_model.embeddings.position_embedding.weight"],
        )
