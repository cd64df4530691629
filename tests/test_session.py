"""The user's session: what the console shows while a run trains."""

import re

FAST = ["trainer.max_steps=6", "callbacks.toy_eval=null", "callbacks.preview=null", "callbacks.model_checkpoint=null"]


def test_the_bar_counts_the_runs_steps_with_an_eta_and_a_smoothed_loss(entry):
    outcome = entry.train(
        "name=zz-concept", *FAST, "callbacks.progress.estimate_after=3", "trainer.log_every_n_steps=100"
    )
    assert outcome.code == 0, outcome.stderr[-2000:]
    screen = outcome.stdout.replace("\r", "\n")
    # step N/M of the whole run (not the epoch's batches), an ETA, a speed, and the loss between log steps
    assert re.search(r"^step 6/6 \|.*\| \d\d:\d\d<\d\d:\d\d ETA,\s+[\d.]+(it/s|s/it), loss=\d\.\d{4}$", screen, re.M), (
        screen
    )
    assert "Epoch" not in screen
    assert re.search(r"^\[lit_ti\] 6 steps at [\d.]+ it/s: about .* to go \(done near \d\d:\d\d\)$", screen, re.M)


def test_a_resumed_run_continues_the_count(entry):
    quick = ["name=zz-concept", "callbacks.toy_eval=null", "callbacks.preview=null", "save_every_n_steps=3"]
    first = entry.train(*quick, "trainer.max_steps=3")
    assert first.code == 0, first.stderr[-2000:]
    ckpt = entry.out / "checkpoints" / "last.ckpt"
    resumed = entry.train(*quick, "trainer.max_steps=5", f"ckpt_path={ckpt}")
    assert resumed.code == 0, resumed.stderr[-2000:]
    screen = resumed.stdout.replace("\r", "\n")
    assert re.search(r"^step 5/5 ", screen, re.M) and not re.search(r"^step [12]/5 ", screen, re.M), screen
