"""CUDA checks (skipped without a GPU): mixed precision keeps the vectors fp32 and trains them."""

import pytest
import torch

from lit_ti import io
from tests.test_fit import NAME, fit

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed", "32-true"])
def test_fit_on_gpu(tmp_path, concept_dir, precision):
    method, trainer = fit(
        tmp_path, concept_dir, max_steps=4, every=2, precision=precision, accelerator="gpu", accumulate=2
    )
    expected = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16, "32-true": torch.float32}[precision]
    assert method.unet.device.type == "cuda"
    assert method.unet.dtype == method.text_encoder.dtype == expected
    assert method.vae.dtype == torch.float32
    vectors = method.bank.vectors["text_encoder__0"]
    assert vectors.dtype == torch.float32 and vectors.device.type == "cuda"
    assert trainer.global_step == 4
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    first = io.load_embedding(tmp_path / "embeddings" / f"{NAME}-2.pt")[f"{NAME}-2"]
    final = io.load_embedding(tmp_path / f"{NAME}.safetensors")[NAME]
    assert torch.isfinite(final).all() and not torch.equal(first, final)
    assert (tmp_path / "previews" / f"{NAME}-4.png").is_file()
