"""Replay early-stopping rules on logged toy runs and score what each would ship.

    python train.py toy_concept=orange_cross seed=2 callbacks.preview=null callbacks.toy_eval=null \
        callbacks.early_stop.min_steps=100000 callbacks.export.every_n_steps=10 trainer.max_steps=600
    python benchmarks/early_stop_replay.py outputs/<run>:orange_cross:2 ... --json replay.json

Such a run logs `val/loss` every 10 steps and keeps a copy of the vectors every 10 steps, and never stops. Since
measuring `val/loss` does not change training (its noise has its own seed) and the rate is constant, one run
gives the stop step of every rule exactly (`lit_ti.callbacks.early_stop.learned`, what the callback calls).

For each run and rule it scores, with the toy evaluation of `evaluate.py` (recovery / accuracy on 32 samples):
* `last`: the vectors at the stop step (what the callback ships);
* `mean<k>`: the mean of the copies at the last k measurements up to the stop (tail averaging);
and as references the copy at the last step, the mean of the last 12 copies of the run, and the best copy
among every `--every` steps (by accuracy, then recovery).

With `--measures FILE` (what `benchmarks/stop_measures.py` wrote for these runs) the rules also run on other
loss series than the logged `val/loss`: held-out renders, and the training renders' loss restricted to a
timestep range or weighted in x0 space (`measures`); each measure × rule is scored as above.
"""

import argparse
import json
import os
import re
import tempfile
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

RULES = {  # name -> learned()'s arguments (the callback's defaults, and the drift setting of docs/results.md)
    "loss": {"window": 6, "ratio": 0.15},
    "drift": {"window": 6, "ratio": 0.15, "max_drift": 1.4, "drift_window": 12},
}
MIN_STEPS = 60
HIGH_T = 500  # the noisier half of the schedule: where a sample's colour and shape are decided


def measures(scores: dict, alphas_cumprod) -> dict[str, float]:
    """Candidate stop measures of one copy from its per-draw losses (`stop_measures.score_copy`)."""
    out = {}
    for part in ("train", "heldout"):
        grid, t = scores[f"{part}/grid"], scores[f"{part}/grid_t"]  # [images, draws] each
        out[part] = float(scores[f"{part}/callback"].mean())  # train: the logged val/loss
        out[f"{part}_t200"] = float(grid[t >= 200].mean())  # the toy methods' training range
        out[f"{part}_t{HIGH_T}"] = float(grid[t >= HIGH_T].mean())
        a = alphas_cumprod[t]
        out[f"{part}_x0"] = float((grid * (1 - a) / a).mean())  # ε-MSE · σ²/α²: the x0 error
    return out


def val_losses(run: Path) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found = {}
    for events in run.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        if "val/loss" in acc.Tags()["scalars"]:
            found.update({e.step: e.value for e in acc.Scalars("val/loss")})
    return found


def copies(run: Path) -> dict[int, Path]:
    return {int(m.group(1)): p for p in run.glob("embeddings/*.safetensors") if (m := re.search(r"-(\d+)\.", p.name))}


def flat(path: Path):
    import torch
    from safetensors.torch import load_file

    return torch.cat([t.float().flatten() for _, t in sorted(load_file(path).items())])


def stop_step(losses: dict[int, float], flats: dict, rule: dict) -> int | None:
    from lit_ti.callbacks.early_stop import learned

    values, snapshots = [], []
    for step in sorted(losses):
        values.append(losses[step])
        snapshots.append(flats[step])
        if step >= MIN_STEPS and learned(values, snapshots, **rule):
            return step
    return None


def mean_file(files: list[Path], out: Path) -> Path:
    """The element-wise mean of embedding files (same keys), metadata of the last."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    tensors = [load_file(f) for f in files]
    mean = {k: torch.stack([t[k].float() for t in tensors]).mean(0).to(tensors[-1][k].dtype) for k in tensors[-1]}
    with safe_open(files[-1], "pt") as f:
        metadata = f.metadata()
    save_file(mean, out, metadata=metadata)
    return out


def score(path: Path, concept: str, samples: int) -> list[float]:
    from lit_ti.toy.evaluation import evaluate_file

    s = evaluate_file(str(path), concept, samples, extras=False)
    return [round(s["recovery"], 3), round(s["accuracy"], 3)]


def logged(run: Path, series=None) -> tuple[dict, dict, list[int], dict]:
    """A run's copies, its loss series (the logged `val/loss` unless `series` is given), the steps that have
    both, and each such copy's flat tensors (read once for every rule)."""
    files = copies(run)
    series = series or {"loss": val_losses(run)}
    steps = sorted(s for s in next(iter(series.values())) if s in files)
    return files, series, steps, {s: flat(files[s]) for s in steps}


def replay(
    run: Path, concept: str, samples: int, every: int, means: list[int], tmp: Path, series=None, rules=RULES
) -> dict:
    """Score `run`'s stops under every rule, on its logged `val/loss` or on each of `series` ({measure: {step:
    loss}}); every copy is scored once however many rules stop on it."""
    files, series, steps, flats = logged(run, series)
    scored: dict[int, list[float]] = {}

    def at(step: int) -> list[float]:
        if step not in scored:
            scored[step] = score(files[step], concept, samples)
        return scored[step]

    last = steps[-1]
    out = {"last_step": last, "at_last": at(last)}
    if means:
        tail = [files[s] for s in steps[-12:]]
        out["mean12_at_last"] = score(mean_file(tail, tmp / f"{run.name}-tail.safetensors"), concept, samples)
    periodic = {s: at(s) for s in steps if every > 0 and s % every == 0}
    if periodic:
        best = max(periodic, key=lambda s: (periodic[s][1], periodic[s][0]))
        out["periodic"], out["best"] = periodic, [best, *periodic[best]]
    for measure, losses in series.items():
        for name, rule in rules.items():
            key = name if measure == "loss" else f"{measure}/{name}"
            step = stop_step({s: losses[s] for s in steps}, flats, rule)
            if step is None:
                out[key] = None
                continue
            row = {"step": step, "last": at(step)}
            for k in means:
                window = [files[s] for s in steps if s <= step][-k:]
                row[f"mean{k}"] = score(mean_file(window, tmp / f"{run.name}-{key}-{k}.safetensors"), concept, samples)
            out[key] = row
    return out


def stops(run: Path, series=None) -> dict[str, int | None]:
    """Only the stop step of every measure × rule."""
    _, series, steps, flats = logged(run, series)
    return {
        f"{measure}/{name}": stop_step({s: losses[s] for s in steps}, flats, rule)
        for measure, losses in series.items()
        for name, rule in RULES.items()
    }


def measure_series(path: Path, run: str, names: list[str] | None) -> dict[str, dict[int, float]]:
    """{measure: {step: loss}} of one run from `benchmarks/stop_measures.py`'s file."""
    import torch
    from diffusers import DDPMScheduler

    from lit_ti.train import _asset

    alphas = DDPMScheduler.from_pretrained(_asset("toy_base"), subfolder="scheduler").alphas_cumprod
    found = torch.load(path)[run]
    per_step = [measures(s, alphas) for s in found["scores"]]
    names = names or list(per_step[0])
    return {m: dict(zip(found["steps"], (p[m] for p in per_step))) for m in names}


def emit(row: dict, path: Path | None) -> None:
    """Print one run's JSON line, and append it to `path` when given."""
    print(json.dumps(row), flush=True)
    if path:
        with path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="RUN_DIR:CONCEPT[:LABEL]")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument(
        "--every", type=int, default=50, help="steps between the copies scored for the best one; 0 = none"
    )
    parser.add_argument("--means", type=int, nargs="*", default=[6, 12], help="tail lengths averaged at a stop")
    parser.add_argument("--json", type=Path, help="append one line per run here")
    parser.add_argument("--measures", type=Path, help="benchmarks/stop_measures.py's file for these runs")
    parser.add_argument("--only", nargs="*", help="with --measures: these measures (default: all)")
    parser.add_argument("--rules", nargs="*", choices=list(RULES), default=list(RULES), help="none: references only")
    parser.add_argument("--stops-only", action="store_true", help="print the stop steps, score nothing")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.runs:
            run, concept, *label = spec.split(":")
            row = {"run": label[0] if label else run, "concept": concept}
            series = measure_series(args.measures, run, args.only) if args.measures else None
            if args.stops_only:
                row.update(stops(Path(run), series))
            else:
                rules = {name: RULES[name] for name in args.rules}
                row.update(replay(Path(run), concept, args.samples, args.every, args.means, Path(tmp), series, rules))
            emit(row, args.json)


if __name__ == "__main__":
    main()
