"""The speed switches change how a step is computed, never what it computes."""

import pytest
import torch

from lit_ti.errors import UserError
from lit_ti.methods import TextualInversion
from lit_ti.models import TinyBackbone, compiled


def step(**switches) -> tuple[float, torch.Tensor, TextualInversion]:
    """Loss and embedding gradient of one pinned training step."""
    method = TextualInversion(TinyBackbone(), name="zz-thing", num_vectors=2, init_text="thing", **switches)
    method.configure_model()
    size = method.backbone.resolution // method.backbone.vae_scale_factor
    g = torch.Generator().manual_seed(0)
    batch = {"latents": torch.randn(2, 4, size, size, generator=g), "prompt": ["a zz-thing", "a photo of zz-thing"]}
    torch.manual_seed(1)  # the step's noise and timesteps
    loss = method.shared_step(batch)["loss"]
    loss.backward()
    return float(loss), method.bank.get("zz-thing")["text_encoder"].grad.clone(), method


def test_gradient_checkpointing_and_channels_last_keep_loss_and_gradient():
    loss, grad, _ = step()
    for switches in ({"gradient_checkpointing": True}, {"channels_last": True}):
        loss2, grad2, _ = step(**switches)
        assert loss2 == pytest.approx(loss, rel=1e-5)
        assert torch.allclose(grad2, grad, atol=1e-6, rtol=1e-4), switches
    assert step(gradient_checkpointing=True)[2].unet.is_gradient_checkpointing
    conv = step(channels_last=True)[2].unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()


def test_compile_unet_leaves_the_upsamplers_out_of_the_graph():
    """The upsamplers run eagerly (inductor zeroes the gradient through them, see models/compiled.py) and the
    traced graphs give eager's gradient. A counting eager backend keeps this fast; the slow test runs inductor."""
    unet = TinyBackbone().load().unet
    g = torch.Generator().manual_seed(0)
    latents, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    timesteps = torch.tensor([10, 900])
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def grad(fn) -> torch.Tensor:
        ctx = context.clone().requires_grad_()
        fn(latents, timesteps, ctx).sample.square().mean().backward()
        return ctx.grad

    eager = grad(unet)
    torch._dynamo.reset()
    assert torch.equal(grad(compiled.compile_unet(unet, backend=backend)), eager)
    upsamplers = [m for m in unet.modules() if type(m).__name__ == "Upsample2D"]
    assert upsamplers and all(m._lit_ti_eager for m in upsamplers)
    assert len(graphs) > len(upsamplers)  # split at each upsampler (and where diffusers breaks anyway)
    assert not any("interpolate" in str(gm.code) for gm in graphs)


@pytest.mark.slow
def test_compile_unet_keeps_loss_and_gradient():
    """Inductor for real (about a minute and a half of compilation on 2 CPU cores)."""
    torch._dynamo.reset()
    loss, grad, _ = step()
    loss2, grad2, method = step(compile_unet=True)
    assert method.compiled_unet is not None
    assert loss2 == pytest.approx(loss, rel=1e-5)
    assert torch.allclose(grad2, grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize(("value", "mode"), [(True, None), ("default", None), ("reduce-overhead", "reduce-overhead")])
def test_compile_unet_takes_a_mode(monkeypatch, value, mode):
    """`method.compile_unet=reduce-overhead` reaches torch.compile (CUDA graphs: batch-1 GPU steps wait on
    kernel launches); true is torch.compile's default mode."""
    seen = {}
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.update(kw) or fn)
    method = TextualInversion(TinyBackbone(), name="zz-thing", init_text="thing", compile_unet=value)
    method.configure_model()
    assert method.compiled_unet is not None and seen == {"backend": "inductor", "dynamic": False, "mode": mode}


def test_compile_unet_refuses_an_unknown_mode():
    with pytest.raises(UserError, match=r"method.compile_unet='fast'.*reduce-overhead"):
        TextualInversion(TinyBackbone(), name="zz-thing", init_text="thing", compile_unet="fast")
