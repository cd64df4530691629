"""The run folder is trusted: names stay names, nothing is written outside it, only lit_ti's own files are
deleted, a finished run is never overwritten, and a resume must be the same run
(damaged checkpoints and failing disks: tests/test_trust_failures.py).

Every user-facing case runs through the `entry` fixture (conftest): no traceback, nothing outside the run
folder changed, no user file in it deleted.
"""

import os
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lit_ti import io
from lit_ti.io import atomic
from tests.trust_harness import CKPT, METHODS, QUICK, nothing_left, one_error

# ---------------------------------------------------------------- 1. names are names
NAMES = {
    "dotdot-path": "../../somewhere/model",
    "absolute": "__root__/abs/model",
    "empty": "''",
    "dotdot": "..",
    "slash": "a/b",
    "control": "'a\x1bb'",
    "too-long": "x" * 300,
    "derived-too-long": "x" * 240,  # fits 255 alone, not as '<name>-<step>.safetensors'
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", NAMES.values(), ids=NAMES.keys())
def test_a_name_is_one_path_component(entry, method, name):
    name = name.replace("__root__", str(entry.root))
    outcome = entry.train(f"name={name}", *METHODS[method])
    one_error(outcome, "error: name=")
    nothing_left(outcome)


OUTSIDE = "outside the run folder"


@pytest.mark.parametrize(
    ("override", "key", "message"),
    [
        ("callbacks.model_checkpoint.dirpath=__root__/elsewhere", "callbacks.model_checkpoint.dirpath", OUTSIDE),
        ("callbacks.export.dirpath=__out__/../../x", "callbacks.export.dirpath", OUTSIDE),
        ("logger.tensorboard.save_dir=__root__", "logger.tensorboard.save_dir", OUTSIDE),
        ("callbacks.loss_csv.filename=../../loss.csv", "callbacks.loss_csv.filename", "a file name, without folders"),
    ],
    ids=["checkpoints", "export", "tensorboard", "loss-csv"],
)
def test_every_output_folder_lies_inside_the_run_folder(entry, override, key, message):
    override = override.replace("__root__", str(entry.root)).replace("__out__", str(entry.out))
    outcome = entry.train("name=zz-concept", override, *QUICK)
    one_error(outcome, key, message)
    nothing_left(outcome)


def test_the_writer_refuses_a_path_outside_the_active_run_folder(tmp_path):
    run = tmp_path / "run"
    (run / "out").mkdir(parents=True)
    (run / "link").symlink_to(tmp_path)  # a symlink inside the run folder pointing out of it
    with io.paths.run_folder(run):
        for bad in (run / ".." / "x.pt", run / "link" / "x.pt", tmp_path / "x.pt"):
            with pytest.raises(io.paths.UserError, match="outside the run folder"), atomic.atomic_path(bad) as tmp:
                tmp.write_bytes(b"x")
        with atomic.atomic_path(run / "out" / "ok.pt") as tmp:
            tmp.write_bytes(b"x")
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["ok.pt"]


# ---------------------------------------------------------------- 2. only lit_ti's files, only after validation
def test_user_files_and_a_live_runs_temp_files_survive_a_run(entry):
    entry.out.mkdir(parents=True)
    mine = {
        "notes.txt": b"mine",
        "draft.tmp": b"a user's temp file",
        ".cache.tmp": b"hidden, ends in .tmp",
        f".zz-concept.pt.lit_ti-{atomic.HOST}-{os.getppid()}-abcdefgh.tmp": b"a concurrent run's",
    }
    for name, data in mine.items():
        (entry.out / name).write_bytes(data)
    (entry.out / "deep" / "tree").mkdir(parents=True)
    (entry.out / "deep" / "tree" / ".old.pt.x1y2.tmp").write_bytes(b"not ours to judge")
    outcome = entry.train("name=zz-concept", *QUICK)
    assert outcome.code == 0, outcome.stderr[-2000:]
    assert all((entry.out / n).read_bytes() == d for n, d in mine.items())
    assert (outcome.out / "zz-concept.safetensors").is_file()


def test_stale_temp_files_go_only_when_their_writer_is_dead_and_only_where_lit_ti_writes(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    folder = tmp_path / "embeddings"
    (folder / "sub").mkdir(parents=True)
    stale = folder / f".a.pt.lit_ti-{atomic.HOST}-{dead.pid}-abcdefgh.tmp"
    live = folder / f".b.pt.lit_ti-{atomic.HOST}-{os.getpid()}-abcdefgh.tmp"
    other_host = folder / f".c.pt.lit_ti-000000-{dead.pid}-abcdefgh.tmp"
    below = folder / "sub" / stale.name
    plain = folder / ".d.pt.abcdefgh.tmp"
    for p in (stale, live, other_host, below, plain):
        p.write_bytes(b"x")
    assert atomic.remove_stale([folder]) == [stale]
    assert all(p.exists() for p in (live, other_host, below, plain))


@pytest.mark.parametrize("method", METHODS)
def test_every_folder_a_run_writes_temp_files_in_is_swept_by_the_next(entry, monkeypatch, method):
    """A kill leaves temp files wherever a write was under way: the next run must sweep each such folder
    (a new output folder that the sweep does not know would keep a killed run's temp files forever)."""
    from lit_ti import run_folder

    written, swept, mkstemp, sweep = set(), set(), tempfile.mkstemp, run_folder.remove_stale

    def recording_mkstemp(*args, dir=None, **kwargs):
        written.add(Path(dir).absolute())
        return mkstemp(*args, dir=dir, **kwargs)

    def recording_sweep(folders):
        folders = [Path(f).absolute() for f in folders]
        swept.update(folders)
        return sweep(folders)

    monkeypatch.setattr(tempfile, "mkstemp", recording_mkstemp)
    monkeypatch.setattr(run_folder, "remove_stale", recording_sweep)
    everything = [o for o in METHODS[method] if o != "callbacks.preview=null"]
    outcome = entry.train("name=zz-concept", *everything, *CKPT, "callbacks.preview.every_n_steps=1")
    assert outcome.code == 0, outcome.stderr[-2000:]
    assert any(p.name == "previews" for p in written) and swept
    assert {p for p in written if p.is_relative_to(entry.out)} <= swept


def test_a_run_refused_before_training_leaves_nothing(entry):
    # the template check runs after TensorBoard wrote its first event file: that must go again too
    outcome = entry.train("name=zz-concept", "data.template=none", *QUICK)
    one_error(outcome, "[name]")
    nothing_left(outcome)


def test_a_refused_run_in_a_users_folder_removes_only_its_own_traces(entry):
    entry.out.mkdir(parents=True)
    (entry.out / "notes.txt").write_text("mine")
    outcome = entry.train("name=zz-concept", "data.template=none", *QUICK)
    one_error(outcome, "[name]")
    assert sorted(p.name for p in entry.out.iterdir()) == ["notes.txt"]


# ---------------------------------------------------------------- 3. never overwrite; resume is the same run
def test_a_fresh_run_into_a_finished_run_is_refused_and_resume_is_offered(entry):
    assert entry.train("name=zz-concept", *QUICK, *CKPT).code == 0
    before = {p: p.read_bytes() for p in entry.out.rglob("*") if p.is_file()}
    outcome = entry.train("name=zz-concept", *QUICK, *CKPT)
    one_error(outcome, f"hydra.run.dir={entry.out}", "new hydra.run.dir", "ckpt_path=")
    assert {p: p.read_bytes() for p in entry.out.rglob("*") if p.is_file()} == before


def test_a_fresh_run_is_refused_where_only_final_files_are(entry):
    assert entry.train("name=zz-concept", *QUICK, "callbacks.model_checkpoint=null").code == 0
    one_error(entry.train("name=zz-concept", *QUICK), "zz-concept.", "new hydra.run.dir")


@pytest.mark.parametrize(
    ("overrides", "differs"),
    [
        ([*QUICK, "name=zz-other"], "name 'zz-concept' (this run: 'zz-other')"),
        ([*QUICK, "method.num_vectors=3"], "'zz-concept': 2} (this run: {'zz-concept': 3})"),
        (METHODS["hypernetwork"], "method 'TextualInversion' (this run: 'HypernetworkMethod')"),
        ([*QUICK, "model.seed=1"], "model 'lit_ti-tiny-seed0' (this run: 'lit_ti-tiny-seed1')"),
    ],
    ids=["name", "num-vectors", "method", "model"],
)
def test_a_resume_of_another_run_is_refused(entry, checkpoint, overrides, differs):
    outcome = entry.train("name=zz-concept", *overrides, f"ckpt_path={checkpoint}")
    one_error(outcome, f"ckpt_path={checkpoint}", differs)
    nothing_left(outcome)


# ---------------------------------------------------------------- run-folder names from user values
OVERRIDE_TEXT = st.text(st.characters(codec="utf-8"), max_size=80)


@settings(max_examples=300, deadline=None)
@given(keys=st.lists(OVERRIDE_TEXT, max_size=4), values=st.lists(OVERRIDE_TEXT, max_size=4), prefix=OVERRIDE_TEXT)
def test_a_label_from_any_values_is_one_safe_path_component(tmp_path_factory, keys, values, prefix):
    from lit_ti.labels import MAX_LABEL, label

    text = label([f"{k}={v}" for k, v in zip(keys, values)], prefix)
    assert text not in ("", ".", "..") and ".." not in text and len(text) <= MAX_LABEL
    assert text.isascii() and text.isprintable() and not set(text) & set("/\\'\" \t")
    folder = tmp_path_factory.getbasetemp() / "labels"
    made = (folder / text).resolve()
    assert made.parent == folder.resolve()  # one component, directly below
    made.mkdir(parents=True, exist_ok=True)


def test_run_and_sweep_folders_name_the_method_and_values_but_no_path_or_hostile_text():
    from tests.conftest import compose

    cfg = compose(
        "method=dreamartist",
        "seed=1",
        "method.optimizer.lr=0.003",
        "callbacks.preview.prompt='a/../../x y'",
        "name=../../evil",
        "data.dir=/etc/secret",
        "hydra.run.dir=/elsewhere",
        hydra=True,
    )
    cfg.hydra.job.num = 3
    subdir = cfg.hydra.sweep.subdir
    assert subdir.startswith("3-dreamartist-seed=1,lr=0.003,prompt=a_")
    assert "/" not in subdir and ".." not in subdir and "secret" not in subdir and "elsewhere" not in subdir
    run_dir = Path(cfg.hydra.sweep.dir)
    assert run_dir.parts[:2] == ("outputs", "evil") and ".." not in run_dir.parts  # the name made safe


@pytest.mark.parametrize("folder", ["/runs/0-textual_inversion-seed=0,lr=0.01", "/runs/it's [odd] {x}", "/runs/plain"])
def test_the_resume_line_names_any_run_folder_as_hydra_reads_it_back(folder):
    import shlex

    from hydra.core.override_parser.overrides_parser import OverridesParser

    from lit_ti.train import _shell_literal

    [word] = shlex.split(_shell_literal("hydra.run.dir", folder))  # one shell word
    [parsed] = OverridesParser.create().parse_overrides([word])
    assert not parsed.is_sweep_override() and parsed.value() == folder
