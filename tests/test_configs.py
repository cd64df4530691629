"""Every experiment composes and instantiates without loading a model."""

from pathlib import Path

import lightning as L
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lit_ti.train import _named
from tests.conftest import CONFIGS, compose

EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))


def test_experiments_are_found():
    assert {"ti_subject", "ti_style", "dreamartist_character", "dreamartist_style"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("overrides", [[], ["debug=smoke"], *[[f"experiment={e}"] for e in EXPERIMENTS]])
def test_config_composes_and_instantiates_without_loading(tmp_path, overrides):
    cfg = compose(*overrides, f"paths.output_dir={tmp_path}")
    OmegaConf.resolve(cfg)
    datamodule = instantiate(cfg.data)
    method = instantiate(cfg.method, _partial_=True)(backbone=instantiate(cfg.model))
    callbacks = _named("callbacks", cfg.callbacks)
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=_named("logger", cfg.logger))
    assert isinstance(trainer, L.Trainer)
    assert method.backbone is None, "the backbone must load in configure_model, not at config time"
    assert Path(datamodule.dir).is_dir()
    assert datamodule.name == method.name == cfg.name
    assert {"export", "preview", "loss_csv", "model_checkpoint"} <= set(cfg.callbacks)


def test_experiments_only_override():
    """Experiments are deltas on the defaults: no _target_ of their own."""
    for path in (CONFIGS / "experiment").glob("*.yaml"):
        text = path.read_text()
        assert text.startswith("# @package _global_")
        assert "_target_" not in text


def test_experiment_values(tmp_path):
    subject = compose("experiment=ti_subject", f"paths.output_dir={tmp_path}")
    style = compose("experiment=ti_style", f"paths.output_dir={tmp_path}")
    assert subject.data.template == "subject" and style.data.template == "style"
    assert subject.method.optimizer.lr == style.method.optimizer.lr == 0.005
    assert subject.method.optimizer.weight_decay == 0.0


def test_dreamartist_experiment_values(tmp_path):
    char = compose("experiment=dreamartist_character", f"paths.output_dir={tmp_path}")
    style = compose("experiment=dreamartist_style", f"paths.output_dir={tmp_path}")
    for cfg, lr, w, template in ((char, 0.003, 3.0, "subject"), (style, 0.005, 5.0, "style_filewords")):
        assert cfg.method._target_ == "lit_ti.methods.DreamArtist"
        assert (cfg.method.optimizer.lr, cfg.method.cfg_scale, cfg.data.template) == (lr, w, template)
        assert (cfg.method.num_vectors, cfg.method.neg_num_vectors) == (3, 6)
        assert cfg.method.ema_decay == cfg.method.neg_ema_decay == 0.97
        assert cfg.callbacks.preview.negative_prompt == "[name]-neg"
    assert char.trainer.max_steps == 5000 and style.trainer.max_steps == 2000


def test_callbacks_switch_off(tmp_path):
    cfg = compose("callbacks.preview=null", f"paths.output_dir={tmp_path}")
    names = [type(c).__name__ for c in _named("callbacks", cfg.callbacks)]
    assert "PreviewImages" not in names and "ExportEmbeddings" in names


def test_model_groups():
    cfg = compose("model=diffusers", "model.path=/somewhere/sd15")
    spec = instantiate(cfg.model)
    assert type(spec).__name__ == "DiffusersFolder" and spec.path == "/somewhere/sd15"
