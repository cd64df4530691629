"""CUDA checks (skipped without a GPU): mixed precision keeps the vectors fp32 and trains them."""

import lightning as L
import pytest
import torch

from lit_ti import io
from tests.conftest import NAME

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed", "32-true"])
def test_fit_on_gpu(tmp_path, concept_dir, precision, fit):
    seen = {}

    class Probe(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen["devices"] = {
                pl_module.unet.device.type,
                pl_module.bank.vectors["text_encoder__0"].device.type,
            }

    method, trainer = fit(
        tmp_path,
        concept_dir,
        max_steps=4,
        every=2,
        precision=precision,
        accelerator="gpu",
        accumulate=2,
        extra_callbacks=[Probe()],
    )
    expected = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16, "32-true": torch.float32}[precision]
    assert seen["devices"] == {"cuda"}  # (Lightning moves the module back to the CPU after fit)
    assert method.unet.dtype == method.text_encoder.dtype == expected
    assert method.vae.dtype == torch.float32
    assert method.bank.vectors["text_encoder__0"].dtype == torch.float32
    assert trainer.global_step == 4
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    first = io.load_embedding(tmp_path / "embeddings" / f"{NAME}-2.pt")[f"{NAME}-2"]
    final = io.load_embedding(tmp_path / f"{NAME}.safetensors")[NAME]
    assert torch.isfinite(final).all() and not torch.equal(first, final)
    assert (tmp_path / "previews" / f"{NAME}-4.png").is_file()
