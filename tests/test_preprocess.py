"""`python preprocess.py`: a messy folder becomes a clean training folder, and the source stays untouched."""

import hashlib
import io as _io
import re

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
