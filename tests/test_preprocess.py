"""`python preprocess.py`: a messy folder becomes a clean training folder, and the source stays untouched."""

import hashlib
import io as _io
import re

import numpy as np
import pytest
from PIL import Image

from lit_ti.captioning import format_tags
from tests.conftest import CONFIGS, make_tagger


def preprocess(*overrides: str) -> dict:
    from hydra import compose, initialize_config_dir

    from lit_ti.preprocess import run

    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIGS)):
        return run(compose("preprocess", overrides=["progress=false", *overrides]))


def messy_folder(src):
    src.mkdir()
    wide = Image.new("RGB", (400, 100), (20, 20, 200))
    wide.paste((250, 250, 250), (300, 20, 360, 80))
    wide.save(src / "wide.png")  # 4:1, split into tiles
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (120, 80), (200, 30, 30)).save(src / "rotated.jpg", exif=exif.tobytes())
    Image.new("RGBA", (90, 90), (0, 200, 0, 120)).save(src / "alpha.png")
    Image.new("P", (70, 70), 3).save(src / "palette.png")
    Image.new("I;16", (80, 80), 30000).save(src / "deep.png")
    (src / "alpha.txt").write_text("a green square, translucent\n")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (src / "empty.jpg").write_bytes(b"")
    (src / "notes.md").write_text("# not an image\n")
    return src


def digest(folder) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_messy_folder_becomes_a_clean_training_folder(tmp_path):
    src = messy_folder(tmp_path / "raw")
    before = digest(src)
    dst = tmp_path / "clean"
    result = preprocess(f"src={src}", f"dst={dst}", "width=64", "split=true", "crop=focal", "flip=horizontal")
    assert digest(src) == before  # the source is only read
    pngs = sorted(dst.glob("*.png"))
    assert pngs == sorted(result["written"])
    for path in pngs:
        assert re.fullmatch(r"\d{5}-\d+-\w+\.png", path.name)
        with Image.open(path) as im:
            assert im.size == (64, 64) and im.mode == "RGB"
    stems = [p.name.split("-", 2)[2] for p in pngs]
    assert stems.count("wide.png") >= 4  # at least 2 tiles, each with a mirrored copy
    assert stems.count("rotated.png") == 2 and stems.count("deep.png") == 2
    captions = {p.name: p.read_text() for p in dst.glob("*.txt") if p.name != "preprocess_report.txt"}
    assert len(captions) == 2 and all(c == "a green square, translucent\n" for c in captions.values())
    report = (dst / "preprocess_report.txt").read_text()
    assert {"broken.png", "empty.jpg", "notes.md"} == {s.split(" ")[0] for s in result["skipped"]}
    assert "skipped broken.png" in report and "skipped empty.jpg (empty file)" in report

    again = preprocess(f"src={src}", f"dst={dst}", "width=64")  # into the same folder: new names
    assert not set(again["written"]) & set(result["written"])
    assert len(list(dst.glob("*.png"))) == len(pngs) + len(again["written"])


def test_split_and_focal_crop_follow_the_content(tmp_path):
    from lit_ti.preprocess import focal_crop, split_oversized

    wide = Image.new("RGB", (400, 100), (0, 0, 0))
    tiles = split_oversized(wide, 64, 64, 0.5, 0.2)
    assert len(tiles) == 5 and all(t.size == (64, 64) for t in tiles)  # ceil((256 - 12.8) / 51.2)
    assert split_oversized(Image.new("RGB", (100, 90)), 64, 64, 0.5, 0.2)[0].size == (100, 90)
    busy = Image.new("L", (300, 100), 0)
    busy.paste(Image.effect_noise((80, 100), 120), (210, 0))  # detail on the right
    crop = focal_crop(busy.convert("RGB"), 100, 100)
    assert crop.size == (100, 100) and max(crop.convert("L").getextrema()) > 0  # the window moved right


def test_mistakes_are_one_line(tmp_path):
    from lit_ti.errors import UserError

    src = messy_folder(tmp_path / "raw")
    with pytest.raises(UserError, match="dst: .* must be outside src"):
        preprocess(f"src={src}", f"dst={src / 'out'}")
    with pytest.raises(UserError, match="caption.tagger: .* not a local transformers model folder"):
        preprocess(f"src={src}", f"dst={tmp_path / 'o'}", f"caption.tagger={tmp_path / 'none'}")


# --- cut-outs: one subject on other backgrounds and at other sizes -------------------------------------------
TOY_CUTOUT = [
    "cutout.backgrounds={white: '#eeeeee', black: '#181818', gray: '#808080'}",
    "cutout.sizes={small: 0.36, large: 0.64}",
    "cutout.caption='a {size} [name] on a {background} background'",
]


def test_cutouts_paste_the_subject_on_every_background_at_every_size(tmp_path):
    """A cut-out becomes one copy per background and size: the subject's pixels unchanged at its own size, its
    larger side at each asked share, inside the frame, the hole of a ring showing the new background; captions
    from the template; an opaque image is reported, not copied; the source is only read."""
    from lit_ti.toy.world import Scene, render

    src = tmp_path / "raw"
    src.mkdir()
    ring = Scene("ring", "blue", "gray", "small", 0.25, 0.3)  # near a corner: the large copy must move in
    render(ring, 64, transparent=True).save(src / "ring.png")
    (src / "ring.txt").write_text("a blue ring\n")
    Image.new("RGB", (64, 64), (9, 9, 9)).save(src / "opaque.png")
    before = digest(src)
    result = preprocess(f"src={src}", f"dst={tmp_path / 'out'}", "width=64", *TOY_CUTOUT)
    assert digest(src) == before
    assert [s.split(" ")[0] for s in result["skipped"]] == ["opaque.png"]
    assert "no transparent pixels" in result["skipped"][0]
    copies = sorted(result["written"])
    captions = [p.with_suffix(".txt").read_text().strip() for p in copies]
    assert captions == [
        f"a {z} [name] on a {b} background" for z in ("small", "large") for b in ("white", "black", "gray")
    ]
    for path, text in zip(copies, captions):
        im = np.asarray(Image.open(path).convert("RGB"), dtype=int)  # [64, 64, 3]
        level = {"white": 238, "black": 24, "gray": 128}[text.split()[-2]]
        blue = (im[..., 2] - im[..., 0]) > 80  # the subject's pixels
        ys, xs = np.nonzero(blue)
        side = max(xs.max() - xs.min(), ys.max() - ys.min()) + 1
        share = 0.36 if "small" in text else 0.64
        assert abs(side - share * 64) <= 2, (path.name, side)
        assert (im[0, 0] == level).all() and (im[-1, -1] == level).all()  # the new background
        cy, cx = round(ys.mean()), round(xs.mean())
        assert (abs(im[cy, cx] - level) <= 2).all(), (path.name, im[cy, cx])  # the hole shows it too
        assert xs.min() >= 0 and xs.max() <= 63 and ys.min() >= 0 and ys.max() <= 63
    own = np.asarray(render(ring), dtype=int)  # the subject at its own size on its own background
    again = np.asarray(Image.open(copies[2]).convert("RGB"), dtype=int)
    assert np.abs(own - again).mean() < 2, np.abs(own - again).mean()


def test_preprocess_writes_the_toy_worlds_cutouts(tmp_path):
    """`toy_cutouts=true` measures the user's path: the toy folder holds what `python preprocess.py` writes from
    the same cut-out render with the toy's words."""
    import random

    from lit_ti.toy.world import random_scene, render, write_concept

    toy = write_concept("red_ring", tmp_path / "toy", n=1, named=True, cutouts=True)
    src = tmp_path / "raw"
    src.mkdir()
    render(random_scene(random.Random("red_ring-0"), "red_ring"), 64, transparent=True).save(src / "0000.png")
    result = preprocess(f"src={src}", f"dst={tmp_path / 'out'}", "width=64", *TOY_CUTOUT)
    ours = sorted(result["written"])
    theirs = sorted(toy.glob("*.png"))
    assert len(ours) == len(theirs) == 6
    for a, b in zip(ours, theirs):
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b))), (a.name, b.name)
        assert a.with_suffix(".txt").read_text() == b.with_suffix(".txt").read_text()


def test_cutout_captions_tidy_what_an_empty_field_leaves():
    from lit_ti.cutout import caption

    template = "{caption}, {size}, on a {background} background"
    assert caption(template, "", "white", "small") == "small, on a white background"
    assert caption(template, "[name], sitting", "gray", "") == "[name], sitting, on a gray background"
    assert caption("a {size} [name] on a {background} background", "", "black", "") == "a [name] on a black background"
    assert caption("{caption}", "a,b  c", "x", "y") == "a,b c"  # the image's own caption keeps its commas


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("cutout.backgrounds={white: nocolour}", "cutout.backgrounds.white='nocolour': not a colour"),
        ("cutout.backgrounds=[white]", "cutout.backgrounds=.*: a mapping of words to colours"),
        ("cutout.sizes={small: 1.5}", r"cutout.sizes.small='1.5': the subject's share of the image side, in \(0, 1\]"),
        ("cutout.sizes={small: 0.3}", "cutout.sizes: set cutout.backgrounds too"),
        ("cutout.caption='{caption} on {colour}'", "unknown {colour}; use {caption}, {background}, {size}"),
        ("cutout.caption='{caption'", "cutout.caption=.*: .*write braces as"),
    ],
)
def test_cutout_mistakes_are_one_line_before_anything_is_written(tmp_path, override, message):
    from lit_ti.errors import UserError

    src = messy_folder(tmp_path / "raw")
    with pytest.raises(UserError, match=message):
        preprocess(f"src={src}", f"dst={tmp_path / 'out'}", override)
    assert not (tmp_path / "out").exists()


def test_deepbooru_tag_formatting():
    scores = {"1girl": 0.9, "rating:safe": 0.99, "long_hair": 0.7, "smile_(happy)": 0.55, "hat": 0.3}
    assert format_tags(scores) == r"1girl, long hair, smile \(happy\)"
    assert format_tags(scores, sort="score", spaces=False, escape_brackets=False) == "1girl, long_hair, smile_(happy)"
    assert format_tags(scores, threshold=0.6, ranks=True, exclude=("1girl",)) == "(long hair:0.700)"


def test_local_tagger_writes_captions(tmp_path):
    make_tagger(tmp_path / "tagger")
    src = tmp_path / "raw"
    src.mkdir()
    buf = _io.BytesIO()
    Image.new("RGB", (48, 48), (200, 0, 0)).save(buf, "PNG")
    (src / "a.png").write_bytes(buf.getvalue())
    (src / "a.txt").write_text("my caption")
    dst = tmp_path / "clean"
    preprocess(
        f"src={src}", f"dst={dst}", "width=32", f"caption.tagger={tmp_path / 'tagger'}", "existing_caption=prepend"
    )
    assert (dst / "00000-0-a.txt").read_text() == "my caption red, square shape\n"


def test_local_blip_captioner_writes_captions(tmp_path):
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "red", "square"]
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(words)}, bos_token="[DEC]")
    small = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    config = BlipConfig(
        text_config=dict(
            vocab_size=len(words), bos_token_id=5, sep_token_id=3, eos_token_id=3, pad_token_id=0, **small
        ),
        vision_config=dict(image_size=32, patch_size=8, **small),
    )
    model = BlipForConditionalGeneration(config)
    head = model.text_decoder.cls.predictions  # the decoder always says "red"
    head.decoder.weight.data.zero_()
    head.bias.data.fill_(-10.0)
    head.bias.data[words.index("red")] = 10.0
    model.save_pretrained(tmp_path / "blip")
    BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer).save_pretrained(tmp_path / "blip")
    src = tmp_path / "raw"
    src.mkdir()
    Image.new("RGB", (40, 40), (200, 0, 0)).save(src / "x.png")
    dst = tmp_path / "clean"
    preprocess(f"src={src}", f"dst={dst}", "width=32", f"caption.blip={tmp_path / 'blip'}")
    assert (dst / "00000-0-x.txt").read_text().startswith("red red")
