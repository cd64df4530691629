"""Sweeps from the command line: Optuna on the toy world, grids through the submitit launcher."""

import pytest
import yaml

from tests.conftest import compose
from tests.test_cli import train

optuna = pytest.importorskip("optuna", reason="the sweep extra is not installed")


def test_optuna_sweep_runs_four_trials_and_keeps_its_study(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    run = train(
        "-m",
        "hparams_search=toy_optuna",
        "hydra.sweeper.n_trials=4",
        f"hydra.sweeper.storage={storage}",
        "hydra.sweeper.study_name=toy",
        "trainer.max_steps=5",
        "callbacks.toy_eval.samples=2",
        "callbacks.model_checkpoint=null",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Best parameters" in run.stdout + run.stderr
    results = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    assert set(results["best_params"]) == {"method.optimizer.lr", "method.num_vectors"}
    study = optuna.load_study(study_name="toy", storage=storage)  # the persistent storage holds every trial
    values = [t.value for t in study.trials]
    assert len(values) == 4 and all(v is not None for v in values)
    assert results["best_value"] == pytest.approx(max(values))  # maximised: the best is the largest recovery
    assert len({round(v, 6) for v in values}) > 1  # the parameters changed the objective


def test_a_run_through_the_submitit_launcher(tmp_path):
    run = train(
        "-m",
        "cluster=local",
        "method.optimizer.lr=0.02",  # one job (grids are tested in test_cli): the launcher path is the point
        "trainer.max_steps=2",
        "callbacks.preview=null",
        "callbacks.toy_eval=null",
        f"hydra.sweep.dir={tmp_path}",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "0" / "toy-concept.safetensors").is_file()
    assert yaml.safe_load((tmp_path / "0" / ".hydra" / "config.yaml").read_text())["method"]["optimizer"]["lr"] == 0.02
    assert list((tmp_path / ".submitit").glob("*/*_result.pkl"))  # the job went through submitit


def test_slurm_config_runs_one_ddp_task_per_gpu():
    cfg = compose("cluster=slurm", "trainer.devices=8", "trainer.num_nodes=2", hydra=True)
    assert cfg.trainer.strategy == "ddp"
    assert cfg.trainer.use_distributed_sampler is False
    launcher = cfg.hydra.launcher
    assert "submitit" in launcher._target_ and "Slurm" in launcher._target_
    assert (launcher.tasks_per_node, launcher.gpus_per_node, launcher.nodes) == (8, 8, 2)
