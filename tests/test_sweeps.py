"""Sweeps from the command line: Optuna on the toy world, grids through the submitit launcher."""

import csv
import json

import pytest
import yaml

from tests.conftest import compose

optuna = pytest.importorskip("optuna", reason="the sweep extra is not installed")


@pytest.mark.slow  # a whole experiment in a process: CI runs the slow lane of this module
def test_optuna_sweep_runs_four_trials_and_keeps_its_study(tmp_path, cli):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    run = cli.train(
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


@pytest.mark.slow  # a job through submitit (15 s); CI runs this module's slow lane
def test_a_run_through_the_submitit_launcher(tmp_path, cli):
    run = cli.train(
        "-m",
        "cluster=local",
        "method.optimizer.lr=0.02",  # one job (grids are tested in test_cli): the launcher path is the point
        "trainer.max_steps=2",
        "callbacks.preview=null",
        "callbacks.toy_eval=null",
        f"hydra.sweep.dir={tmp_path}",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    [job] = [p for p in tmp_path.iterdir() if p.name.startswith("0-")]
    assert (job / "toy-concept.safetensors").is_file()
    assert yaml.safe_load((job / ".hydra" / "config.yaml").read_text())["method"]["optimizer"]["lr"] == 0.02
    assert list((tmp_path / ".submitit").glob("*/*_result.pkl"))  # the job went through submitit


def test_slurm_config_runs_one_ddp_task_per_gpu():
    cfg = compose("cluster=slurm", "trainer.devices=8", "trainer.num_nodes=2", hydra=True)
    assert cfg.trainer.strategy == "ddp"
    assert cfg.trainer.use_distributed_sampler is False
    launcher = cfg.hydra.launcher
    assert "submitit" in launcher._target_ and "Slurm" in launcher._target_
    assert (launcher.tasks_per_node, launcher.gpus_per_node, launcher.nodes) == (8, 8, 2)


@pytest.mark.slow  # a whole experiment in a process: CI runs the slow lane of this module
def test_a_two_job_sweep_writes_its_summary_and_hparams_with_metrics(tmp_path, cli):
    run = cli.train(
        "-m", "seed=0,1", "trainer.max_steps=4", "callbacks.toy_eval.samples=2", f"hydra.sweep.dir={tmp_path}"
    )
    assert run.returncode == 0, run.stderr[-3000:]
    with open(tmp_path / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["seed"], r["status"]) for r in rows] == [("0", "finished"), ("1", "finished")]
    for row in rows:  # folders say the method and the values; the metrics are each job's own
        assert row["job"].startswith(f"{row['seed']}-textual_inversion-seed={row['seed']},")
        record = json.loads((tmp_path / row["job"] / "metrics.json").read_text())
        assert float(row["eval/recovery"]) == pytest.approx(record["metrics"]["eval/recovery"], rel=1e-5)
        assert float(row["train/loss"]) > 0
        hparams = _hparams(tmp_path / row["job"] / "tensorboard")
        assert hparams["seed"] == int(row["seed"]) and hparams["method"] == "textual_inversion"
        assert {"final/train/loss", "final/eval/recovery", "final/eval/accuracy"} <= hparams["metrics"]
        assert hparams["first"] == {"seed", "max_steps", "callbacks.toy_eval.samples"}  # what the command line set
    assert "sweep summary" in run.stdout and rows[1]["job"] in run.stdout  # printed as a table too


def _hparams(logdir) -> dict:
    """What TensorBoard's HParams page reads from a run: its settings and the names of its metrics."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = EventAccumulator(str(logdir)).Reload().PluginTagToContent("hparams")
    data = {tag: plugin_data_pb2.HParamsPluginData.FromString(raw) for tag, raw in content.items()}
    start = data["_hparams_/session_start_info"].session_start_info.hparams
    out = {k: v.number_value if v.HasField("number_value") else v.string_value for k, v in start.items()}
    experiment = data["_hparams_/experiment"].experiment
    out["metrics"] = {m.name.tag for m in experiment.metric_infos}
    out["first"] = {h.name for h in experiment.hparam_infos if h.differs}  # the columns shown first
    return out


def test_the_summary_lists_a_failed_job_beside_the_finished_ones(tmp_path):
    from lit_ti.sweep_summary import read_rows, update

    done = tmp_path / "0-textual_inversion-seed=0"
    (done / ".hydra").mkdir(parents=True)
    (done / ".hydra" / "overrides.yaml").write_text("- seed=0\n")
    (done / "metrics.json").write_text(json.dumps({"status": "interrupted", "metrics": {"train/loss": 0.5}}))
    failed = {"1-textual_inversion-seed=1": {"job": "1-textual_inversion-seed=1", "status": "failed", "seed": "1"}}
    update(tmp_path, failed)
    update(tmp_path)  # a later job's update keeps the failed row
    rows = read_rows(tmp_path)
    assert rows["0-textual_inversion-seed=0"] == {
        "job": "0-textual_inversion-seed=0",
        "status": "interrupted",
        "seed": "0",
        "train/loss": "0.5",
    }
    assert rows["1-textual_inversion-seed=1"]["status"] == "failed"
