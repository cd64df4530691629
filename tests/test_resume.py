"""Interrupted (SIGINT/SIGTERM) and resumed runs end exactly where an uninterrupted run ends."""

import os
import signal
import time
from functools import partial

import lightning as L
import pytest
import torch

from lit_ti import io
from lit_ti.callbacks import EarlyStop, GracefulStop
from lit_ti.methods import DreamArtist, HypernetworkMethod, PivotalTuning
from tests.conftest import NAME

DA = dict(
    method_cls=DreamArtist,
    num_vectors=2,
    neg_num_vectors=3,
    neg_init_text="ugly blurry",
    ema_decay=0.9,
    neg_ema_decay=0.8,
    ema_reset_every=3,
)
HN = dict(
    method_cls=HypernetworkMethod,
    base_kw={"name": NAME},
    optimizer=partial(torch.optim.AdamW, lr=1e-3),
    dropout_structure=[0, 0.3, 0],
)
PV = dict(method_cls=PivotalTuning, ti_steps=4, lora_lr=1e-2, dropout=0.1, embedding_lr_after=0.5)
# every source of randomness on: flips, tag shuffling, a fresh latent sample per visit
DATA = dict(flip_p=0.5, latent_sampling="random", shuffle_tags=True, template="subject_filewords")


class SignalAt(L.Callback):
    """Sends this process a real signal at the end of optimizer step `step`."""

    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and not trainer.fit_loop.epoch_loop._should_accumulate():
            os.kill(os.getpid(), self.signum)


def trained_state(method) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in method.state_dict().items()}


@pytest.mark.parametrize(
    ("kw", "accumulate", "stop_at", "signum"),
    [
        ({}, 1, 6, signal.SIGINT),  # 4 batches per epoch: step 6 is mid-epoch 1
        ({}, 2, 3, signal.SIGTERM),  # mid-epoch and between accumulation groups
        ({"trainer_kw": {"limit_train_batches": 3}}, 1, 5, signal.SIGINT),  # epochs cut to 3 batches
        (DA, 1, 5, signal.SIGTERM),  # with EMA (reset every 3) on both embeddings
        (HN, 1, 7, signal.SIGINT),  # hypernetwork with dropout
        (PV, 2, 3, signal.SIGTERM),  # pivotal: stopped in the embedding phase, resumed across the switch
    ],
    ids=["ti", "ti-accumulate", "ti-limited-epochs", "dreamartist-ema", "hypernetwork", "pivotal"],
)
def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, concept_dir, kw, accumulate, stop_at, signum, fit):
    steps = 10
    common = dict(max_steps=steps, every=100, accumulate=accumulate, dm_kw=DATA, **kw)
    straight, _ = fit(tmp_path / "straight", concept_dir, **common)

    stop = GracefulStop(str(tmp_path / "unused"))
    stopped, trainer = fit(tmp_path / "run", concept_dir, extra_callbacks=[SignalAt(stop_at, signum), stop], **common)
    assert stop.received == signum and trainer.global_step == stop_at
    assert stop.checkpoint == tmp_path / "run" / "checkpoints" / "last.ckpt" and stop.checkpoint.is_file()
    assert signal.getsignal(signum) is not stop._handle  # handlers are put back after training
    final = next((tmp_path / "run").glob("zz-thing.*"))  # the final files were written at the stop
    assert io.load_embedding(final) if final.suffix != ".pt" or kw is not HN else io.load_hypernetwork(final)

    resumed, trainer = fit(tmp_path / "run", concept_dir, ckpt_path=stop.checkpoint, **common)
    assert trainer.global_step == steps
    a, b = trained_state(straight), trained_state(resumed)
    assert a.keys() == b.keys() and a
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 1e-6, f"resumed run differs from the uninterrupted one by {worst}"
    assert not torch.equal(a[next(iter(a))], trained_state(stopped)[next(iter(a))])  # it did train after the stop


class LearnedAtThree(EarlyStop):
    """The verdict at the 3rd measurement (step 3), so that the cooldown (steps 4-7) is where a run stops."""

    def stops(self, snapshots):
        return len(self.values) >= 3


def test_a_run_stopped_in_its_cooldown_resumes_to_the_same_end(tmp_path, concept_dir, fit):
    """The lowered rates and the cooldown's end survive a resume: neither lowered twice nor forgotten."""

    def early():
        return LearnedAtThree(every_n_steps=1, min_steps=0, draws=1, cooldown_steps=4, cooldown_factor=0.1)

    common = dict(max_steps=40, every=100, dm_kw=DATA)
    straight, trainer = fit(tmp_path / "straight", concept_dir, extra_callbacks=[early()], **common)
    assert trainer.global_step == 7
    stop = GracefulStop(str(tmp_path / "unused"))
    fit(tmp_path / "run", concept_dir, extra_callbacks=[SignalAt(5, signal.SIGINT), stop, early()], **common)
    assert stop.received == signal.SIGINT and stop.checkpoint.is_file()
    resumed_stop = early()
    resumed, trainer = fit(
        tmp_path / "run", concept_dir, ckpt_path=stop.checkpoint, extra_callbacks=[resumed_stop], **common
    )
    assert trainer.global_step == 7 and resumed_stop.cooldown_from == 3 and "step 7's tensors" in resumed_stop.reason
    a, b = trained_state(straight), trained_state(resumed)
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 1e-6, f"resumed run differs from the uninterrupted one by {worst}"


class SignalInPreview(L.Callback):
    """Sends SIGTERM from inside the preview's sampling at step `step`, as if a slow sampler were mid-way."""

    def __init__(self, step: int) -> None:
        self.step, self.sampling_finished = step, None

    def on_train_start(self, trainer, pl_module) -> None:
        sample = pl_module.sample

        def slow_sample(*args, **kwargs):
            if trainer.global_step == self.step:
                self.sampling_finished = False
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(60)  # minutes of sampling on a real model: the stop must not wait for them
                self.sampling_finished = True
            return sample(*args, **kwargs)

        pl_module.sample = slow_sample


def test_a_signal_during_a_preview_gives_it_up_and_stops_at_that_step(tmp_path, concept_dir, fit):
    stop, signal_in = GracefulStop(str(tmp_path / "unused")), SignalInPreview(step=6)
    start = time.monotonic()
    _, trainer = fit(tmp_path, concept_dir, max_steps=12, every=3, extra_callbacks=[signal_in, stop])
    assert time.monotonic() - start < 50 and signal_in.sampling_finished is False
    assert stop.received == signal.SIGTERM and trainer.global_step == 6 and stop.checkpoint.is_file()
    previews = sorted(p.name for p in (tmp_path / "previews").glob("*.png"))
    assert previews == [f"{NAME}-3.png"]  # step 6's was given up, and nothing half-written stays
    assert torch.load(stop.checkpoint, weights_only=True)["global_step"] == 6
