"""The speed switches change how a step is computed, never what it computes."""

import pytest
import torch

from lit_ti.methods import TextualInversion
from lit_ti.models import TinyBackbone


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
