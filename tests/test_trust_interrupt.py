"""Ctrl-C anywhere in an entry point a user runs: exit 130, one line, no traceback, and nothing lost — a run
stopped before its first step removes what it made; generate.py and preprocess.py keep the files they wrote
whole. (A stop during training: tests/test_resume.py and tests/test_cli.py.) Each case runs through the
`entry` fixture, which also fails a test where a KeyboardInterrupt escapes."""

import pytest

from tests.trust_harness import QUICK


def ctrl_c_at_call(n: int, original=None):
    """A stand-in that raises KeyboardInterrupt (what Python's SIGINT handler raises wherever the main thread
    is) at its `n`-th call, and until then calls `original`."""
    calls = []

    def stand_in(*args, **kwargs):
        calls.append(1)
        if len(calls) >= n:
            raise KeyboardInterrupt
        return original(*args, **kwargs) if original else None

    return stand_in


# before fit (the writability check), and inside it: the model's load, the data's preparation (latent caching)
@pytest.mark.parametrize(
    "target",
    [
        "lit_ti.run_folder.RunFolder.check_writable",
        "lit_ti.models.TinyBackbone.load",
        "lit_ti.data.ConceptDataModule.setup",
    ],
)
def test_train_stopped_before_its_first_step_leaves_only_the_users_files(entry, monkeypatch, caplog, target):
    entry.out.mkdir(parents=True)
    (entry.out / "notes.txt").write_text("mine")
    monkeypatch.setattr(target, ctrl_c_at_call(1))
    outcome = entry.train("name=zz-concept", *QUICK)
    assert outcome.code == 130, outcome.stderr[-2000:]
    assert "stopped (Ctrl-C) before training began" in caplog.text  # Lightning's info line, not an error
    assert sorted(p.name for p in entry.out.iterdir()) == ["notes.txt"]


def test_generate_stopped_mid_way_keeps_the_images_it_wrote(entry, monkeypatch):
    import lit_ti.generate

    # one denoising step per image: the 2nd call is the 2nd image's, after the 1st was written
    monkeypatch.setattr(lit_ti.generate, "check_finite", ctrl_c_at_call(2, lit_ti.generate.check_finite))
    outcome = entry.generate("model=tiny", "steps=1", "seed=1", "n_iter=3")
    assert outcome.code == 130 and "stopped (Ctrl-C)" in outcome.stderr, outcome.stderr[-2000:]
    assert [p.name for p in entry.out.iterdir()] == ["00000-1.png"]  # no grid of a part, no temp file


def test_preprocess_stopped_mid_way_keeps_whole_images_and_captions(entry, monkeypatch, tmp_path):
    import lit_ti.preprocess
    from tests.conftest import make_concept_dir

    src = make_concept_dir(tmp_path / "src", n=4)
    monkeypatch.setattr(lit_ti.preprocess, "_flips", ctrl_c_at_call(3, lit_ti.preprocess._flips))
    outcome = entry.preprocess(f"src={src}", "width=32")
    assert outcome.code == 130 and "stopped (Ctrl-C)" in outcome.stderr, outcome.stderr[-2000:]
    written = sorted(p.name for p in entry.out.iterdir())  # the first two sources, each whole; no temp file
    assert [n for n in written if n.endswith(".png")] == [
        "00000-0-000-a square thing.png",
        "00001-0-001-a square thing.png",
    ]
    assert all(n.endswith((".png", ".txt")) for n in written), written
