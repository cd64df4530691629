"""Every experiment composes and instantiates without loading a model."""

from pathlib import Path

import lightning as L
import pytest
import torch
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


REAL = ["model=diffusers", "model.path=/m", "data=concept", "data.dir=/d", "name=zz"]


def test_experiment_values(tmp_path):
    subject = compose("experiment=ti_subject", *REAL, f"paths.output_dir={tmp_path}")
    style = compose("experiment=ti_style", *REAL, f"paths.output_dir={tmp_path}")
    assert subject.data.template == "subject" and style.data.template == "style"
    assert subject.method.optimizer.lr == style.method.optimizer.lr == 0.005
    assert subject.method.optimizer.weight_decay == 0.0


def test_dreamartist_experiment_values(tmp_path):
    char = compose("experiment=dreamartist_character", *REAL, f"paths.output_dir={tmp_path}")
    style = compose("experiment=dreamartist_style", *REAL, f"paths.output_dir={tmp_path}")
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


# Arguments the code passes at run time, not the config (train.py: method(backbone=...), trainer(callbacks=..., logger=...)).
RUNTIME = {"backbone", "callbacks", "logger"}
COMPOSITIONS = [
    [],
    ["debug=smoke"],
    ["hparams_search=optuna"],
    ["callbacks=[default,early_stop]"],
    ["method=dreamartist"],
    ["method=hypernetwork"],
    ["model=tiny", "model.size=small"],
    ["model=single_file", "model.path=/m.safetensors", "data=concept", "data.dir=/d", "name=zz"],
    ["model=diffusers", "model.path=/m", "data=concept", "data.dir=/d", "name=zz", "method=hypernetwork"],
    *[[f"experiment={e}"] for e in EXPERIMENTS],
]


def constructor_arguments(target) -> tuple[set[str], bool]:
    """The named arguments `target` takes (through `**kwargs` passed on to base classes), and whether it also
    takes arbitrary keywords."""
    import inspect

    if not inspect.isclass(target):
        params = inspect.signature(target).parameters.values()
        return {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}, any(
            p.kind is p.VAR_KEYWORD for p in params
        )
    names: set[str] = set()
    for cls in target.__mro__:
        if "__init__" not in vars(cls):
            continue
        params = inspect.signature(cls.__init__).parameters.values()
        names |= {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)} - {"self"}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return names, False
    return names, True


def targets(node, path=""):
    """(key path, node) for every node of a config that has a `_target_`."""
    if OmegaConf.is_dict(node):
        if "_target_" in node:
            yield path, node
        for k in node:
            yield from targets(node._get_node(k), f"{path}.{k}" if path else str(k))
    elif OmegaConf.is_list(node):
        for i, item in enumerate(node):
            yield from targets(item, f"{path}[{i}]")


@pytest.mark.parametrize("overrides", COMPOSITIONS, ids=lambda o: " ".join(o) or "default")
def test_config_keys_are_constructor_arguments(overrides):
    """lit_ti's own targets: the keys equal the constructor's arguments (minus what the code passes); other
    libraries' targets: every key is an argument."""
    from hydra.utils import get_object

    cfg = compose(*overrides)
    for path, node in targets(cfg):
        params, takes_any = constructor_arguments(get_object(node._target_))
        keys = {k for k in node if not str(k).startswith("_")}
        assert takes_any or keys <= params, f"{path}: {node._target_} takes no {sorted(keys - params)}"
        if node._target_.startswith("lit_ti."):
            missing = params - keys - RUNTIME
            assert not missing, f"{path}: {node._target_}'s arguments {sorted(missing)} have no config key"


def test_toy_tuning_reaches_only_toy_data(tmp_path):
    """Nothing tuned for the toy world (vectors, rates, timesteps, steps, latent sampling, preview prompt,
    toy evaluation) reaches a run on the user's data, with or without an experiment."""
    base = ["model=diffusers", "model.path=/m", "data=concept", "data.dir=/d", "name=zz"]
    for experiment in [None, *EXPERIMENTS]:
        real = compose(*base, *([f"experiment={experiment}"] if experiment else []))
        assert real.method.min_timestep == 0 and real.data.latent_sampling == "once", experiment
        assert real.trainer.max_steps >= 2000 and real.save_every_n_steps == 500, experiment
        assert real.data.template != "toy" and real.callbacks.toy_eval is None, experiment
        assert real.callbacks.toy_style_eval is None, experiment
        if real.method._target_.endswith("TextualInversion"):
            assert real.method.num_vectors == 1 and real.method.optimizer.lr == 0.005, experiment


def test_default_run_is_the_toy_run():
    """`python train.py` is the toy TI run of docs/results.md, value for value."""
    cfg = compose()
    assert cfg.name == "toy-concept" and cfg.data.template == "toy" and cfg.data.latent_sampling == "deterministic"
    assert (cfg.method.num_vectors, cfg.method.optimizer.lr, cfg.method.min_timestep) == (2, 0.01, 200)
    assert cfg.trainer.max_steps == 600 and cfg.callbacks.export.every_n_steps == 200
    assert cfg.callbacks.model_checkpoint.every_n_train_steps == cfg.callbacks.preview.every_n_steps == 200
    assert cfg.callbacks.toy_eval.concept == "purple_star"


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_on_the_toy_world_is_toy_sized(experiment):
    cfg = compose(f"experiment={experiment}")
    assert cfg.trainer.max_steps <= 600 and cfg.method.optimizer.lr >= 1e-3
    assert (cfg.callbacks.toy_eval or cfg.callbacks.toy_style_eval)._target_.startswith("lit_ti.callbacks.Toy")


@pytest.mark.parametrize("experiment", [e for e in EXPERIMENTS if not e.startswith("hypernetwork")])
def test_toy_prompts_reach_every_embedding_experiment(tmp_path, monkeypatch, experiment):
    """`toy_prompts=captions` prompts each render with its own caption (or `a <token>`), the concept as the
    token, whatever the experiment's or the toy tuning's template; the default keeps the toy template's lines."""
    import random

    from lit_ti.data.dataset import ConceptDataset

    monkeypatch.chdir(tmp_path)  # the toy folders render into outputs/toy_data under the working directory
    plain = compose(f"experiment={experiment}", "toy_images=2")
    assert plain.data.template == "toy", experiment
    cfg = compose(f"experiment={experiment}", "toy_images=2", "toy_prompts=captions", "toy_concept=orange_cross")
    assert cfg.data.template == "toy_captions", experiment
    dm = instantiate(cfg.data)
    dm.setup()
    truth = [c.replace("[name]", "orange cross") for c in dm.captions]
    assert len(truth) == 2 and all(c.count("[name]") == 1 and "orange" not in c for c in dm.captions)
    dm.mean = [torch.zeros(1, 4, 8, 8)] * 2  # prompts only: no VAE pass
    dataset = ConceptDataset(dm)
    seen = set()
    for seed in random.Random(0).sample(range(10**6), 16):
        sample = dataset[(seed % 2, seed)]
        prompt = sample["prompt"].replace(cfg.name, "orange cross")
        assert prompt in (truth[sample["index"]], "a orange cross")  # its caption, or the token alone
        seen.add(prompt == "a orange cross")
    assert seen == {True, False}


@pytest.mark.parametrize(
    ("choices", "overrides", "message"),
    [
        ({"data": "toy", "model": "toy"}, ["data.dir=/d"], "data.dir=/d: data=toy renders the toy world's images"),
        ({"data": "toy", "model": "diffusers"}, [], "model=diffusers with data=toy"),
        ({"data": "toy", "model": "single_file"}, ["name=x"], "model=single_file with data=toy"),
        ({"data": "toy", "model": "toy"}, ["+data.dir=/d"], "data=concept"),
    ],
)
def test_toy_data_does_not_mix_with_the_users_world(choices, overrides, message):
    from lit_ti.config_checks import check_scope
    from lit_ti.errors import UserError

    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        check_scope(choices, overrides)


@pytest.mark.parametrize(
    ("choices", "overrides"),
    [
        ({"data": "toy", "model": "toy"}, []),
        ({"data": "toy", "model": "tiny"}, []),
        ({"data": "concept"}, ["data.dir=/d"]),
    ],
)
def test_toy_scope_allows_the_toy_world_and_the_users(choices, overrides):
    from lit_ti.config_checks import check_scope

    check_scope(choices, overrides)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [(["model=diffusers", "data=concept", "data.dir=/d"], "name"), (["model=diffusers", "name=x"], "model.path")],
)
def test_a_missing_value_is_one_line_naming_the_key(overrides, key):
    from lit_ti.config_checks import check_missing
    from lit_ti.errors import UserError

    with pytest.raises(UserError, match=f"^{key}: missing; give it on the command line, e.g. {key}="):
        check_missing(compose(*overrides))
