"""A damaged or foreign checkpoint, and a disk that fails mid-run, are one line: no traceback, no hostile
pickle run, nothing outside the run folder touched (the `entry` fixture), and a resume writes what a failure
left out."""

import errno
import os
import pickle
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch

from lit_ti import io
from lit_ti.io import checkpoint_io
from tests.trust_harness import CKPT, QUICK, nothing_left, one_error


# ---------------------------------------------------------------- 4a. damaged or foreign checkpoints
def _zip_pickle(path: Path, payload: bytes) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", payload)
        zf.writestr("archive/version", "3\n")


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def _bad_checkpoint(kind: str, folder: Path, good: Path) -> Path:
    path = folder / f"{kind}.ckpt"
    if kind == "truncated":
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "random-bytes":
        path.write_bytes(os.urandom(4096))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "safetensors":
        from safetensors.torch import save_file

        save_file({"emb_params": torch.zeros(1, 8)}, path)
    elif kind == "embedding":
        torch.save({"string_to_param": {"*": torch.zeros(1, 8)}, "name": "x"}, path)
    elif kind == "other-program":  # an SD checkpoint is a Lightning checkpoint too
        torch.save(
            {"state_dict": {"model.diffusion_model.w": torch.zeros(2)}, "global_step": 470000,
             "pytorch-lightning_version": "1.4.2"},
            path,
        )  # fmt: skip
    elif kind == "code":
        _zip_pickle(path, pickle.dumps({"state_dict": _Evil()}, protocol=2))
    elif kind == "flipped-byte":
        data = bytearray(good.read_bytes())
        with zipfile.ZipFile(good) as zf:
            member = next(i for i in zf.infolist() if "/data/" in i.filename)
        at = member.header_offset + 30 + len(member.filename)  # local header, then torch's alignment padding
        data[at + int.from_bytes(data[member.header_offset + 28 : member.header_offset + 30], "little")] ^= 0xFF
        path.write_bytes(bytes(data))
    elif kind == "dir":
        path.mkdir()
    return path


BAD = {
    "truncated": "truncated, damaged or another format",
    "random-bytes": "truncated, damaged or another format",
    "empty": "truncated, damaged or another format",
    "safetensors": "truncated, damaged or another format",
    "embedding": "not a Lightning checkpoint",
    "other-program": "another program's checkpoint",
    "code": "refused: loading it would call posix.system",
    "flipped-byte": "damaged (bad data in",
    "dir": "no such checkpoint",
}


@pytest.mark.parametrize("kind", BAD)
def test_a_damaged_or_foreign_checkpoint_is_one_line(entry, checkpoint, kind, tmp_path_factory):
    bad = _bad_checkpoint(kind, tmp_path_factory.mktemp(kind), checkpoint)
    cwd = Path.cwd()
    os.chdir(bad.parent)  # where the hostile pickle would write, were it ever run
    try:
        outcome = entry.train("name=zz-concept", *QUICK, f"ckpt_path={bad}")
    finally:
        os.chdir(cwd)
    one_error(outcome, f"ckpt_path={bad}", BAD[kind])
    assert not (bad.parent / "pwned").exists()
    nothing_left(outcome)


def test_an_oversized_pickle_is_refused_unread(tmp_path, monkeypatch, checkpoint):
    monkeypatch.setattr(checkpoint_io, "MAX_PICKLE", 64)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("the pickle was read"))
    with pytest.raises(io.paths.UserError, match="refused unread: its pickle is"):
        checkpoint_io.read_checkpoint(checkpoint)


# ---------------------------------------------------------------- 4b. the user's world fails
@pytest.fixture
def failing(monkeypatch):
    """`failing(errno, where)`: every atomic write whose target path contains `where` fails at fsync with
    `errno` (where delayed allocation makes a full disk show up); returns the paths that failed."""
    failed: list[str] = []
    fsync = os.fsync

    def install(code: int, where: str):
        def broken(fd):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if where in target:
                failed.append(target)
                raise OSError(code, os.strerror(code))
            return fsync(fd)

        monkeypatch.setattr(os, "fsync", broken)
        return failed

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc")
    return install


def test_a_periodic_export_on_a_full_disk_warns_and_training_goes_on(entry, failing):
    failed = failing(errno.ENOSPC, "/embeddings/")
    outcome = entry.train("name=zz-concept", *QUICK, "callbacks.export.every_n_steps=1")
    assert outcome.code == 0 and failed, outcome.stderr[-2000:]
    warned = [w for w in outcome.warnings if "No space left on device" in w]
    assert warned and "zz-concept-1." in warned[0] and "Training goes on" in warned[0]
    assert io.load_embedding(outcome.out / "zz-concept.safetensors")
    assert not list(outcome.out.rglob("*.tmp"))


@pytest.mark.parametrize(
    ("code", "fix"),
    [(errno.ENOSPC, "free space"), (errno.EROFS, "read-only"), (errno.ENAMETOOLONG, "too long")],
    ids=["ENOSPC", "EROFS", "ENAMETOOLONG"],
)
def test_a_failing_final_export_is_one_line_and_a_resume_writes_it(entry, failing, monkeypatch, code, fix):
    failing(code, "/.zz-concept.pt.lit_ti-")  # the temp file of the final .pt
    outcome = entry.train("name=zz-concept", *QUICK, *CKPT)
    last = outcome.out / "checkpoints" / "last.ckpt"
    one_error(outcome, "zz-concept.pt: could not be written", fix, f"ckpt_path={last}")
    assert torch.load(last, weights_only=True)["global_step"] == 2  # the trained state survived
    assert not (outcome.out / "zz-concept.pt").exists()

    monkeypatch.undo()  # space freed: the printed resume (at the last step, no step to run) writes the files
    resumed = entry.train("name=zz-concept", *QUICK, *CKPT, f"ckpt_path={last}")
    assert resumed.code == 0 and io.load_embedding(outcome.out / "zz-concept.pt"), resumed.stderr[-2000:]


def test_the_final_files_come_from_a_resume_at_the_last_step(entry, checkpoint):
    outcome = entry.train("name=zz-concept", *QUICK, f"ckpt_path={checkpoint}")
    assert outcome.code == 0, outcome.stderr[-2000:]
    assert io.load_embedding(outcome.out / "zz-concept.pt")["zz-concept"].shape[0] == 2


def test_a_checkpoint_on_a_full_disk_stops_with_the_last_one_intact(entry, failing):
    failing(errno.ENOSPC, "step2.ckpt")
    outcome = entry.train("name=zz-concept", *QUICK, *CKPT)
    last = outcome.out / "checkpoints" / "last.ckpt"
    one_error(outcome, "step2.ckpt: could not be written (No space left on device)", f"ckpt_path={last}")
    assert torch.load(last, weights_only=True)["global_step"] == 1


def test_loss_rows_and_previews_on_a_full_disk_warn(entry, monkeypatch, failing):
    failing(errno.ENOSPC, "/previews/")
    real_open = open

    def full_open(file, mode="r", *args, **kwargs):
        if str(file).endswith("loss.csv") and "a" in mode:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", full_open)
    quick = [q for q in QUICK if q != "callbacks.preview=null"]
    outcome = entry.train(
        "name=zz-concept", *quick, "callbacks.preview.num_inference_steps=1", "callbacks.loss_csv.every_n_steps=1"
    )
    assert outcome.code == 0, outcome.stderr[-2000:]
    assert sum("textual_inversion_loss.csv: could not be written" in w for w in outcome.warnings) == 1
    assert any("/previews/zz-concept-2.png: could not be written" in w for w in outcome.warnings)
    assert (outcome.out / "zz-concept.safetensors").is_file()


def test_a_read_only_run_folder_is_one_line(entry, monkeypatch):
    mkstemp = tempfile.mkstemp

    def read_only(*args, **kwargs):
        if str(kwargs.get("dir", "")).startswith(str(entry.out)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return mkstemp(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    one_error(entry.train("name=zz-concept", *QUICK), str(entry.out), "read-only", "writable hydra.run.dir")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_chmod_read_only_run_folder_is_one_line(entry):
    entry.out.mkdir(parents=True)
    entry.out.chmod(0o555)
    try:
        one_error(entry.train("name=zz-concept", *QUICK), str(entry.out), "no permission")
    finally:
        entry.out.chmod(0o755)
