"""`method.compile_unet`'s modes on one device: the step time, the first (compiling) step, peak memory, and the
embedding gradient against eager's on the same pinned step.

    python benchmarks/compile_check.py --backbone sd15 --precision bf16-mixed --batch 1     # on a GPU
    python benchmarks/compile_check.py --backbone tiny --variants eager default             # CPU dry run

Why the gradient: on CPU, inductor zeroes the gradient through the UNet's upsamplers (models/compiled.py), so
lit_ti runs them eagerly; the `-whole` variants compile them too, to see whether a device has that fault.
One process and one model: eager first, then each variant in order (a variant that fails prints its error and
the next one runs). The step is TI's `shared_step` + backward under the precision's autocast, as the Trainer
runs it, without the optimizer (it updates 4 vectors).
"""

import argparse
import time
import warnings

import lightning as L
import torch

from lit_ti.methods import TextualInversion
from lit_ti.models import TinyBackbone, compiled

NAME = "bench-concept"
VARIANTS = {  # name -> compile_unet's arguments (None: eager)
    "eager": None,
    "reduce-overhead": dict(mode="reduce-overhead"),
    "reduce-overhead-whole": dict(mode="reduce-overhead", eager_upsamplers=False),
    "default": dict(mode="default"),
    "default-whole": dict(mode="default", eager_upsamplers=False),
}


def sync() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def step(method, batch: dict, amp: torch.dtype | None, seed: int | None = None) -> tuple[float, torch.Tensor]:
    """Loss and the vectors' gradient `[4, width]` of one training step (noise pinned by `seed`)."""
    vectors = method.bank.get(NAME)["text_encoder"]
    vectors.grad = None
    if seed is not None:
        torch.manual_seed(seed)
    with torch.autocast(vectors.device.type, dtype=amp or torch.float32, enabled=amp is not None):
        loss = method.shared_step(batch)["loss"]
    loss.backward()
    return float(loss), vectors.grad.detach().clone()


def restore_upsamplers(unet: torch.nn.Module) -> None:
    """Undo compile_unet's eager wrapping, so that the next variant starts from the plain model."""
    for module in unet.modules():
        if getattr(module, "_lit_ti_eager", False):
            del module.forward, module._lit_ti_eager


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="tiny", choices=["tiny", "small", "sd15"])
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_float32_matmul_precision("high")
    L.seed_everything(0, verbose=False)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(args.precision)

    method = TextualInversion(TinyBackbone(size=args.backbone), name=NAME, num_vectors=4, init_text="thing")
    method.trainer = L.Trainer(precision=args.precision, devices=1, logger=False)  # the frozen weights' dtype
    method.configure_model()
    method.to(device)
    size = method.backbone.resolution // method.backbone.vae_scale_factor
    g = torch.Generator().manual_seed(0)
    batch = {
        "latents": torch.randn(args.batch, 4, size, size, generator=g).to(device),  # [B, 4, h, w]
        "prompt": [f"a photo of {NAME}"] * args.batch,
    }
    print(
        f"backbone={args.backbone} precision={args.precision} batch={args.batch} device={device} "
        f"({torch.cuda.get_device_name() if device.type == 'cuda' else torch.get_num_threads()}) "
        f"torch={torch.__version__} steps={args.steps}",
        flush=True,
    )
    print(f"{'variant':>22} {'first s':>8} {'ms/step':>8} {'peak GiB':>9} {'loss diff':>10} {'grad rel err':>13}")
    reference = step(method, batch, amp, seed=1)
    for name in args.variants:
        try:
            torch._dynamo.reset()
            restore_upsamplers(method.unet)
            method.compiled_unet = (
                None if VARIANTS[name] is None else compiled.compile_unet(method.unet, **VARIANTS[name])
            )
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t0 = sync()
            step(method, batch, amp)
            first = sync() - t0
            for _ in range(args.warmup):
                step(method, batch, amp)
            loss, grad = step(method, batch, amp, seed=1)
            t0 = sync()
            for _ in range(args.steps):
                step(method, batch, amp)
            ms = 1000 * (sync() - t0) / args.steps
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
            err = float((grad - reference[1]).norm() / reference[1].norm())
            print(
                f"{name:>22} {first:>8.1f} {ms:>8.1f} {peak:>9.2f} {loss - reference[0]:>10.2e} {err:>13.2e}",
                flush=True,
            )
        except Exception as e:  # one variant's failure must not cost the rest
            print(f"{name:>22} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)


if __name__ == "__main__":
    main()
