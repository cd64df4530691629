"""A run's results: its final metrics as `metrics.json`, TensorBoard's HParams table and a "results" text.

TensorBoard shows the runs of a sweep side by side on its HParams page only when each run logged its
hyperparameters together with metrics. The final values are logged as `final/<metric>` (`final/train/loss`):
under their own names they would add a stray point to the curves of `train/loss` and `val/loss`.
"""

import json
import math

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from lit_ti.callbacks.interrupt import interrupted
from lit_ti.io.atomic import atomic_path
from lit_ti.io.paths import WriteFailed

SMOOTHING = 0.98  # train/loss is averaged over the last ~50 batches: one batch's loss is mostly timestep noise
FILENAME = "metrics.json"
# the metrics that tell runs apart, listed first (TensorBoard's HParams table shows 5 metric columns at first)
HEADLINE = ("val/loss", "eval/recovery", "eval/accuracy", "eval/style_rate")
# (config key, hparam name): the settings that tell runs apart; every command-line override is added
PARAMS = (
    ("method.optimizer.lr", "lr"),
    ("method.num_vectors", "num_vectors"),
    ("trainer.max_steps", "max_steps"),
    ("data.batch_size", "batch_size"),
    ("seed", "seed"),
)


def run_params(cfg) -> tuple[dict[str, object], list[str]]:
    """The run's hyperparameters, flat: method, name, model, the PARAMS and each key overridden on the command line
    (its resolved value when it is a plain value, else what was typed); and the names of the overridden ones."""
    from omegaconf import OmegaConf

    try:
        from hydra.core.hydra_config import HydraConfig

        hydra = HydraConfig.get()
        choices, overrides = hydra.runtime.choices, list(hydra.overrides.task)
    except ValueError:  # not a command-line run
        choices, overrides = {}, []
    params: dict[str, object] = {
        "method": choices.get("method") or OmegaConf.select(cfg, "method._target_", default="").rsplit(".")[-1],
        "name": cfg.get("name"),
        "model": choices.get("model") or OmegaConf.select(cfg, "model._target_", default=""),
    }
    named = dict(PARAMS) | {k: k for k in ("name", "method", "model")}
    for key, name in PARAMS:
        params[name] = OmegaConf.select(cfg, key, default=None)
    overridden = []
    for text in overrides:
        key, _, typed = text.lstrip("+~").partition("=")
        if key.startswith("hydra.") or key == "ckpt_path":
            continue
        overridden.append(named.get(key, key))
        if key not in named:
            value = OmegaConf.select(cfg, key, default=None)
            params[key] = value if isinstance(value, bool | int | float | str) else typed
    params = {k: v for k, v in params.items() if v is not None}
    return params, [k for k in dict.fromkeys(overridden) if k in params]


class RunResults(L.Callback):
    """At the end of training (also a stopped one): the final metrics (smoothed `train/loss`, `val/loss`, every
    `eval/*`) written to `<dirpath>/metrics.json` and logged with `params` to each TensorBoard logger (HParams
    page, `final/*` scalars, a "results" text). Added by lit_ti.train after the configured callbacks, so that
    the end-of-run evaluations have run."""

    def __init__(self, dirpath, params: dict[str, object], overridden: list[str] = ()) -> None:
        from pathlib import Path

        self.path = Path(dirpath) / FILENAME
        self.params = params
        self.overridden = list(overridden)
        self.loss = None  # the exponential moving average of the batch loss (a device tensor: no sync per step)
        self.weight = 0.0  # for the bias correction of the first steps
        self.metrics: dict[str, float] = {}
        self.status = "finished"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        loss = loss.detach().float()
        self.loss = loss * (1 - SMOOTHING) if self.loss is None else self.loss * SMOOTHING + loss * (1 - SMOOTHING)
        self.weight = self.weight * SMOOTHING + (1 - SMOOTHING)

    @rank_zero_only
    def on_train_end(self, trainer, pl_module) -> None:
        self.status = "interrupted" if interrupted(trainer) else "finished"
        self.metrics = final_metrics(trainer, None if self.loss is None else float(self.loss) / self.weight)
        try:
            with atomic_path(self.path) as tmp:
                record = {"status": self.status, "step": trainer.global_step, "metrics": self.metrics}
                tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        except WriteFailed as e:
            rank_zero_warn(f"{e}. The run's results are in TensorBoard and on the console only")
        final = {f"final/{k}": v for k, v in self.metrics.items()}
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                log_hparams(logger, self.params, final or {"final/step": trainer.global_step}, self.overridden)
                logger.experiment.add_text("results", results_table(self.params, self.metrics), trainer.global_step)

    def lines(self) -> list[str]:
        """The end summary's lines, one per metric."""
        return [f"{k}{' (smoothed)' if k == 'train/loss' else ''} = {v:.4f}" for k, v in self.metrics.items()]


def log_hparams(logger: TensorBoardLogger, params: dict, metrics: dict, first: list[str]) -> None:
    """`logger.log_hyperparams(params, metrics)`, with the `first` params marked as the ones that differ between
    runs: TensorBoard's HParams table shows 5 columns at first, those that differ first (else alphabetically),
    and it takes the table's columns from one run's record, so that it cannot tell which keys a sweep varied."""
    from tensorboard.plugins.hparams import plugin_data_pb2
    from torch.utils.tensorboard.summary import hparams

    logger.hparams.update(params)  # hparams.yaml, as log_hyperparams keeps it
    experiment, start, end = hparams(params, metrics)
    value = experiment.value[0]
    data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
    for info in data.experiment.hparam_infos:
        info.differs = info.name in first
    value.metadata.plugin_data.content = data.SerializeToString()
    writer = logger.experiment._get_file_writer()
    for summary in (experiment, start, end):
        writer.add_summary(summary)
    logger.log_metrics(metrics, step=0)


def final_metrics(trainer, smoothed_loss: float | None) -> dict[str, float]:
    """`train/loss` (smoothed), `val/loss` when measured, and the `eval/*` of the end-of-run evaluations."""
    out = {"train/loss": smoothed_loss} if smoothed_loss is not None else {}
    for key, value in sorted(trainer.callback_metrics.items(), key=lambda kv: (kv[0] not in HEADLINE, kv[0])):
        if key == "val/loss" or key.startswith("eval/"):
            out[key] = float(value)
    return {k: v for k, v in out.items() if math.isfinite(v)}


def results_table(params: dict[str, object], metrics: dict[str, float]) -> str:
    """A markdown table (TensorBoard renders text entries as markdown): the metrics, then the settings."""

    def cell(value: object) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    rows = [f"| {k} | {v:.4f} |" for k, v in metrics.items()]
    rows += [f"| {cell(k)} | {cell(v)} |" for k, v in params.items()]
    return "\n".join(["| | |", "|---|---|", *rows])
