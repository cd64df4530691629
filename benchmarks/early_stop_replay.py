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


def replay(run: Path, concept: str, samples: int, every: int, means: list[int], tmp: Path) -> dict:
    losses, files = val_losses(run), copies(run)
    steps = sorted(s for s in losses if s in files)
    last = steps[-1]
    out = {"last_step": last, "at_last": score(files[last], concept, samples)}
    tail = [files[s] for s in steps[-12:]]
    out["mean12_at_last"] = score(mean_file(tail, tmp / f"{run.name}-tail.safetensors"), concept, samples)
    periodic = {s: score(files[s], concept, samples) for s in steps if every > 0 and s % every == 0}
    if periodic:
        best = max(periodic, key=lambda s: (periodic[s][1], periodic[s][0]))
        out["periodic"], out["best"] = periodic, [best, *periodic[best]]
    flats = {s: flat(files[s]) for s in steps}  # read once for every rule
    for name, rule in RULES.items():
        step = stop_step({s: losses[s] for s in steps}, flats, rule)
        if step is None:
            out[name] = None
            continue
        row = {"step": step, "last": periodic.get(step) or score(files[step], concept, samples)}
        for k in means:
            window = [files[s] for s in steps if s <= step][-k:]
            row[f"mean{k}"] = score(mean_file(window, tmp / f"{run.name}-{name}-{k}.safetensors"), concept, samples)
        out[name] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="RUN_DIR:CONCEPT[:LABEL]")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument(
        "--every", type=int, default=50, help="steps between the copies scored for the best one; 0 = none"
    )
    parser.add_argument("--means", type=int, nargs="*", default=[6, 12], help="tail lengths averaged at a stop")
    parser.add_argument("--json", type=Path, help="append one line per run here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.runs:
            run, concept, *label = spec.split(":")
            row = {"run": label[0] if label else run, "concept": concept}
            row.update(replay(Path(run), concept, args.samples, args.every, args.means, Path(tmp)))
            print(json.dumps(row), flush=True)
            if args.json:
                with args.json.open("a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
