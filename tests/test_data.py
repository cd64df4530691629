import random

import numpy as np
import pytest
import torch
from PIL import Image

from lit_ti.data import ConceptDataModule
from lit_ti.data.images import caption, list_images, load_image
from lit_ti.data.templates import SHIPPED, fill, load_templates
from lit_ti.errors import UserError


# --- filewords ------------------------------------------------------------------------------------------------
def test_sidecar_txt_wins(tmp_path):
    img = tmp_path / "00012-0-a red car.png"
    assert caption(img) == "a red car"  # leading digits/dashes and the space after them are dropped
    (tmp_path / "00012-0-a red car.txt").write_text("  sidecar caption, tags\n", encoding="utf-8")
    assert caption(img) == "sidecar caption, tags"


def test_word_regex_and_join(tmp_path):
    img = tmp_path / "001-red_car-on_road.png"
    assert caption(img, word_regex=r"[a-z]+", join=", ") == "red, car, on, road"
    assert caption(tmp_path / "a.b.png") == "a.b"


def test_stem_of_only_digits_is_empty(tmp_path):
    assert caption(tmp_path / "0001.png") == ""


# --- images -------------------------------------------------------------------------------------------------
def test_image_modes_become_upright_rgb(tmp_path):
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(tmp_path / "rgba.png")  # fully transparent red
    Image.new("P", (8, 8), 3).save(tmp_path / "palette.png")
    Image.new("L", (8, 8), 77).save(tmp_path / "grey.png")
    Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)).save(tmp_path / "deep.png")  # 16-bit
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    for name in ("rgba", "palette", "grey", "deep"):
        assert load_image(tmp_path / f"{name}.png").mode == "RGB"
    assert load_image(tmp_path / "rgba.png").getpixel((0, 0)) == (255, 255, 255)  # composited over white
    assert load_image(tmp_path / "grey.png").getpixel((0, 0)) == (77, 77, 77)
    assert load_image(tmp_path / "deep.png").getpixel((0, 0)) == (255, 255, 255)
    assert load_image(tmp_path / "cmyk.jpg").getpixel((0, 0))[0] > 200


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (20, 10), (0, 0, 0))
    im.paste((255, 255, 255), (0, 0, 10, 10))  # white on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    im.save(tmp_path / "rot.jpg", exif=exif)
    upright = load_image(tmp_path / "rot.jpg")
    assert upright.size == (10, 20)
    assert upright.getpixel((5, 2))[0] > 200 and upright.getpixel((5, 17))[0] < 50  # white now on top


def test_non_images_are_skipped_with_one_warning(concept_dir):
    (concept_dir / "notes.md").write_text("hello")
    (concept_dir / "broken.png").write_bytes(b"not a png")
    with pytest.warns(UserWarning, match=r"skipped 2 file\(s\).*broken.png.*notes.md"):
        paths = list_images(concept_dir)
    assert len(paths) == 4 and all(p.suffix == ".png" for p in paths)


def test_empty_or_missing_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="data.dir"):
        list_images(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images"):
        list_images(tmp_path / "empty")


# --- templates ----------------------------------------------------------------------------------------------
def test_shipped_templates():
    sizes = {name: len(load_templates(name)) for name in SHIPPED}
    assert sizes == {
        "subject": 27,
        "subject_filewords": 27,
        "style": 19,
        "style_filewords": 19,
        "hypernetwork": 27,
        "none": 1,
        "toy": 9,
        "toy_captions": 2,
        "filewords": 1,
    }
    assert all("[name]" in line for line in load_templates("subject"))
    assert all("[filewords]" in line and "[name]" in line for line in load_templates("style_filewords"))


def test_template_from_file_and_errors(tmp_path):
    (tmp_path / "t.txt").write_text("\n  a [name] photo  \n\n", encoding="utf-8")
    assert load_templates(str(tmp_path / "t.txt")) == ["a [name] photo"]
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(UserError, match="no prompt lines"):
        load_templates(str(tmp_path / "empty.txt"))
    with pytest.raises(UserError, match="neither a shipped template"):
        load_templates("nonexistent_template")


def test_fill_filewords_then_name():
    rng = random.Random(0)
    assert fill("a [name], [filewords]", "zz", "red, big", rng) == "a zz, red, big"
    dropped = fill("[filewords]", "zz", "a,b,c,d,e,f,g,h", rng, dropout=0.5)
    assert 0 < len(dropped.split(",")) < 8
    shuffled = fill("[filewords]", "zz", "a,b,c,d,e,f,g,h", rng, shuffle=True)
    assert sorted(shuffled.split(",")) == list("abcdefgh") and shuffled != "a,b,c,d,e,f,g,h"


# --- the datamodule -----------------------------------------------------------------------------------------
def fake_encoder(pixels):
    """Stand-in VAE: 8x8 average pooling; std = 1 so sampling modes are visible."""
    mean = torch.nn.functional.avg_pool2d(pixels, 8)[:, :3].repeat(1, 2, 1, 1)[:, :4]
    return mean, torch.ones_like(mean)


def test_latents_are_cached_once_and_prompts_filled(concept_dir):
    dm = ConceptDataModule(dir=str(concept_dir), name="zz-thing", template="subject_filewords")
    dm.cache_latents(fake_encoder, resolution=32)
    mean, std = dm.latents
    assert mean.shape == (4, 1, 4, 4, 4)  # [N, views, C, h, w]
    assert torch.equal(std, torch.zeros_like(std))  # "once": the sample is frozen
    batch = next(iter(dm.train_dataloader()))
    assert batch["latents"].shape == (1, 4, 4, 4)
    assert "zz-thing" in batch["prompt"][0] and batch["caption"][0] in batch["prompt"][0]


def test_latent_sampling_modes_and_flip(concept_dir):
    once = ConceptDataModule(dir=str(concept_dir), name="zz", latent_sampling="once", seed=1)
    det = ConceptDataModule(dir=str(concept_dir), name="zz", latent_sampling="deterministic", flip_p=0.5)
    rnd = ConceptDataModule(dir=str(concept_dir), name="zz", latent_sampling="random")
    for dm in (once, det, rnd):
        dm.cache_latents(fake_encoder, resolution=32)
    assert det.latents[0].shape[1] == 2  # plain + mirrored views
    assert torch.allclose(det.latents[0][:, 1], det.latents[0][:, 0].flip(-1), atol=1e-6)
    assert not torch.allclose(once.latents[0], det.latents[0][:, :1])  # once = mean + std * noise
    ds = rnd.train_dataloader().dataset
    assert not torch.equal(ds[0, 1]["latents"], ds[0, 2]["latents"])  # random: a new sample each time it is seen
    assert torch.equal(ds[0, 1]["latents"], ds[0, 1]["latents"])  # ... fixed by the sample's seed


def test_filewords_template_without_captions_is_a_user_error(tmp_path):
    for i in range(2):
        Image.new("RGB", (16, 16)).save(tmp_path / f"{i:04d}.png")
    dm = ConceptDataModule(dir=str(tmp_path), name="zz", template="style_filewords")
    with pytest.raises(UserError, match=r"\[filewords\]"):
        dm.setup("fit")


def test_bad_settings_name_their_key(concept_dir):
    with pytest.raises(UserError, match="data.latent_sampling"):
        ConceptDataModule(dir=str(concept_dir), name="zz", latent_sampling="sometimes")
    with pytest.raises(UserError, match="data.crop"):
        ConceptDataModule(dir=str(concept_dir), name="zz", crop="zoom")


# --- kohya's keep_tokens, caption encodings, safe messages, bounds --------------------------------------------
def test_keep_tokens_stay_in_place_and_are_never_dropped():
    caption = "zz person,red hair,smile,outdoors,hat,night,blue eyes,coat"
    for seed in range(50):
        out = fill("[filewords]", "zz", caption, random.Random(seed), shuffle=True, dropout=0.3, keep=2)
        tags = out.split(",")
        assert tags[:2] == ["zz person", "red hair"] and set(tags[2:]) <= set(caption.split(",")[2:])
    shuffled = {fill("[filewords]", "zz", caption, random.Random(s), shuffle=True, keep=2) for s in range(20)}
    assert len(shuffled) > 1  # the rest is still shuffled


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be"])
def test_captions_decode_in_every_unicode_encoding(tmp_path, encoding):
    (tmp_path / "a.txt").write_text("café, crème brûlée, 日本\n", encoding=encoding)
    assert caption(tmp_path / "a.png") == "café, crème brûlée, 日本"


def test_special_files_and_subfolders_are_never_opened(tmp_path):
    import os

    make_image = Image.new("RGB", (16, 16))
    make_image.save(tmp_path / "a.png")
    os.mkfifo(tmp_path / "b.png")  # opening it for reading would block forever
    os.mkfifo(tmp_path / "a.txt")  # nor is a FIFO read as a caption
    (tmp_path / "sub").mkdir()
    with pytest.warns(UserWarning, match="data.dir") as record:
        assert list_images(tmp_path) == [tmp_path / "a.png"]
    messages = [str(r.message) for r in record]
    assert any("b.png (a FIFO; not opened)" in m for m in messages)
    assert any("subfolder(s) not searched: sub" in m for m in messages)
    assert caption(tmp_path / "a.png") == "a"


def test_multi_frame_images_use_the_first_frame(tmp_path):
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    with pytest.warns(UserWarning, match=r"first frame of a.gif \(2 frames\)"):
        list_images(tmp_path)
    assert load_image(tmp_path / "a.gif").getpixel((0, 0)) == (255, 0, 0)


def test_user_text_in_messages_is_escaped_and_bounded():
    from lit_ti.data.images import quote

    assert quote("a\x1b[31mb\nc\u202ed") == "a\\x1b[31mb\\nc\\u202ed"  # ANSI, newline, bidi override
    assert len(quote("x" * 10_000)) == 120


def test_samples_per_epoch_are_bounded(concept_dir):
    from lit_ti.data.settings import check_samples

    check_samples(1000, 10_000)
    with pytest.raises(UserError, match=r"data.repeats=10000: 1001 images"):
        check_samples(1001, 10_000)
    with pytest.raises(UserError, match="data.repeats=10001"):
        ConceptDataModule(dir=str(concept_dir), name="zz", repeats=10_001)
