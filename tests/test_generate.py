"""`python generate.py`: trained files change the images; PNGs carry A1111's parameters."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from lit_ti import io
from lit_ti.modules.hypernetwork import Hypernetwork
from tests.conftest import CONFIGS

TOY = CONFIGS.parent / "src" / "lit_ti" / "assets" / "toy_base"


@pytest.fixture(scope="module")
def trained_files(tmp_path_factory):
    """A random embedding pair and hypernetwork at the toy base's widths (what generation needs)."""
    from lit_ti.models import DiffusersFolder

    folder = tmp_path_factory.mktemp("files")
    bb = DiffusersFolder(str(TOY)).load()
    width = bb.text_encoder.get_input_embeddings().weight.shape[1]
    g = torch.Generator().manual_seed(0)
    io.save_embedding(folder / "emb" / "zz-star.pt", torch.randn(2, width, generator=g), step=10)
    io.save_embedding(folder / "emb" / "zz-star-neg.safetensors", torch.randn(3, width, generator=g))
    Image.new("RGB", (16, 16)).save(folder / "emb" / "a-picture.png")  # a plain image is skipped
    unet = bb.unet
    hn = Hypernetwork(
        sorted({unet.config.cross_attention_dim, *unet.config.block_out_channels}), weight_init="XavierNormal"
    )
    io.save_hypernetwork(folder / "style.pt", hn, name="style")
    return folder


def test_embeddings_pair_and_hypernetwork_change_the_images(tmp_path, capsys, trained_files, generate, pixels):
    plain = generate("prompt='a zz-star'", "batch_size=2")
    with_pair = generate(
        "prompt='a zz-star'",
        "negative_prompt=zz-star-neg",
        f"embeddings_dir={trained_files / 'emb'}",
        "batch_size=2",
    )
    styled = generate(
        "prompt='a zz-star'",
        f"hypernetwork={trained_files / 'style.pt'}",
        "hypernetwork_strength=0.8",
        "batch_size=2",
    )
    again = generate("prompt='a zz-star'", "batch_size=2")
    assert np.array_equal(pixels(plain), pixels(again))  # same seed, same images
    assert np.abs(pixels(with_pair) - pixels(plain)).mean() > 1  # the embeddings changed them
    assert np.abs(pixels(styled) - pixels(plain)).mean() > 1  # the hypernetwork changed them
    used = [line for line in capsys.readouterr().out.splitlines() if "concepts used" in line]
    assert len(used) == 1 and used[0].endswith("concepts used: zz-star-neg, zz-star")
    text = styled[1].text["parameters"]
    assert text.startswith("a zz-star\nSteps: 4, Sampler: Euler a, CFG scale: 7.0, Seed: 6, Size: 64x64")
    assert "Hypernet: style, Hypernet strength: 0.8" in text
    assert (tmp_path / "out0" / "grid.png").is_file()


def script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "generate.py", *args], cwd=CONFIGS.parent, capture_output=True, text=True, timeout=300
    )


def test_command_line_and_its_mistakes(tmp_path, trained_files):
    run = script(
        "prompt=a zz-star", "steps=2", "seed=1", f"embeddings_dir={trained_files / 'emb'}", f"hydra.run.dir={tmp_path}"
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert Image.open(tmp_path / "00000-1.png").text["parameters"].startswith("a zz-star\nSteps: 2")
    bad = script("embeddings_dir=/no/such/folder", f"hydra.run.dir={tmp_path / 'bad'}")
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error: ")]
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert len(errors) == 1 and "embeddings_dir" in errors[0]


def test_embedding_from_another_model_warns_and_wrong_width_is_skipped(tmp_path, trained_files, generate):
    import shutil

    folder = tmp_path / "emb"
    shutil.copytree(trained_files / "emb", folder)
    width = io.load_embedding(folder / "zz-star.pt")["zz-star"].shape[1]
    io.save_embedding(
        folder / "zz-other.pt", torch.zeros(1, width), sd_checkpoint="deadbeef", sd_checkpoint_name="sd15"
    )
    io.save_embedding(folder / "zz-wide.pt", torch.zeros(1, width + 1))
    with pytest.warns(UserWarning, match="zz-") as caught:
        generate("prompt='a zz-other zz-wide'", f"embeddings_dir={folder}", "steps=1")
    messages = [str(w.message) for w in caught]
    assert any("'zz-other' was trained on deadbeef" in m for m in messages)
    assert any("skipped 'zz-wide'" in m and f"widths [{width}]" in m for m in messages)
