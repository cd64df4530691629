"""`torch.compile` for the frozen UNet's training step.

Why the upsamplers stay eager: with torch 2.13's inductor on CPU, compiling a whole diffusers UNet gives the
right loss but a wrong gradient. The gradient through an `UpBlock2D` (a ResNet block, then nearest-neighbour
upsampling and a convolution) comes out exactly zero, so the text conditioning's gradient is off by 66% of its
size on the tiny backbone. Running only the `Upsample2D` modules eagerly (a graph break at each, three on SD1.5)
gives gradients equal to eager to 3e-6. `aot_eager` is exact too, so the fault is in inductor's code
generation. `tests/test_speed_switches.py` checks the gradient against eager.
"""

from collections.abc import Callable

import torch

# `method.compile_unet` values: True = torch.compile's default mode; "reduce-overhead" replays the step as
# CUDA graphs (for GPUs, where batch-1 steps wait on kernel launches; on a CPU it equals the default)
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_unet(
    unet: torch.nn.Module, backend: str | Callable = "inductor", mode: str = "default", eager_upsamplers: bool = True
) -> Callable:
    """A compiled version of `unet.forward` (a plain function, so it is not registered as a submodule);
    `unet` itself stays eager for sampling and evaluation.

    Static shapes: a training run sees one batch shape (and the last partial batch); dynamic shapes failed to
    compile across the upsamplers' graph breaks. `eager_upsamplers=False` compiles them too (benchmarks only:
    it checks whether a device's code generation has the fault described above).
    """
    for module in unet.modules():
        if eager_upsamplers and type(module).__name__ == "Upsample2D" and not getattr(module, "_lit_ti_eager", False):
            module.forward = torch.compiler.disable(module.forward)
            module._lit_ti_eager = True
    mode = None if backend != "inductor" or mode == "default" else mode  # modes are inductor's
    return torch.compile(unet.forward, backend=backend, dynamic=False, mode=mode)
