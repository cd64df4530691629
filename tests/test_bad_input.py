"""Bad input battery: every mistake ends in one message that names the file or key and the fix, and either a
clean exit 2 before training or a skip with a warning; odd-but-valid images train.

The inputs are built in tests/bad_inputs.py. Runs go through `lit_ti.train.main` (what `python train.py` calls)
in-process; mistakes only Hydra sees (unknown keys, unknown options) go through the real command line.
"""

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.bad_inputs import (
    bomb_png,
    captioned,
    cmyk,
    dangling_link,
    exif_rotated,
    good,
    hostile_pickle,
    image,
    incomplete_model,
    no_permission,
    only,
    png_bytes,
    sixteen_bit,
    template_file,
    truncated,
    wide_embedding,
    with_file,
)
from tests.conftest import compose

FAST = ["trainer.max_steps=1", "callbacks.toy_eval=null", "callbacks.preview=null", "callbacks.model_checkpoint=null"]


@dataclass
class Outcome:
    code: int  # 0 = trained
    errors: list[str]  # the `error: ...` lines on stderr
    warnings: list[str]
    out: Path

    @property
    def trained(self) -> bool:
        return self.code == 0 and (self.out / "zz-concept.safetensors").is_file()


def run(tmp_path: Path, capsys, *overrides: str) -> Outcome:
    import lit_ti.train

    out = tmp_path / "run"
    cfg = compose(f"paths.output_dir={out}", "name=zz-concept", *FAST, *overrides)
    code = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            lit_ti.train.main(cfg)
        except SystemExit as e:
            code = e.code
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert "Traceback" not in err
    return Outcome(code, errors, [str(w.message) for w in caught], out)


# ---------------------------------------------------------------- the battery
# (id, data builder, overrides, expectation); {data}/{root} are the data folder and the test's tmp folder.
# expectation: ("error", *substrings) | ("warn", *substrings) | ("train",)
CASES = [
    # files the loader must skip, naming them
    ("corrupt-file", with_file("corrupt.png", os.urandom(2048)), [], ("warn", "corrupt.png")),
    ("zero-byte", with_file("empty.png", b""), [], ("warn", "empty.png")),
    ("truncated-png", with_file("cut.png", truncated("PNG")), [], ("warn", "cut.png")),
    ("truncated-jpeg", with_file("cut.jpg", truncated("JPEG")), [], ("warn", "cut.jpg")),
    ("not-an-image", with_file("notes.md", b"# my notes\n"), [], ("warn", "notes.md")),
    ("text-named-jpg", with_file("fake.jpg", b"this is not a jpeg"), [], ("warn", "fake.jpg")),
    ("decompression-bomb", with_file("bomb.png", bomb_png()), [], ("warn", "bomb.png", "pixels")),
    ("unreadable-link", with_file("gone.png", make=dangling_link), [], ("warn", "gone.png", "broken link")),
    ("unreadable-mode", with_file("locked.png", make=no_permission), [], ("warn", "locked.png", "permission")),
    # odd images that must train, upright and in RGB
    ("rgba", with_file("rgba.png", make=image("RGBA", (200, 20, 20, 128))), [], ("train",)),
    ("palette", with_file("pal.png", make=image("P", 1)), [], ("train",)),
    ("palette-transparency", with_file("palt.png", make=image("P", 1, transparency=0)), [], ("train",)),
    ("cmyk", with_file("cmyk.jpg", make=cmyk), [], ("train",)),
    ("16-bit", with_file("deep.png", make=sixteen_bit), [], ("train",)),
    ("grayscale", with_file("grey.png", make=image("L", 128)), [], ("train",)),
    ("grayscale-alpha", with_file("greya.png", make=image("LA", (128, 200))), [], ("train",)),
    ("1-bit", with_file("bits.png", make=image("1", 1)), [], ("train",)),
    ("exif-rotated", with_file("rotated.jpg", exif_rotated()), [], ("train",)),
    ("tiny-8x8", with_file("tiny.png", png_bytes((8, 8))), [], ("warn", "tiny.png", "8x8")),
    ("non-utf8-name", with_file(b"caf\xe9 \xff.png", png_bytes()), [], ("train",)),
    ("long-name", with_file("a" * 240 + ".png", png_bytes()), [], ("train",)),
    ("latin1-caption", with_file("c.txt", "caf\xe9 cr\xe8me".encode("latin-1")), [], ("train",)),
    # folders
    ("empty-folder", lambda f: f.mkdir() or f, [], ("error", "data.dir", "no images")),
    ("missing-folder", lambda f: f, [], ("error", "data.dir", "not a folder")),
    ("folder-is-a-file", lambda f: (f.write_text("x"), f)[1], [], ("error", "data.dir", "not a folder")),
    ("only-non-images", only("readme.txt.md", b"hello"), [], ("error", "data.dir", "no images")),
    ("only-broken-images", only("cut.png", truncated("PNG")), [], ("error", "data.dir", "cut.png")),
    # templates
    ("template-missing", good, ["data.template={root}/nope.txt"], ("error", "data.template", "nope.txt")),
    ("template-empty", template_file(""), ["data.template={root}/template.txt"], ("error", "data.template")),
    ("template-no-name", template_file("a photo\n"), ["data.template={root}/template.txt"], ("error", "[name]")),
    ("template-unknown", good, ["data.template=subjekt"], ("error", "data.template", "subject")),
    (  # [name] left to the captions (A1111 fills [filewords] first): every caption must then hold it
        "filewords-captions-without-name",
        captioned("a photo of [name] at noon", "a photo at night"),
        ["data.template=filewords"],
        ("error", "data.template", "2 of 3 captions lack it"),
    ),
    ("filewords-named-captions", captioned("a photo of [name]"), ["data.template=filewords"], ("train",)),
    (
        "filewords-named-captions-positive-only",
        captioned("a photo of [name]"),
        ["data.template=filewords", "method=dreamartist", "method.positive_filewords_only=true"],
        ("error", "method.positive_filewords_only", "zz-concept-neg"),
    ),
    (
        "filewords-no-captions",
        only("0001.png", png_bytes()),
        ["data.template=style_filewords"],
        ("error", "[filewords]"),
    ),
    # names and vectors
    ("name-is-a-token", good, ["name=cat"], ("error", "name='cat'", "already")),
    ("name-empty", good, ["name=''"], ("error", "name")),
    ("too-many-vectors", good, ["method.num_vectors=80"], ("error", "method.num_vectors", "75")),
    ("zero-vectors", good, ["method.num_vectors=0"], ("error", "method.num_vectors")),
    # LR schedule strings
    ("schedule-bad-step", good, ["method.lr_schedule='0.1:abc'"], ("error", "method.lr_schedule", "abc")),
    ("schedule-bad-rate", good, ["method.lr_schedule=abc"], ("error", "method.lr_schedule")),
    ("schedule-not-increasing", good, ["method.lr_schedule='0.1:10, 0.05:5'"], ("error", "method.lr_schedule")),
    ("schedule-negative", good, ["method.lr_schedule='-0.1'"], ("error", "method.lr_schedule")),
    ("schedule-empty", good, ["method.lr_schedule=''"], ("error", "method.lr_schedule")),
    # models and embedding files
    ("model-missing", good, ["model=diffusers", "model.path={root}/no-model"], ("error", "model.path")),
    ("model-no-unet", incomplete_model("unet"), ["model=diffusers", "model.path={root}/model"], ("error", "unet")),
    ("model-no-tokenizer", incomplete_model("tokenizer"), ["model.path={root}/model"], ("error", "tokenizer")),
    ("init-file-wrong-width", wide_embedding, ["method.init_file={root}/wide.safetensors"], ("error", "999")),
    ("init-file-missing", good, ["method.init_file={root}/none.pt"], ("error", "method.init_file")),
    (
        "init-file-hostile",
        hostile_pickle,
        ["method.init_file={root}/evil.pt"],
        ("error", "evil.pt", "refused", "system"),
    ),
    # settings
    ("resolution-not-multiple-of-8", good, ["data.resolution=65"], ("error", "data.resolution")),
    ("batch-size-zero", good, ["data.batch_size=0"], ("error", "data.batch_size")),
    ("crop-unknown", good, ["data.crop=middle"], ("error", "data.crop")),
    ("resume-missing", good, ["ckpt_path={root}/none.ckpt"], ("error", "ckpt_path")),
    ("precision-unknown", good, ["trainer.precision=17"], ("error", "trainer", "Precision 17")),
    ("export-format-unknown", good, ["callbacks.export.formats=[pt,gif]"], ("error", "callbacks.export.formats")),
]


@pytest.mark.parametrize(("build", "overrides", "expect"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(tmp_path, capsys, build, overrides, expect):
    data = build(tmp_path / "data")
    filled = [o.format(data=data, root=tmp_path) for o in overrides]
    outcome = run(tmp_path, capsys, f"data.dir={data}", "data.template=subject", *filled)
    kind, *needles = expect
    if kind == "error":
        assert outcome.code == 2, f"expected exit 2, got {outcome.code}; warnings: {outcome.warnings}"
        assert len(outcome.errors) == 1, outcome.errors
        assert all(n in outcome.errors[0] for n in needles), outcome.errors[0]
        assert not list(outcome.out.glob("*.safetensors"))  # failed before training
    else:
        assert outcome.trained, (outcome.code, outcome.errors)
        about_data = [w for w in outcome.warnings if "data." in w]
        if kind == "warn":
            assert any(all(n in w for n in needles) for w in about_data), about_data
        else:
            assert not about_data, about_data
    assert not (tmp_path / "PWNED").exists()  # no file ever runs code


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("method.lr=0.1", "error: method.lr=0.1: no such key; did you mean method.optimizer.lr?"),
        pytest.param("+method.foo=1", "method.foo", marks=pytest.mark.slow),  # added key no constructor takes
        pytest.param(
            "method=textual_inversio", "method=textual_inversio: no such option", marks=pytest.mark.slow
        ),  # no such option
    ],
)
def test_unknown_config_keys_on_the_command_line(tmp_path, override, message, cli):
    result = cli.train(override, "trainer.max_steps=1", f"hydra.run.dir={tmp_path}")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert message in result.stderr, result.stderr[-2000:]


def test_exif_rotated_image_trains_upright(tmp_path):
    from lit_ti.data.images import load_image

    (tmp_path / "r.jpg").write_bytes(exif_rotated())
    im = load_image(tmp_path / "r.jpg")
    assert im.size == (32, 48)  # turned: portrait
    top = im.getpixel((16, 4))
    assert min(top) > 200  # the white strip now runs along the top


def test_unknown_toy_names_are_user_errors_and_write_nothing(tmp_path, monkeypatch):
    from lit_ti.errors import UserError
    from lit_ti.train import _toy_data, _toy_style

    monkeypatch.chdir(tmp_path)  # the resolvers render into outputs/toy_data under the working directory
    with pytest.raises(UserError, match="toy_style=foo: no such toy style; use one of topleft, night"):
        _toy_style("foo")
    with pytest.raises(UserError, match="toy_prompts='caption': use one of template, captions"):
        _toy_data("purple_star", 2, "caption")
    with pytest.raises(UserError, match="toy_masks=yes: use true or false"):
        _toy_data("purple_star", 2, "captions", "yes")
    with pytest.raises(UserError, match="toy_cutouts=1: use true or false"):
        _toy_data("purple_star", 2, "captions", False, 1)
    with pytest.raises(UserError, match="toy_masks=true with toy_cutouts=true: .* choose one"):
        _toy_data("purple_star", 2, "captions", True, True)
    for concept in ("foo", "pink_star", "red_circle_x"):
        with pytest.raises(UserError, match=f"toy_concept: unknown toy concept '{concept}'"):
            _toy_data(concept, 2)
    assert not (tmp_path / "outputs").exists()


def _target_keys(node, prefix: str = "") -> list[str]:
    """Every config key that holds a `_target_` (what `instantiate` imports), in a plain-dict config."""
    if not isinstance(node, dict):
        return []
    found = [prefix.rstrip(".")] if "_target_" in node and prefix else []
    return found + [k for key, value in node.items() for k in _target_keys(value, f"{prefix}{key}.")]


@pytest.mark.parametrize("method", ["textual_inversion", "dreamartist", "hypernetwork", "pivotal"])
def test_every_target_that_cannot_be_imported_is_one_line_naming_its_key(tmp_path, capsys, method):
    """An optional package that is not installed, or a misspelt class, anywhere a config names a `_target_`
    (the method, its optimizer, the data, a callback, a logger), is one `error:` line naming that key and the
    fix; never Hydra's traceback."""
    data = good(tmp_path / "data")
    keys = _target_keys(OmegaConf.to_container(compose(f"method={method}", "name=zz", *FAST)))
    assert {"method", "method.optimizer", "data", "model"} <= set(keys), keys
    for key in keys:
        missing = run(tmp_path, capsys, f"method={method}", f"data.dir={data}", f"{key}._target_=no_such_package.Thing")
        assert missing.code == 2 and len(missing.errors) == 1, (key, missing.errors)
        assert f"{key}._target_=" in missing.errors[0] and "pip install no_such_package" in missing.errors[0]
    misspelt = run(
        tmp_path, capsys, f"method={method}", f"data.dir={data}", "method.optimizer._target_=torch.optim.AdamWW"
    )
    assert misspelt.errors == [
        "error: method.optimizer._target_='torch.optim.AdamWW': no such class or function; check its spelling"
    ]
