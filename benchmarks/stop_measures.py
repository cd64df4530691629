"""Per-draw denoising losses of every copy of logged toy runs, for trying stop measures offline.

    python train.py toy_concept=orange_cross seed=2 callbacks.preview=null callbacks.toy_eval=null \
        callbacks.early_stop.min_steps=100000 callbacks.export.every_n_steps=10 trainer.max_steps=600
    python benchmarks/stop_measures.py outputs/<run>:orange_cross ... --out losses.pt

For each copy of the vectors (every 10 steps, up to `--max-step`) it scores two image sets, each image at fixed (noise, timestep)
draws: the 16 training renders (the folder the run trained on) and 16 other renders of the concept (seed
`--heldout-seed`: neither the training renders nor the evaluation's). Per set it keeps
* `callback`: the draws `callbacks.early_stop` measures (4 per image, seed 0 + image), whose mean is its
  `val/loss` exactly (the script checks it against the run's log), and
* `grid`: `--draws` more per image over the whole schedule (seed 1000 + image), with their timesteps,
so that any weighting or timestep range can be tried as a stop measure without running the model again
(`benchmarks/early_stop_replay.py --measures`).
"""

import argparse
import os
import re
import tempfile
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch


def image_set(method, folder: str, grid: int) -> dict:
    """A folder's images as two batches of fixed problems: `callback` (4 draws per image, seed 0 + image, as
    `callbacks.early_stop`) and `grid` (`grid` draws per image, seed 1000 + image)."""
    from lit_ti.callbacks.val_loss import fixed_prompts
    from lit_ti.data.datamodule import ConceptDataModule
    from lit_ti.losses import fixed_draws

    data = ConceptDataModule(folder, method.name, "toy", latent_sampling="deterministic", buckets=False)
    data.cache_latents(method.encode_images, method.backbone.resolution)
    prompts = fixed_prompts(data)
    out = {}
    for kind, n, offset in (("callback", 4, 0), ("grid", grid, 1000)):
        parts = [fixed_draws(method.objective, data.latent(i)[None], n, offset + i) for i in range(len(prompts))]
        noisy, t, target = (torch.cat(x) for x in zip(*parts))
        out[kind] = (noisy, t, target, [p for p in prompts for _ in range(n)], len(prompts))
    return out


@torch.no_grad()
def score_copy(method, sets: dict, chunk: int = 256) -> dict:
    """Per-draw MSE `[images, draws]` and timesteps of every batch of every set."""
    out = {}
    for name, batches in sets.items():
        for kind, (noisy, t, target, prompts, images) in batches.items():
            mse = torch.cat(
                [
                    (
                        (
                            method.predict(
                                noisy[i : i + chunk], t[i : i + chunk], {"prompt": prompts[i : i + chunk]}
                            ).float()
                            - target[i : i + chunk].float()
                        )
                        ** 2
                    ).mean(dim=(1, 2, 3))
                    for i in range(0, len(t), chunk)
                ]
            )
            out[f"{name}/{kind}"] = mse.view(images, -1)
            out[f"{name}/{kind}_t"] = t.view(images, -1)
    return out


def run_losses(run: Path, concept: str, draws: int, heldout_seed: int, max_step: int, tmp: Path) -> dict:
    from early_stop_replay import val_losses  # this folder's sibling script

    from lit_ti import io
    from lit_ti.methods import TextualInversion
    from lit_ti.modules.embedding_bank import swapped
    from lit_ti.toy.evaluation import toy_base
    from lit_ti.toy.world import write_concept
    from lit_ti.train import _toy_data

    copies = {int(m.group(1)): p for p in run.glob("embeddings/*.safetensors") if (m := re.search(r"-(\d+)\.", p.name))}
    copies = {s: p for s, p in copies.items() if s <= max_step}
    first = copies[min(copies)]
    backbone = toy_base()
    method = TextualInversion(backbone, name=io.read_embedding(first)[0].name, init_file=str(first))
    method.configure_model()
    method.eval()
    train_dir = _toy_data(concept)  # what `toy_concept=` trains on (16 renders, the toy template)
    held = write_concept(concept, tmp / f"{concept}-{heldout_seed}", n=16, seed=heldout_seed)
    sets = {"train": image_set(method, str(train_dir), draws), "heldout": image_set(method, str(held), draws)}
    key = method.bank.key(method.name, "text_encoder")
    logged = val_losses(run)
    steps, scores = sorted(copies), []
    for step in steps:
        vectors = io.read_embedding(copies[step])[0].vectors
        with swapped(method.concept_bank, {key: vectors.float()}):
            scores.append(score_copy(method, sets))
        mine = float(scores[-1]["train/callback"].mean())
        if step in logged and abs(mine - logged[step]) > 1e-4 * logged[step]:  # the same problems, or a bug here
            raise SystemExit(f"{run} step {step}: val/loss {logged[step]:.6f} logged, {mine:.6f} recomputed")
    return {"steps": steps, "scores": scores}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="RUN_DIR:CONCEPT")
    parser.add_argument("--draws", type=int, default=16)
    parser.add_argument("--heldout-seed", type=int, default=777)
    parser.add_argument("--max-step", type=int, default=400, help="copies up to this step (a stop must come early)")
    parser.add_argument("--out", type=Path, required=True, help="a .pt file: {run: {steps, scores}}")
    args = parser.parse_args()
    found = torch.load(args.out) if args.out.is_file() else {}
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.runs:
            run, concept = spec.split(":")
            if run in found:
                continue
            found[run] = run_losses(Path(run), concept, args.draws, args.heldout_seed, args.max_step, Path(tmp)) | {
                "concept": concept
            }
            torch.save(found, args.out)
            print(f"{run}: {len(found[run]['steps'])} copies", flush=True)


if __name__ == "__main__":
    main()
