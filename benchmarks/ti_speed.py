"""Steady-state training speed and peak memory of each method through the real Trainer.

    python benchmarks/ti_speed.py --backbone tiny --batch 1 4
    python benchmarks/ti_speed.py --backbone tiny --methods ti da da_rec hn   # step cost vs TI
    python benchmarks/ti_speed.py --backbone sd15 --batch 1 8 32 --precision bf16-mixed   # on a GPU

Prints one row per method and batch size: samples/s over the timed steps (after warm-up), the step time
relative to TI's at the same batch, time to the first step, and peak memory (CUDA max allocated on GPU,
process max RSS on CPU: a process-wide high-water mark, so only the first row's is clean on CPU).
"""

import argparse
import os
import resource
import time
import warnings
from importlib import resources

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import lightning as L
import torch

from lit_ti.data import ConceptDataModule
from lit_ti.methods import DreamArtist, HypernetworkMethod, TextualInversion
from lit_ti.models import TinyBackbone

warnings.filterwarnings("ignore")


class Timer(L.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.t0, self.first, self.timed = warmup, None, None, 0

    def _sync(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_train_start(self, trainer, pl_module):
        self._sync()
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 1:
            self._sync()
            self.first = time.perf_counter() - self.start
        if trainer.global_step == self.warmup:
            self._sync()
            self.t0 = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        self._sync()
        self.elapsed = time.perf_counter() - self.t0
        self.timed = trainer.global_step - self.warmup


METHODS = {
    "ti": lambda bb: TextualInversion(bb, name="bench-concept", num_vectors=4, init_text="thing"),
    "da": lambda bb: DreamArtist(bb, name="bench-concept", num_vectors=4, init_text="thing"),
    "da_rec": lambda bb: DreamArtist(bb, name="bench-concept", num_vectors=4, init_text="thing", reconstruction=True),
    "hn": lambda bb: HypernetworkMethod(bb, name="bench-concept"),
}


def measure(backbone: str, batch: int, precision: str, steps: int, warmup: int, method_name: str = "ti") -> dict:
    L.seed_everything(0, verbose=False)
    torch.set_float32_matmul_precision("high")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    method = METHODS[method_name](TinyBackbone(size=backbone))
    dm = ConceptDataModule(
        dir=str(resources.files("lit_ti").joinpath("assets", "toy_concepts", "purple_star")),
        name="bench-concept",
        batch_size=batch,
        repeats=max(1, batch),
    )
    timer = Timer(warmup)
    trainer = L.Trainer(
        max_steps=warmup + steps,
        precision=precision,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    trainer.fit(method, datamodule=dm)
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {
        "method": method_name,
        "batch": batch,
        "samples/s": timer.timed * batch / timer.elapsed,
        "ms/step": 1000 * timer.elapsed / timer.timed,
        "first step s": timer.first,
        "peak GiB": peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="tiny", choices=["tiny", "small", "sd15"])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--methods", nargs="+", default=["ti"], choices=list(METHODS))
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    print(f"lit_ti training step, backbone={args.backbone}, precision={args.precision}, device={device}")
    print(
        f"{'method':>7} {'batch':>5} {'samples/s':>10} {'ms/step':>9} {'x TI':>6} {'first step s':>13} {'peak GiB':>9}"
    )
    ti_ms = {}
    for batch in args.batch:
        for name in args.methods:
            r = measure(args.backbone, batch, args.precision, args.steps, args.warmup, name)
            if name == "ti":
                ti_ms[batch] = r["ms/step"]
            ratio = f"{r['ms/step'] / ti_ms[batch]:>6.2f}" if batch in ti_ms else f"{'-':>6}"
            print(
                f"{name:>7} {r['batch']:>5} {r['samples/s']:>10.2f} {r['ms/step']:>9.1f} {ratio} "
                f"{r['first step s']:>13.2f} {r['peak GiB']:>9.2f}"
            )


if __name__ == "__main__":
    main()
