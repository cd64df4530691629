"""What each SD3 text encoder's vectors cost: seconds per TI step and peak memory, at SD3.5 medium's real layer
widths (random weights) with a chosen depth, on the CPU.

    python benchmarks/sd3_encoders.py --layers 2 --size 256

Each case runs in its own process (so peak RSS, the process's own VmHWM, is that case's alone): no T5 at all;
T5 loaded but only CLIP vectors trained (T5 runs forward only); T5 vectors trained too (the gradient runs back
through T5). `--layers` cuts the MMDiT and T5 to that many blocks (both CLIP encoders stay whole); the full
models have 24 of each, so the T5 column scales about linearly with 24 / layers.

    python benchmarks/sd3_encoders.py --config sd35_large --size 128 --steps 1

`--config` instead builds a whole shipped model (`sd3_medium`, `sd35_medium`, `sd35_large`) at full depth with
shared blocks (`lit_ti.models.RealSizeSD3`: real widths, depth and compute; one block of each kind in
memory) and prints what the unshared bf16 weights would add to the peak.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CASES = {  # name -> (model.t5, method.encoders)
    "no T5": (False, ["clip_l", "clip_g"]),
    "T5 frozen, CLIP vectors": (True, ["clip_l", "clip_g"]),
    "T5 vectors too": (True, ["clip_l", "clip_g", "t5"]),
}


def one_case(t5: bool, encoders: list[str], layers: int, size: int, steps: int, config: str | None) -> dict:
    import torch

    from lit_ti.methods import TextualInversion
    from lit_ti.models import RealSizeSD3, TinySD3, tiny_sd3
    from lit_ti.models.backbone import built_in

    if config:
        spec = RealSizeSD3(config, t5=t5)
    else:
        cfg = {**tiny_sd3.SIZES["sd35_medium"]}  # real widths, `layers` blocks of each stack
        cfg["transformer"] = {**cfg["transformer"], "num_layers": layers, "dual_attention_layers": tuple(range(layers))}
        cfg["t5"] = {**cfg["t5"], "num_layers": layers}
        tiny_sd3.SIZES["bench"] = cfg
        spec = TinySD3(size="bench", t5=t5)
    method = TextualInversion(spec, name="zz-thing", num_vectors=2, encoders=encoders)
    with built_in(torch.bfloat16):  # the frozen parts built as a bf16 run holds them (never fp32 first)
        method.configure_model()
    latents = torch.randn(1, 16, size // 8, size // 8)
    batch = {"latents": latents, "prompt": ["a photo of zz-thing"], "noise_seed": torch.tensor([0])}
    times = []
    for _ in range(steps + 1):  # the first step warms up
        start = time.perf_counter()
        loss = method.shared_step(batch)["loss"]
        loss.backward()
        times.append(time.perf_counter() - start)
    status = Path("/proc/self/status").read_text().splitlines()
    peak_kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM"))
    return {"s_per_step": sum(times[1:]) / steps, "first_step_s": times[0], "peak_rss_gib": peak_kib / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2, help="MMDiT and T5 blocks (24 each in SD3.5 medium)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=2, help="timed steps, after one warm-up step")
    parser.add_argument(
        "--config", help="a whole shipped model with shared blocks: sd3_medium | sd35_medium | sd35_large"
    )
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES), metavar="CASE")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print its JSON
    args = parser.parse_args()
    if args.case:
        t5, encoders = CASES[args.case]
        print(json.dumps(one_case(t5, encoders, args.layers, args.size, args.steps, args.config)))
        return
    if args.config:
        print(f"{args.config} at full depth, blocks shared, {args.size} px, CPU, bf16 weights")
    else:
        print(f"SD3.5-medium widths, {args.layers} MMDiT + {args.layers} T5 blocks, {args.size} px, CPU, bf16 weights")
    for name in args.cases:
        cmd = [sys.executable, __file__, "--case", name, "--layers", str(args.layers), "--size", str(args.size)]
        cmd += ["--steps", str(args.steps), *(["--config", args.config] if args.config else [])]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        result = json.loads(out)
        print(f"{name:26s} {result['s_per_step']:7.2f} s/step   peak RSS {result['peak_rss_gib']:.2f} GiB", flush=True)
    if args.config:
        import torch

        from lit_ti.models.real_size_sd3 import weight_bytes

        unshared = weight_bytes(args.config, torch.bfloat16)
        print(
            "unshared weights (bf16; VAE fp32): " + ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in unshared.items())
        )


if __name__ == "__main__":
    main()
