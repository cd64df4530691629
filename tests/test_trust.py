"""The trust rules (see Entry in conftest): the harness itself, then the cases it guards."""

import pytest

FAST = ["trainer.max_steps=1", "callbacks.toy_eval=null", "callbacks.preview=null", "callbacks.model_checkpoint=null"]


def test_harness_sees_a_write_outside_the_run_folder(entry):
    stray = entry.root / "model.pt"
    with pytest.raises(AssertionError, match="outside the run folder"):
        entry._guarded(entry.out, lambda: stray.write_bytes(b"x"))


def test_harness_sees_a_deleted_user_file(entry):
    entry.out.mkdir(parents=True)
    mine = entry.out / "notes.txt"
    mine.write_text("mine")
    with pytest.raises(AssertionError, match="deleted"):
        entry._guarded(entry.out, mine.unlink)


def test_harness_runs_a_clean_training(entry):
    outcome = entry.train("name=zz-concept", *FAST)
    assert outcome.code == 0 and not outcome.errors
    assert (outcome.out / "zz-concept.safetensors").is_file()
