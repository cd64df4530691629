"""Files from strangers, through the entry points a user runs: bombs, lying sizes, non-finite values and odd
layouts as `method.init_file`, in generate's `embeddings_dir` / `hypernetwork`, and given to evaluate.py.
Each case: the exit status, exactly one `error:` line naming the file (or key), and (via the `entry`
fixture) no traceback and nothing outside the run folder touched. The files come from the `hostile` fixture
(tests/hostile_files.py)."""

import pytest

EMBEDDINGS = ["zip_bomb", "legacy_lie", "png_bomb", "nan_pt", "nan_safetensors", "nan_png", "stride0", "st_lie"]
TINY_GENERATE = ("model=tiny", "steps=1", "seed=1")


def one_error(outcome, *names: str) -> str:
    assert len(outcome.errors) == 1, outcome.stderr[-2000:]
    line = outcome.errors[0]
    for name in names:
        assert name in line, line
    return line


@pytest.mark.parametrize("kind", EMBEDDINGS)
def test_train_refuses_hostile_init_files(entry, hostile, kind):
    result = entry.train("model=tiny", f"method.init_file={hostile[kind]}")
    assert result.code == 2
    one_error(result, hostile[kind].name)


def test_train_refuses_a_non_finite_negative_init_file(entry, hostile):
    result = entry.train("model=tiny", "method=dreamartist", f"method.neg_init_file={hostile['nan_pt']}")
    assert result.code == 2
    assert "non-finite" in one_error(result, hostile["nan_pt"].name)


@pytest.mark.parametrize("kind", ["hn_structure", "hn_nan", "zip_bomb", "legacy_lie"])
def test_train_refuses_hostile_hypernetworks(entry, hostile, kind):
    result = entry.train("experiment=hypernetwork_style", "model=tiny", f"method.init_file={hostile[kind]}")
    assert result.code == 2
    one_error(result, hostile[kind].name)


@pytest.mark.parametrize("kind", ["nan_pt", "png_bomb", "zip_bomb", "st_lie"])
def test_generate_refuses_hostile_embeddings_a_prompt_uses(entry, hostile, tmp_path, kind):
    folder = tmp_path / "embeddings"
    folder.mkdir()
    path = folder / hostile[kind].name
    path.write_bytes(hostile[kind].read_bytes())
    result = entry.generate(*TINY_GENERATE, f"embeddings_dir={folder}", f"prompt=a photo of {path.stem}")
    assert result.code == 2
    one_error(result, path.name)


def test_generate_never_decodes_pngs_no_prompt_names(entry, hostile, tmp_path, monkeypatch):
    """The PNG bomb (and a huge picture) sit in the folder; the prompt names neither: no pixel is decoded."""
    import lit_ti.io.png_embeddings as png

    decoded = []
    monkeypatch.setattr(png, "decode_pixels", lambda image: decoded.append(image) or None)
    folder = tmp_path / "embeddings"
    folder.mkdir()
    (folder / "pngbomb.png").write_bytes(hostile["png_bomb"].read_bytes())
    (folder / "origti.pt").write_bytes(hostile["parameterdict"].read_bytes())
    result = entry.generate(*TINY_GENERATE, f"embeddings_dir={folder}", "prompt=a photo of origti")
    assert result.code == 0 and not result.errors, result.stderr[-2000:]
    assert decoded == []
    assert len(list(result.out.glob("*.png"))) == 1


def test_generate_loads_an_original_ti_parameterdict_file(entry, hostile, capsys):
    result = entry.generate(*TINY_GENERATE, f"embeddings=[{hostile['parameterdict']}]", "prompt=a photo of origti")
    assert result.code == 0, result.stderr[-2000:]


@pytest.mark.parametrize("kind", ["hn_structure", "hn_nan", "zip_bomb"])
def test_generate_refuses_hostile_hypernetworks(entry, hostile, kind):
    result = entry.generate(*TINY_GENERATE, f"hypernetwork={hostile[kind]}")
    assert result.code == 2
    one_error(result, hostile[kind].name)


def test_generate_refuses_non_finite_latents(entry, hostile, tmp_path):
    """Finite vectors of 1e30 overflow the text encoder: one line, no black image written."""
    result = entry.generate(*TINY_GENERATE, f"embeddings=[{hostile['huge']}]", "prompt=a photo of overflow")
    assert result.code == 2
    assert "non-finite" in one_error(result)
    assert not list(result.out.glob("*.png")) if result.out.is_dir() else True


@pytest.mark.parametrize(
    "override",
    [
        "steps=0",
        "steps=abc",
        "cfg_scale=nan",
        "cfg_scale=1000",
        "size=13",
        "size=100000",
        "seed=-2",
        "seed=99999999999",
        "batch_size=1000",
        "n_iter=0",
        "hypernetwork_strength=inf",
        "clip_skip=0",
        "sampler=plms",
        "precision=8",
        "device=tpu",
        "hypernetwork=/nonexistent/style.pt",
        "lora_max_timestep=0",
        "lora_max_timestep=500",  # with no LoRA to gate
    ],
)
def test_generate_settings_are_checked_up_front(entry, override):
    result = entry.generate(*TINY_GENERATE, override)
    assert result.code == 2
    one_error(result, override.split("=")[0] + "=")


@pytest.mark.parametrize("kind", ["nan_pt", "zip_bomb", "legacy_lie", "st_lie"])
def test_evaluate_refuses_hostile_files(entry, hostile, kind):
    result = entry.evaluate(str(hostile[kind]), "purple_star", "--samples", "1")
    assert result.code != 0
    one_error(result, hostile[kind].name)
