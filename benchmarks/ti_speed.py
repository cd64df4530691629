"""Training speed, memory and FLOPs of lit_ti's methods next to a naive baseline, side by side in one run.

    python benchmarks/ti_speed.py --backbone tiny                  # TI vs naive, batch 1 and 4 (CPU: < 1 min)
    python benchmarks/ti_speed.py --backbone small --methods ti da da_rec hn
    python benchmarks/ti_speed.py --backbone small --methods ti pv pv_lora --no-baseline --batch 4
    python benchmarks/ti_speed.py --backbone tiny --methods ti ti_compiled     # method.compile_unet=true
    python benchmarks/ti_speed.py --backbone sd15 --batch 1 8 32 --precision bf16-mixed   # on a GPU

Each row runs in its own fresh child process, so peak memory is that row's own: process peak RSS (VmHWM)
on CPU, `torch.cuda.max_memory_allocated` on GPU. `naive` is the step of diffusers' example script
(`naive_baseline.py`: decode + VAE-encode every image every step, AdamW over the whole token table with a
row restore); the other rows go through lit_ti's real Trainer. Columns: steady-state samples/s after
warm-up, `x naive` (samples/s over the naive row's at the same batch), `x TI` (step time over TI's), time to
the first step, peak memory and its ratio to naive (on GPU also `step GiB`: the peak of the training
steps alone, without the VAE pass that caches the latents first), how much the row grew the process beyond what the
imports hold (`+MiB`, CPU) and its ratio, and forward+backward FLOPs per sample
(`torch.utils.flop_counter`) with the FLOP rate they imply (and its share of `--peak-tflops` on GPU).
"""

import argparse
import logging
import multiprocessing as mp
import os
import time
import warnings
from importlib import resources
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import lightning as L
import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

from lit_ti.data import ConceptDataModule
from lit_ti.methods import DreamArtist, HypernetworkMethod, PivotalTuning, TextualInversion
from lit_ti.models import TinyBackbone

DATA = Path(str(resources.files("lit_ti").joinpath("assets", "toy_concepts", "purple_star")))
TI = dict(name="bench-concept", num_vectors=4, init_text="thing")
METHODS = {
    "ti": lambda bb, **kw: TextualInversion(bb, **TI, **kw),
    "ti_compiled": lambda bb, **kw: TextualInversion(bb, **TI, compile_unet=True, **kw),
    "da": lambda bb, **kw: DreamArtist(bb, **TI, **kw),
    "da_rec": lambda bb, **kw: DreamArtist(bb, **TI, reconstruction=True, **kw),
    "hn": lambda bb, **kw: HypernetworkMethod(bb, name="bench-concept", **kw),
    # pivotal tuning, rank 4 on the UNet's attention: its embedding phase (the LoRA attached, not trained) and
    # its LoRA phase (the embedding frozen)
    "pv": lambda bb, **kw: PivotalTuning(bb, **TI, ti_steps=10**6, **kw),
    "pv_lora": lambda bb, **kw: PivotalTuning(bb, **TI, ti_steps=0, **kw),
}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 tensor-core peaks


class Timer(L.Callback):
    """Times `steps` optimizer steps once at least `warmup` steps and `warmup_s` seconds of training have run.

    Why seconds: the first steps of a process run slow for a while (on CPU, 2-4x for the first ~100 tiny
    steps in an environment where Lightning's torchmetrics import pulls in scipy), so a fixed handful of
    warm-up steps measured start-up, not the steady state.
    """

    def __init__(self, warmup: int, warmup_s: float, steps: int) -> None:
        self.warmup, self.warmup_s, self.steps = warmup, warmup_s, steps
        self.t0 = self.first = None
        self.t0_step = self.timed = 0

    def _now(self) -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_start(self, trainer, pl_module):
        # the latents are cached by now (a VAE pass over every image, in fp32): its memory is the run's, not
        # the training step's, so the GPU's peak is read here and again after the timed steps
        if torch.cuda.is_available():
            self.setup_peak = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
        self.start = self._now()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.t0 is None:  # warming up: a clock read (and a device sync) per step is fine here
            now = self._now()
            if step == 1:
                self.first = now - self.start
            if step >= self.warmup and now - self.start >= self.warmup_s:
                self.t0, self.t0_step = now, step
        elif step - self.t0_step >= self.steps:
            self.elapsed, self.timed = self._now() - self.t0, step - self.t0_step
            trainer.should_stop = True


def flops_per_sample(method, dm) -> float:
    """Forward + backward FLOPs of one training step, per sample."""
    batch = next(iter(dm.train_dataloader()))
    batch = {k: v.to(method.device) if torch.is_tensor(v) else v for k, v in batch.items()}
    with FlopCounterMode(display=False) as counter:
        method.shared_step(batch)["loss"].backward()
    return counter.get_total_flops() / batch["latents"].shape[0]


def measure(
    name: str, backbone: str, batch: int, precision: str, steps: int, warmup: int, warmup_s: float, switches: dict
) -> dict:
    """One row, in a fresh process."""
    L.seed_everything(0, verbose=False)
    torch.set_float32_matmul_precision("high")
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no "GPU available" banners per row
    gpu = torch.cuda.is_available()
    rss0 = _vm_rss()  # what the imports hold before this row builds anything
    if name == "naive":
        from naive_baseline import run

        dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision, torch.float32)
        bb = TinyBackbone(size=backbone).load()
        if gpu:
            for m in (bb.unet, bb.vae, bb.text_encoder):
                m.cuda()
        row = run(bb, DATA, batch, steps, warmup, warmup_s, dtype=dtype)
        row["flops"] = None
    else:
        method = METHODS[name](TinyBackbone(size=backbone), **switches)
        dm = ConceptDataModule(dir=str(DATA), name="bench-concept", batch_size=batch, repeats=max(1, batch))
        timer = Timer(warmup, warmup_s, steps)
        trainer = L.Trainer(
            max_steps=10**9,  # the timer stops training
            precision=precision,
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[timer],
        )
        trainer.fit(method, datamodule=dm)
        row = {
            "samples/s": timer.timed * batch / timer.elapsed,
            "ms/step": 1000 * timer.elapsed / timer.timed,
            "first step s": timer.first,
            # read before the FLOP count, which runs a step of its own outside the Trainer
            "step GiB": torch.cuda.max_memory_allocated() / 2**30 if gpu else None,
            "peak GiB": max(_peak(gpu), timer.setup_peak) if gpu else _peak(gpu),
            "flops": flops_per_sample(method, dm) if name == "ti" else None,
        }
    row.setdefault("peak GiB", _peak(gpu))
    row.setdefault("step GiB", None)
    row["grown MiB"] = 0.0 if gpu else (_vm("VmHWM") - rss0) / 2**20
    row["device"] = torch.cuda.get_device_name() if gpu else f"CPU ({torch.get_num_threads()} threads)"
    return row


def _vm(field: str) -> int:
    """A /proc/self/status memory figure in bytes (VmHWM: peak resident set, VmRSS: current)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _peak(gpu: bool) -> float:
    """GiB: the device's peak allocation on a GPU, the process's peak RSS on a CPU."""
    return torch.cuda.max_memory_allocated() / 2**30 if gpu else _vm("VmHWM") / 2**30


def _vm_rss() -> int:
    return 0 if torch.cuda.is_available() else _vm("VmRSS")


def _child(queue, *args) -> None:
    queue.put(measure(*args))


def in_child(*args) -> dict:
    # fork on CPU (the imports are done once, the tensor runtime starts fresh in the child); spawn where
    # CUDA is, since a forked child cannot use it
    ctx = mp.get_context("spawn" if torch.cuda.is_available() else "fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, *args))
    proc.start()
    while proc.is_alive() or not queue.empty():
        try:
            row = queue.get(timeout=1)
            proc.join()
            return row
        except Exception:  # queue.Empty: still measuring
            continue
    raise SystemExit(f"the {args[0]!r} measurement failed (exit code {proc.exitcode}); its traceback is above")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="tiny", choices=["tiny", "small", "sd15"])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--methods", nargs="+", default=["ti"], choices=list(METHODS))
    parser.add_argument("--no-baseline", action="store_true", help="skip the naive rows")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3, help="at least this many warm-up steps")
    parser.add_argument("--warmup-s", type=float, default=3.0, help="... and at least this many seconds of them")
    parser.add_argument("--repeats", type=int, default=1, help="runs per row, interleaved; the fastest counts")
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="method switches, e.g. gradient_checkpointing=true"
    )
    parser.add_argument("--peak-tflops", type=float, default=None, help="device bf16 peak (default: by name)")
    args = parser.parse_args()

    names = ([] if args.no_baseline else ["naive"]) + args.methods
    switches = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    header = f"{'method':>7} {'batch':>5} {'samples/s':>10} {'x naive':>8} {'ms/step':>9} {'x TI':>6} "
    header += f"{'first s':>8} {'peak GiB':>9} {'step GiB':>9} {'x naive':>8} {'+MiB':>6} {'x naive':>8} {'GFLOP/smp':>10} {'TFLOP/s':>8} {'of peak':>8}"
    printed = False
    for batch in args.batch:
        rows: dict[str, dict] = {}
        for _ in range(args.repeats):  # interleaved, best of N: a noisy neighbour slows one run, not a method
            for name in names:
                r = in_child(
                    name, args.backbone, batch, args.precision, args.steps, args.warmup, args.warmup_s, switches
                )
                if name not in rows or r["ms/step"] < rows[name]["ms/step"]:
                    rows[name] = {**r, "peak GiB": max(r["peak GiB"], rows.get(name, r)["peak GiB"])}
        for name in names:
            r = rows[name]
            if not printed:
                print(
                    f"backbone={args.backbone} precision={args.precision} device={r['device']} steps={args.steps}"
                    f" best of {args.repeats}" + "".join(f" {k}={v}" for k, v in switches.items())
                )
                print(header)
                printed = True
            naive, ti = rows.get("naive"), rows.get("ti")
            speed = f"{r['samples/s'] / naive['samples/s']:>8.2f}" if naive and name != "naive" else f"{'':>8}"
            step = f"{r['ms/step'] / ti['ms/step']:>6.2f}" if ti and name not in ("ti", "naive") else f"{'':>6}"
            mem = f"{r['peak GiB'] / naive['peak GiB']:>8.2f}" if naive and name != "naive" else f"{'':>8}"
            grown = f"{r['grown MiB'] / naive['grown MiB']:>8.2f}" if naive and name != "naive" else f"{'':>8}"
            flops = tflops = share = ""
            step_peak = f"{r['step GiB']:.3f}" if r["step GiB"] is not None else ""
            if r["flops"]:
                flops = f"{r['flops'] / 1e9:.3g}"
                rate = r["flops"] * r["samples/s"] / 1e12
                tflops = f"{rate:.3g}"
                peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in r["device"]), None)
                share = f"{rate / peak:.1%}" if peak and torch.cuda.is_available() else ""
            print(
                f"{name:>7} {batch:>5} {r['samples/s']:>10.2f} {speed} {r['ms/step']:>9.1f} {step} "
                f"{r['first step s']:>8.2f} {r['peak GiB']:>9.3f} {step_peak:>9} {mem} {r['grown MiB']:>6.0f} {grown} {flops:>10} {tflops:>8} {share:>8}",
                flush=True,
            )


if __name__ == "__main__":
    main()
