"""After `python train.py -m ...`: `<sweep>/summary.csv`, one row per job, and the same table printed.

A row holds the job's folder, its status (finished / interrupted / failed), one column per overridden key and
the job's final metrics (its `metrics.json`, see lit_ti.callbacks.results). The file is rewritten after every
job, so a failed job (Hydra then skips `on_multirun_end`) or a Ctrl-C (the process exits from inside the job)
still leaves the table of every job so far.
"""

import atexit
import csv
import io
import json
from pathlib import Path

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from lit_ti.callbacks.results import FILENAME as METRICS
from lit_ti.io import paths
from lit_ti.io.atomic import atomic_path

FILENAME = "summary.csv"


def _overrides(texts) -> dict[str, str]:
    pairs = (str(t).lstrip("+~").partition("=") for t in texts or ())
    return {key: value for key, sep, value in pairs if sep and not key.startswith("hydra.")}


def _failed(folder: Path, overrides) -> dict[str, dict[str, str]]:
    return {folder.name: {"job": folder.name, "status": "failed", **_overrides(overrides)}}


def job_row(folder: Path) -> dict[str, str] | None:
    """A job folder's row from what the run wrote (None when it never began training)."""
    record = folder / ".hydra" / "overrides.yaml"
    if not record.is_file():
        return None
    row = {"job": folder.name, "status": "failed", **_overrides(OmegaConf.load(record))}
    if (folder / METRICS).is_file():
        result = json.loads((folder / METRICS).read_text())
        row["status"] = result.get("status", "finished")
        row.update({k: f"{v:.6g}" for k, v in result.get("metrics", {}).items()})
    return row


def read_rows(sweep: Path) -> dict[str, dict[str, str]]:
    """The summary so far, keyed by job folder."""
    path = sweep / FILENAME
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        return {row["job"]: {k: v for k, v in row.items() if v} for row in csv.DictReader(f)}


def update(sweep: Path, failed: dict[str, dict[str, str]] | None = None) -> list[dict[str, str]]:
    """Rewrite `<sweep>/summary.csv` from the job folders (and the failed jobs, which may have none); return
    its rows in job order."""
    rows = read_rows(sweep)
    rows.update(failed or {})
    for folder in sorted(p for p in (sweep.iterdir() if sweep.is_dir() else ()) if p.is_dir()):
        if (row := job_row(folder)) is not None and rows.get(folder.name, {}).get("status") != "failed":
            rows[folder.name] = row
    ordered = sorted(rows.values(), key=lambda r: (len(r["job"].split("-")[0]), r["job"]))  # 2 before 10
    columns = list(dict.fromkeys(k for r in ordered for k in r))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(ordered)
    with paths.run_folder(sweep), atomic_path(sweep / FILENAME) as tmp:
        tmp.write_text(text.getvalue(), encoding="utf-8")
    return ordered


def table(rows: list[dict[str, str]]) -> str:
    """The rows as aligned text columns."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    cells = [columns] + [[r.get(c, "") for c in columns] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in cells)


class SweepSummary(Callback):
    """Hydra callback (configs/hydra/default.yaml: `hydra.callbacks.sweep_summary`)."""

    def __init__(self) -> None:
        self.sweep: Path | None = None
        self.printed = False
        self.current: tuple[Path, list[str]] | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self.sweep = Path(config.hydra.sweep.dir).absolute()
        atexit.register(self._at_exit)  # a Ctrl-C inside a job exits the process from there

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        # the job in flight: a user error in it exits the whole process (status 2) without on_job_end
        self.current = (Path(config.hydra.runtime.output_dir), list(config.hydra.overrides.task))

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs) -> None:
        self.current = None
        if self.sweep is None:
            return  # a single run
        failed = {}
        if job_return.status == JobStatus.FAILED:
            failed = _failed(Path(job_return.hydra_cfg.hydra.runtime.output_dir), job_return.overrides)
        update(self.sweep, failed)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        self._print(update(self.sweep))

    def _at_exit(self) -> None:
        if self.printed or self.sweep is None:
            return
        failed = {}
        if self.current is not None and not (self.current[0] / METRICS).is_file():  # exited mid-job, not stopped
            failed = _failed(*self.current)
        self._print(update(self.sweep, failed))

    def _print(self, rows: list[dict[str, str]]) -> None:
        self.printed = True
        if rows:
            print(f"\n[lit_ti] sweep summary: {self.sweep / FILENAME}\n{table(rows)}", flush=True)
