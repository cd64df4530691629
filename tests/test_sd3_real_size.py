"""SD3.5 medium and large at their real layer sizes (random weights): the shared-block models have exactly the
real models' architecture and compute what an unshared model with the same weights computes (default lane);
2 CPU training steps at 128 px with and without T5 vectors, with peak RSS (slow lane)."""

import json
import os
import time
from pathlib import Path

import pytest
import torch
from diffusers import SD3Transformer2DModel
from lightning.pytorch.callbacks import Callback
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from lit_ti.models.real_size_sd3 import CONFIGS, clip, mmdit, t5_encoder
from lit_ti.models.single_file import shipped_folder
from lit_ti.models.tiny_sd3 import SIZES
from tests.conftest import make_concept_dir


def builders(folder: Path) -> dict:
    """part -> (build(share), the unshared model) from a config folder."""
    transformer = SD3Transformer2DModel.load_config(folder / "transformer")
    return {
        "transformer": (lambda s: mmdit(transformer, s)),
        "clip_l": (lambda s: clip(CLIPTextConfig.from_pretrained(folder / "text_encoder"), s)),
        "clip_g": (lambda s: clip(CLIPTextConfig.from_pretrained(folder / "text_encoder_2"), s)),
        "t5": (lambda s: t5_encoder(T5Config.from_pretrained(folder / "text_encoder_3"), s)),
    }


@pytest.mark.parametrize("name", CONFIGS)
def test_shared_blocks_keep_the_real_architecture(name):
    with torch.device("meta"):
        for part, build in builders(shipped_folder(name)).items():
            shared, whole = build(True).state_dict(), build(False).state_dict()
            # every weight of the real model, at its real shape: the same modules at the same depths
            assert {k: v.shape for k, v in shared.items()} == {k: v.shape for k, v in whole.items()}, part
    with torch.device("meta"):
        shared = builders(shipped_folder(name))["transformer"](True)
    assert len(shared.transformer_blocks) == shared.config.num_layers  # each block runs at every depth
    assert len({id(b) for b in shared.transformer_blocks}) == (3 if name == "sd35_medium" else 2)


def test_a_shared_model_computes_what_the_unshared_one_with_its_weights_does():
    torch.manual_seed(0)
    sizes = SIZES["sd35_tiny"]
    transformer = dict(
        sample_size=8, in_channels=16, out_channels=16, joint_attention_dim=96, caption_projection_dim=32,
        pooled_projection_dim=80, **{**sizes["transformer"], "num_layers": 5, "dual_attention_layers": (0, 1)},
    )  # fmt: skip
    clip_config = dict(vocab_size=99, **{**sizes["clip_g"], "num_hidden_layers": 3})
    t5_config = dict(vocab_size=99, is_encoder_decoder=False, **{**sizes["t5"], "num_layers": 3})
    parts = {  # part -> (the shared model, the unshared one)
        "transformer": (mmdit(transformer, True), SD3Transformer2DModel.from_config(transformer)),
        "clip": (clip(CLIPTextConfig(**clip_config), True), CLIPTextModelWithProjection(CLIPTextConfig(**clip_config))),
        "t5": (t5_encoder(T5Config(**t5_config), True), T5EncoderModel(T5Config(**t5_config))),
    }
    ids = torch.randint(0, 99, (2, 7))
    inputs = {
        "transformer": dict(
            hidden_states=torch.randn(2, 16, 8, 8), encoder_hidden_states=torch.randn(2, 5, 96),
            pooled_projections=torch.randn(2, 80), timestep=torch.tensor([10.0, 500.0]),
        ),
        "clip": dict(input_ids=ids),
        "t5": dict(input_ids=ids),
    }  # fmt: skip
    for part, (shared, whole) in parts.items():
        whole.load_state_dict(shared.state_dict())  # every depth gets the shared block's weights
        with torch.no_grad():
            a, b = shared.eval()(**inputs[part])[0], whole.eval()(**inputs[part])[0]
        assert torch.equal(a, b), part


class StepTimes(Callback):
    """Writes each training step's wall and CPU seconds (all threads) and the load average to `out` (JSON).

    On a shared machine the wall time says how busy it was; the CPU time is the step's own work."""

    def __init__(self, out: str) -> None:
        self.out, self.steps, self.t0 = Path(out), [], (0.0, 0.0)

    def on_train_batch_start(self, *args) -> None:
        self.t0 = (time.perf_counter(), time.process_time())

    def on_train_batch_end(self, *args) -> None:
        wall, cpu = time.perf_counter() - self.t0[0], time.process_time() - self.t0[1]
        self.steps.append({"wall_s": wall, "cpu_s": cpu, "load": os.getloadavg()[0]})
        self.out.write_text(json.dumps(self.steps))


@pytest.mark.slow
@pytest.mark.parametrize("encoders", ["clip_l,clip_g", "clip_l,clip_g,t5"])
@pytest.mark.parametrize("config", ["sd35_medium", "sd35_large"])
def test_real_size_sd35_trains_two_steps_on_cpu(train_measured, tmp_path, config, encoders):
    from lit_ti import io

    run, log = tmp_path / "run", tmp_path / "train.log"
    code, rss = train_measured(
        [
            "model=real_size_sd3",
            f"model.config={config}",
            "data=concept",
            f"data.dir={make_concept_dir(tmp_path / 'data', n=2, size=128)}",
            "data.resolution=128",
            "name=zz-concept",
            f"method.encoders=[{encoders}]",
            "trainer.max_steps=2",
            "trainer.precision=bf16-mixed",
            "callbacks.preview=null",
            "callbacks.toy_eval=null",
            "callbacks.model_checkpoint=null",
            "~logger",
            "+callbacks.steps._target_=tests.test_sd3_real_size.StepTimes",
            f"+callbacks.steps.out={tmp_path / 'steps.json'}",
            f"hydra.run.dir={run}",
        ],
        log,
    )
    assert code == 0, log.read_text()[-3000:]
    vectors = io.read_embedding(run / "zz-concept.safetensors")[0].vectors
    want = {"clip_l": 768, "clip_g": 1280, **({"t5xxl": 4096} if "t5" in encoders else {})}
    assert {k: v.shape[1] for k, v in vectors.items()} == want
    steps = json.loads((tmp_path / "steps.json").read_text())
    said = ", ".join(f"{s['wall_s']:.0f} s wall / {s['cpu_s']:.0f} s CPU (load {s['load']:.1f})" for s in steps)
    print(f"\n{config} [{encoders}]: peak RSS {rss:.2f} GiB; steps: {said}")
    assert len(steps) == 2 and rss < 12  # one block of each kind in memory: far below the real weights
