"""Checks on the composed config as a whole, made once before anything is built or written; what each value
may be is checked by the constructor that owns it.

* Every mandatory value (`???`) is given: one line naming the key, instead of OmegaConf's traceback.
* Values no lit_ti constructor owns (the run's seed, Lightning's Trainer arguments) are in range.
* The toy world keeps to itself: its data (and the settings tuned for it, configs/tuning/toy/) must not reach
  a run on the user's own model, and the user's folder must not be silently replaced by toy renders. The
  config tree does most of this (toy tuning applies only with `data=toy`); what it cannot express — which
  groups the user chose on the command line — is checked here.
"""

import importlib.metadata
import importlib.util
import re

from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, ListConfig, OmegaConf

from lit_ti.errors import MAX_PERIOD, UserError, check_choice, check_number, check_seed, quote

MAX_ACCUMULATION = 1024  # micro-batches per optimizer step


def check_run(cfg: DictConfig) -> None:
    """One UserError naming the first out-of-range value among the top-level seed and `trainer.*`."""
    check_seed("seed", cfg.get("seed"))
    trainer = cfg.get("trainer") or {}
    key = "trainer."
    check_number(key + "max_steps", trainer.get("max_steps"), 1, MAX_PERIOD, integer=True, hint="optimizer steps")
    accumulate = trainer.get("accumulate_grad_batches", 1)
    check_number(key + "accumulate_grad_batches", accumulate, 1, MAX_ACCUMULATION, integer=True)
    check_number(key + "gradient_clip_val", trainer.get("gradient_clip_val"), 0, 1e6, optional=True, hint="0 = off")
    if trainer.get("gradient_clip_algorithm") is not None:
        check_choice(key + "gradient_clip_algorithm", trainer.get("gradient_clip_algorithm"), ("norm", "value"))
    check_number(key + "log_every_n_steps", trainer.get("log_every_n_steps", 50), 1, MAX_PERIOD, integer=True)


EXAMPLES = {  # what a missing key wants, for the message
    "name": "name=my-cat (the word for prompts and the name of the files)",
    "model.path": "model.path=/models/stable-diffusion-v1-5",
    "data.dir": "data.dir=/data/my-cat (a folder of images)",
}


def check_missing(cfg: DictConfig) -> None:
    """Refuse a config with a mandatory value left unset, naming the first such key."""
    for key in _missing(cfg, ""):
        example = EXAMPLES.get(key, f"{key}=<value>")
        raise UserError(f"{key}: missing; give it on the command line, e.g. {example}")


def _missing(node, prefix: str):
    keys = node.keys() if isinstance(node, DictConfig) else range(len(node))
    for key in keys:
        path = f"{prefix}.{key}" if prefix else str(key)
        if path == "hydra":
            continue
        if OmegaConf.is_missing(node, key):
            yield path
            continue
        child = node._get_node(key)
        if isinstance(child, DictConfig | ListConfig) and not child._is_missing() and not child._is_none():
            yield from _missing(child, path)


TOY_MODELS = ("toy", "tiny", "tiny_sd3")  # the models toy data is made for: the toy base, and the random test backbones


def check_scope(choices: dict[str, str | None], overrides: list[str]) -> None:
    """Refuse a run that would mix the toy world with the user's world.

    `choices` are Hydra's group choices (`hydra.runtime.choices`), `overrides` the command line's.
    """
    if choices.get("data") != "toy":
        return
    given = next((o for o in overrides if o.lstrip("+~").split("=")[0] == "data.dir"), None)
    if given is not None:
        raise UserError(
            f"{given}: data=toy renders the toy world's images and its toy-tuned settings; "
            "add data=concept to train on your own folder"
        )
    model = choices.get("model")
    if model not in TOY_MODELS:
        raise UserError(
            f"model={model} with data=toy: the toy world's images and settings are tuned for the toy model; "
            "train your model on your own images with data=concept data.dir=<folder>"
        )


def check_hydra_scope() -> None:
    """`check_scope` on the running Hydra job's choices and overrides (nothing to check outside a Hydra run)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    hydra = HydraConfig.get()
    check_scope(dict(hydra.runtime.choices), list(hydra.overrides.task))


def config_error(key: str, node: DictConfig, cause: BaseException | None) -> UserError | None:
    """A UserError for what the config got wrong (a `_target_` that cannot be imported, an unknown or missing
    argument, a value the library rejects), or None for a bug."""
    if isinstance(cause, UserError):
        return cause
    target = node.get("_target_", "?")
    if isinstance(cause, ImportError) and (m := re.search(r"Error loading '([^']+)'", str(cause))):
        return _unimportable(key, m.group(1))
    if isinstance(cause, TypeError):
        if m := re.search(r"unexpected keyword argument '(\w+)'", str(cause)):
            return UserError(f"{key}.{m.group(1)}: {target} takes no such argument; remove it or fix its spelling")
        if m := re.search(r"missing \d+ required \w+ argument[s]?: (.+)$", str(cause)):
            return UserError(f"{key}: {target} needs {m.group(1)}; set it in the config or on the command line")
    if isinstance(cause, ValueError | MisconfigurationException) and key.split(".")[0] in (
        "trainer",
        "callbacks",
        "logger",
    ):
        return UserError(f"{key}: {cause}")
    return None


def _unimportable(key: str, target: str) -> UserError:
    """A `_target_` Python cannot import: a package that is not installed (named with the pip command, and
    lit_ti's extra when it has one) or a misspelt name."""
    top = target.split(".")[0]
    where = f"{key}._target_={quote(target)}"
    if importlib.util.find_spec(top) is None:
        extra = _extras().get(_normal(top))
        fix = f"pip install -e \".[{extra}]\" (lit_ti's '{extra}' extra)" if extra else f"pip install {top}"
        return UserError(f"{where}: the package '{top}' is not installed; install it with {fix}")
    return UserError(f"{where}: no such class or function; check its spelling")


def _extras() -> dict[str, str]:
    """Optional distributions of lit_ti (pyproject.toml's extras) by normalised name -> the extra naming them."""
    try:
        requires = importlib.metadata.requires("lit_ti") or []
    except importlib.metadata.PackageNotFoundError:
        return {}
    found = {}
    for line in requires:
        if m := re.match(r"([A-Za-z0-9_.-]+).*extra\s*==\s*['\"]([\w-]+)['\"]", line):
            found.setdefault(_normal(m.group(1)), m.group(2))
    return found


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()
