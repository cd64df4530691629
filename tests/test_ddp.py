"""Data parallelism: N processes with batch b train exactly like one process with batch N·b."""

import signal
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file, save_file

from lit_ti.data.sampler import EpochSampler


def test_ranks_together_take_the_single_process_batch():
    n, b, world = 13, 2, 3
    single = list(EpochSampler(n, seed=5))
    shards = [list(EpochSampler(n, seed=5, rank=r, world_size=world)) for r in range(world)]
    assert all(len(s) == n // world for s in shards)
    for step in range(len(shards[0]) // b):
        together = sorted(x for s in shards for x in s[step * b : (step + 1) * b])
        assert together == sorted(single[step * b * world : (step + 1) * b * world])


def test_shards_resume_at_the_global_position():
    full = [list(EpochSampler(12, seed=1, rank=r, world_size=2)) for r in range(2)]
    resumed = [list(EpochSampler(12, seed=1, start=lambda: (0, 4), rank=r, world_size=2)) for r in range(2)]
    assert resumed == [f[2:] for f in full]


def test_two_process_ddp_equals_one_process_with_double_batch(tmp_path, cli):
    common = (
        "trainer.max_steps=5",
        "callbacks.loss_csv.every_n_steps=1",
        "data.flip_p=0.5",
        "data.latent_sampling=random",
        "callbacks.preview=null",
        "callbacks.toy_eval=null",
    )
    cli.train_ok(tmp_path / "ddp", *common, "trainer=ddp", "trainer.accelerator=cpu", "data.batch_size=2")
    cli.train_ok(tmp_path / "one", *common, "trainer=cpu", "data.batch_size=4")

    def vectors(run: str) -> torch.Tensor:
        return load_file(tmp_path / run / "toy-concept.safetensors")["emb_params"]

    assert (vectors("ddp") - vectors("one")).abs().max() <= 1e-6
    # ... after real training: the vectors moved far more than the tolerance (init "*", as the method's default)
    from lit_ti.models import DiffusersFolder
    from lit_ti.modules.text_conditioning import init_vectors
    from lit_ti.train import _asset

    bb = DiffusersFolder(_asset("toy_base")).load()
    assert (vectors("one") - init_vectors(bb.tokenizer, bb.text_encoder, "*", 2)).abs().max() > 1e-3
    csv = (tmp_path / "ddp" / "textual_inversion_loss.csv").read_text().splitlines()
    assert len(csv) == 6  # a header and steps 1-5, once each: rank 0 alone writes the loss log


class TrainedPerRank(L.Callback):
    """Each rank writes what it trained (`rank<r>.safetensors` in `dirpath`) when training ends: the run's files
    are rank 0's alone. Named by `+callbacks.per_rank._target_` in the runs below."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = dirpath

    def on_train_end(self, trainer, pl_module) -> None:
        state = {k: v.detach().cpu().contiguous() for k, v in pl_module.state_dict().items()}
        save_file(state, Path(self.dirpath) / f"rank{trainer.global_rank}.safetensors")


@pytest.mark.slow  # two `train.py` runs, one of them two processes
def test_pivotal_tuning_under_ddp_keeps_the_ranks_identical_and_equals_one_process(tmp_path, cli):
    common = (
        "method=pivotal",
        "method.ti_steps=2",  # 2 embedding steps, then 3 LoRA steps with the embedding frozen
        "method.lora_lr=0.01",
        "trainer.max_steps=5",
        "data.flip_p=0.5",
        "callbacks.preview=null",
        "callbacks.toy_eval=null",
        f"+callbacks.per_rank._target_={__name__}.TrainedPerRank",
    )
    ddp = ("trainer=ddp", "trainer.accelerator=cpu", "data.batch_size=2")
    cli.train_ok(tmp_path / "ddp", *common, *ddp, f"+callbacks.per_rank.dirpath={tmp_path / 'ddp'}")
    cli.train_ok(
        tmp_path / "one", *common, "trainer=cpu", "data.batch_size=4", f"+callbacks.per_rank.dirpath={tmp_path / 'one'}"
    )
    rank0, rank1, one = (
        load_file(tmp_path / run / f"rank{r}.safetensors") for run, r in (("ddp", 0), ("ddp", 1), ("one", 0))
    )
    lora = [k for k in rank0 if k.startswith("lora.")]
    assert lora and rank0.keys() == rank1.keys() == one.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)  # both ranks hold the same LoRA and embedding
    ups = torch.cat([rank0[k].flatten() for k in lora if ".up." in k])
    assert ups.abs().max() > 1e-3  # the LoRA trained after the switch (its up weights start at zero)
    # as one process with the double batch, to the summation order: Adam divides each entry by its own gradient
    # scale, which enlarges the order's float differences on the LoRA's near-zero first gradients
    assert max((rank0[k] - one[k]).abs().max() for k in rank0) <= 0.01 * ups.abs().max()


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(tmp_path, cli):
    """A preemption signal that reaches only rank 0 still ends both ranks, with one checkpoint, no hang."""
    proc = cli.start(
        tmp_path,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.max_steps=100000",
        "callbacks.early_stop=null",
        "callbacks.toy_eval=null",
        "callbacks.preview=null",
    )
    proc.send_signal(signal.SIGTERM)  # the launcher process is rank 0; rank 1 is its child and gets nothing
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    step = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert f"stopped by SIGTERM at step {step}" in out + err


def test_lightnings_own_distributed_sampler_is_refused(concept_dir):
    from types import SimpleNamespace

    from lit_ti.data import ConceptDataModule
    from lit_ti.errors import UserError

    dm = ConceptDataModule(str(concept_dir), name="zz-thing")
    dm.trainer = SimpleNamespace(
        world_size=2, global_rank=1, _accelerator_connector=SimpleNamespace(use_distributed_sampler=True)
    )
    with pytest.raises(UserError, match="trainer.use_distributed_sampler=false"):
        dm._shard()
    dm.trainer._accelerator_connector.use_distributed_sampler = False
    assert dm._shard() == (1, 2)
