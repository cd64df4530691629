"""Early stopping against the best copy of a long run, with the copy picked on other samples than it is judged on.

    python train.py toy_concept=orange_cross seed=2 callbacks.preview=null callbacks.toy_eval=null \
        callbacks.early_stop=null callbacks.export.every_n_steps=50 trainer.max_steps=600 hydra.run.dir=LONG
    python train.py toy_concept=orange_cross seed=2 callbacks.preview=null callbacks.toy_eval=null hydra.run.dir=STOP
    python benchmarks/best_copy_reference.py LONG:STOP:orange_cross --json reference.jsonl
    python benchmarks/best_copy_reference.py --table reference.jsonl

The best of a run's copies, picked and scored on the same 32 samples, is the maximum of several noisy scores and
so is biased up (the winner's curse: docs/results.md, "Early stopping with a cooldown"). Here each copy every
`--every` steps of the long run is scored on the default samples (seeds 0-31) only to pick the best (by accuracy,
then recovery); the picked copy, the long run's last copy and the stopped run's files are then judged on
`--samples` fresh samples from seed 32 on (`evaluate.py --first-seed 32`), where none of them was chosen.
"""

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

PICK_SAMPLES = 32  # the default evaluation's samples (seeds 0-31): what a user would pick a copy on


def score(path: Path, concept: str, samples: int, first_seed: int) -> list[float]:
    from lit_ti.toy.evaluation import evaluate_file

    s = evaluate_file(str(path), concept, samples, extras=False, first_seed=first_seed)
    return [round(s["recovery"], 4), round(s["accuracy"], 4)]


def stop_step(run: Path) -> int:
    return json.loads((run / "metrics.json").read_text())["step"]


def reference(long: Path, stop: Path, concept: str, every: int, samples: int) -> dict:
    """One long run and one stopped run of the same concept and seed: the pick, then the fresh scores."""
    from early_stop_replay import copies  # this folder's replay (on sys.path when run as a script)

    found = copies(long)
    picked = {s: score(p, concept, PICK_SAMPLES, 0) for s, p in sorted(found.items()) if s % every == 0}
    best = max(picked, key=lambda s: (picked[s][1], picked[s][0]))
    last = max(found)
    final = next(stop.glob("*.safetensors"))  # the stopped run's shipped files (its name's one file)
    return {
        "concept": concept,
        "run": str(long),
        "picked_on_0_31": picked,
        "best_step": best,
        "last_step": last,
        "stop_step": stop_step(stop),
        "best": score(found[best], concept, samples, PICK_SAMPLES),
        "last": score(found[last], concept, samples, PICK_SAMPLES),
        "stop": score(final, concept, samples, PICK_SAMPLES),
    }


def table(rows: list[dict]) -> str:
    """Markdown of the --json rows: recovery / accuracy on the fresh samples, and the stop's share of the best copy's quality."""
    lines = [
        "| run | stop (step) | best copy (step; its pick on seeds 0-31) | last copy |",
        "| --- | --- | --- | --- |",
    ]
    picks = [r["picked_on_0_31"][str(r["best_step"])][1] for r in rows]  # JSON keys are strings
    for r, pick in zip(rows, picks):
        lines.append(
            f"| {'/'.join(Path(r['run']).parts[-2:])} | {r['stop'][0]:.3f} / {r['stop'][1]:.3f} ({r['stop_step']}) | "
            f"{r['best'][0]:.3f} / {r['best'][1]:.3f} ({r['best_step']}; {pick:.3f}) | "
            f"{r['last'][0]:.3f} / {r['last'][1]:.3f} |"
        )
    n = len(rows)
    mean = {k: [sum(r[k][i] for r in rows) / n for i in (0, 1)] for k in ("stop", "best", "last")}
    steps = {k: sum(r[f"{k}_step"] for r in rows) / n for k in ("stop", "best", "last")}
    picked = sum(picks) / n
    lines.append(
        f"| **mean of {n}** | **{mean['stop'][0]:.3f} / {mean['stop'][1]:.3f} ({steps['stop']:.0f})** | "
        f"**{mean['best'][0]:.3f} / {mean['best'][1]:.3f} ({steps['best']:.0f}; {picked:.3f})** | "
        f"**{mean['last'][0]:.3f} / {mean['last'][1]:.3f}** |"
    )
    share = [mean["stop"][i] / mean["best"][i] for i in (0, 1)]
    lines.append(
        f"\nstop / best copy: recovery {share[0]:.1%}, accuracy {share[1]:.1%}, "
        f"at {steps['stop'] / steps['last']:.1%} of the long run's steps"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", help="LONG_RUN_DIR:STOPPED_RUN_DIR:CONCEPT")
    parser.add_argument("--every", type=int, default=100, help="steps between the long run's copies picked from")
    parser.add_argument("--samples", type=int, default=96, help="fresh samples (seeds 32 on) each file is judged on")
    parser.add_argument("--json", type=Path, help="append one line per run here")
    parser.add_argument("--table", type=Path, help="print the table of a --json file, score nothing")
    args = parser.parse_args()
    if args.table:
        if not args.table.is_file():
            parser.error(f"--table {args.table}: no such file; write it with --json first")
        rows = [json.loads(line) for line in args.table.read_text().splitlines() if line.strip()]
        if not rows:
            parser.error(f"--table {args.table}: no runs in it; write them with --json first")
        print(table(rows))
        return
    from early_stop_replay import emit

    for spec in args.runs:
        long, stop, concept = spec.split(":")
        row = reference(Path(long), Path(stop), concept, args.every, args.samples)
        emit(row, args.json)


if __name__ == "__main__":
    main()
