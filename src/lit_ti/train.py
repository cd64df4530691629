"""`run(cfg)`: build the datamodule, method, callbacks, loggers and trainer from a Hydra config and fit."""

import logging
import re
import shlex
import sys
import time
import warnings
from importlib import resources
from pathlib import Path

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig, OmegaConf

from lit_ti.callbacks import EarlyStop, GracefulStop, RunResults
from lit_ti.callbacks.interrupt import interrupted
from lit_ti.callbacks.results import run_params
from lit_ti.cli import hydra_literal, shell_word
from lit_ti.config_checks import check_hydra_scope, check_missing, check_run, config_error
from lit_ti.errors import UserError, check_choice, check_number, report_user_errors
from lit_ti.io import paths
from lit_ti.io.checkpoint_io import read_checkpoint
from lit_ti.io.formats import final_suffixes
from lit_ti.labels import component, label
from lit_ti.run_folder import RunFolder


def _asset(name: str) -> str:
    """`${lit_ti.asset:toy_base}`: a folder shipped inside the package."""
    return str(resources.files("lit_ti").joinpath("assets", name))


TOY_PROMPTS = {"template": "toy", "captions": "toy_captions"}  # toy_prompts -> data.template


def _toy_data(
    concept: str, images: int = 16, prompts: str = "template", masks: bool = False, cutouts: bool = False
) -> str:
    """`${lit_ti.toy_data:orange_cross,16,template,false,false}`: a toy concept's training folder of `images`
    renders, rendered on first use (the first k renders of a concept are the same for every k); with
    `prompts=captions` its captions name the concept `[name]`, with `masks` each render has its subject mask,
    with `cutouts` each render is cut out onto every background at both sizes (`toy.world.write_concept`)."""
    check_choice("toy_prompts", prompts, tuple(TOY_PROMPTS))
    named = prompts == "captions"
    shipped = resources.files("lit_ti").joinpath("assets", "toy_concepts", concept)
    for key, value in (("toy_masks", masks), ("toy_cutouts", cutouts)):
        if not isinstance(value, bool):
            raise UserError(f"{key}={value}: use true or false")
    if masks and cutouts:
        raise UserError("toy_masks=true with toy_cutouts=true: a cut-out has no background to mask; choose one")
    if shipped.is_dir() and images == 16 and not named and not masks and not cutouts:
        return str(shipped)
    from lit_ti.toy.world import concept_parts, write_concept

    try:  # checked before anything is written: a bad name must not leave an empty folder behind
        concept_parts(concept)
    except ValueError as e:
        raise UserError(f"toy_concept: {e}") from None
    stem = concept if images == 16 else f"{concept}-{images}"
    folder = Path("outputs") / "toy_data" / (stem + "-named" * named + "-masked" * masks + "-cutouts" * cutouts)
    if not folder.is_dir():
        write_concept(concept, folder, n=int(images), named=named, masks=masks, cutouts=cutouts)
    return str(folder.resolve())


def _toy_template(prompts: str) -> str:
    """`${lit_ti.toy_template:${toy_prompts}}`: the template that goes with the toy folder's captions."""
    return TOY_PROMPTS[check_choice("toy_prompts", prompts, tuple(TOY_PROMPTS))]


def _toy_style(style: str) -> str:
    """`${lit_ti.toy_style:topleft}`: 32 renders of seen concepts in a style, rendered on first use."""
    from lit_ti.toy.world import STYLES, write_style

    if style not in STYLES[1:]:  # "plain" has no style to train or measure
        raise UserError(f"toy_style={style}: no such toy style; use one of {', '.join(STYLES[1:])}")
    folder = Path("outputs") / "toy_data" / f"style-{style}"
    if not folder.is_dir():
        write_style(style, folder)
    return str(folder.resolve())


def _toy_prior(images: int) -> str | None:
    """`${lit_ti.toy_prior:${toy_prior}}`: `images` renders of concepts the base model knows, captioned with their
    true words ("a large red square on a black background"), as prior images; 0 = none."""
    from lit_ti.toy.world import write_style

    images = check_number("toy_prior", images, 0, 4096, integer=True, hint="renders of other concepts; 0 = none")
    if not images:
        return None
    folder = Path("outputs") / "toy_data" / f"prior-{images}"
    if not folder.is_dir():
        write_style("plain", folder, n=images, seed=1)  # seed 1: not the plain renders of other folders
    return str(folder.resolve())


RESOLVERS = {
    "lit_ti.asset": _asset,
    "lit_ti.toy_data": _toy_data,
    "lit_ti.toy_template": _toy_template,
    "lit_ti.toy_style": _toy_style,
    "lit_ti.toy_prior": _toy_prior,
    "lit_ti.safe": component,  # run-folder names (configs/hydra/default.yaml): one safe path component
    "lit_ti.label": label,
}
for _name, _resolver in RESOLVERS.items():
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _resolver)


# Lightning warnings that do not apply to this kind of training
QUIET = (
    r"Found \d+ module\(s\) in eval mode",  # the frozen backbone is in eval mode on purpose
    r".*isinstance\(treespec, LeafSpec\)",  # lightning 2.6 against torch 2.13, harmless
    r"You're resuming from a checkpoint that ended before the epoch ended",  # EpochSampler resumes exactly
    r"The number of training batches \(\d+\) is smaller than the logging",  # we log per optimizer step
    r"You have overridden `transfer_batch_to_device`",  # on purpose: noise seeds stay on the host
)


def _named(group: str, node: DictConfig | None) -> list:
    """Instantiate every non-null entry of a named group (callbacks, logger)."""
    return [_build(f"{group}.{k}", c) for k, c in (node or {}).items() if c is not None and "_target_" in c]


def _build(key: str, node: DictConfig, **kwargs):
    """`instantiate`, with a bad argument in the config reported as a user mistake naming its key."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        # Hydra names the nested node that failed (`full_key: method.optimizer`); report that one
        if (m := re.search(r"full_key: (\S+)", str(e))) and m.group(1).startswith(key + "."):
            node, key = OmegaConf.select(node, m.group(1)[len(key) + 1 :]), m.group(1)
        if (error := config_error(key, node, e.__cause__)) is None:
            raise
        raise error from e


def _call(key: str, node: DictConfig, factory, **kwargs):
    try:
        return factory(**kwargs)
    except TypeError as e:
        if (error := config_error(key, node, e)) is None:
            raise
        raise error from e


def run(cfg: DictConfig, folder: RunFolder | None = None) -> float | None:
    """Train as the config says; return `cfg.optimized_metric` (for sweeps) when it was logged.

    Everything is validated before anything is written; see `lit_ti.run_folder` for what the run folder is
    promised.
    """
    start = time.time()
    check_missing(cfg)
    check_hydra_scope()
    check_run(cfg)
    for message in QUIET:
        warnings.filterwarnings("ignore", message=message)
    folder = folder or RunFolder(cfg.paths.output_dir)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    torch.set_float32_matmul_precision(cfg.get("float32_matmul_precision") or "highest")
    if cfg.get("ckpt_path"):
        read_checkpoint(cfg.ckpt_path)  # a damaged or foreign file is refused before anything is built
    datamodule = _build("data", cfg.data)
    # the spec goes in as an object: passed through instantiate() it would turn back into a config
    method = _build("method", cfg.method, _partial_=True)
    method = _call("method", cfg.method, method, backbone=_build("model", cfg.model))
    callbacks = _named("callbacks", cfg.get("callbacks"))
    loggers = _named("logger", cfg.get("logger"))
    _check_inside(folder.root, cfg, callbacks, loggers)
    checkpoint_dirs = [
        Path(c.dirpath) for c in callbacks if isinstance(c, ModelCheckpoint | GracefulStop) and c.dirpath
    ]
    if not cfg.get("ckpt_path"):
        folder.refuse_finished(method.name, checkpoint_dirs)
    folder.check_writable()
    folder.remove_stale(checkpoint_dirs)  # temp files of a killed run never became outputs
    # after the configured callbacks: the end-of-run evaluations have run when it collects the results
    results = RunResults(folder.root, *run_params(cfg))
    trainer = _build(
        "trainer", cfg.trainer, callbacks=[*callbacks, folder.callback(cfg), results], logger=loggers or False
    )
    with paths.run_folder(folder.root):
        for logger in loggers:
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        try:
            trainer.fit(method, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        except SystemExit as e:  # Lightning's answer to Ctrl-C it saw itself: its clean-up, then exit(1)
            if interrupted(trainer):
                _second_interrupt(checkpoint_dirs)
            if isinstance(e.__context__, KeyboardInterrupt) and not folder.training:
                raise KeyboardInterrupt from None  # while the model loaded or latents were cached: see _run_undoing
            raise
        except paths.WriteFailed as e:  # the trained state is in the last checkpoint: say how to go on
            last = next((d / "last.ckpt" for d in checkpoint_dirs if (d / "last.ckpt").is_file()), None)
            if last is None or not folder.training:
                raise
            raise paths.WriteFailed(f"{e}; then resume with ckpt_path={last}") from None
    return _report(cfg, trainer, callbacks, results, start)


def _second_interrupt(checkpoint_dirs: list[Path]) -> None:
    """Ctrl-C twice: no new checkpoint, but the newest one still resumes; say so and exit 130."""
    found = [p for d in checkpoint_dirs if d.is_dir() for p in d.glob("*.ckpt")]
    newest = max(found, key=lambda p: p.stat().st_mtime, default=None)
    rank_zero_info("[lit_ti] stopped at once (Ctrl-C twice)")
    if newest is not None:
        rank_zero_info(f"[lit_ti] checkpoint: {newest}\n[lit_ti] resume: {_resume_command(newest)}")
    sys.exit(130)


def _report(cfg: DictConfig, trainer: L.Trainer, callbacks: list, results: RunResults, start: float) -> float | None:
    """Print what was trained and where it is; exit 128 + signal after Ctrl-C/SIGTERM; return the metric."""
    metric = trainer.callback_metrics.get(cfg.get("optimized_metric") or "")
    out = Path(cfg.paths.output_dir)
    files = sorted(p.name for p in out.iterdir() if p.is_file() and p.suffix in final_suffixes())
    rank_zero_info(
        f"\n[lit_ti] trained '{cfg.name}' for {trainer.global_step} step{'s' * (trainer.global_step != 1)}"
        + f" in {time.time() - start:.0f} s"
        + (f"; {cfg.optimized_metric} = {float(metric):.4f}" if metric is not None else "")
        + "".join(f"\n[lit_ti] {line}" for line in results.lines())
        + (f"\n[lit_ti] results: {results.path}" if results.path.is_file() else "")
        + "".join(f"\n[lit_ti] {c.reason}" for c in callbacks if isinstance(c, EarlyStop) and c.reason)
        + f"\n[lit_ti] outputs: {out}  ({', '.join(files) or 'no embedding files'})"
        + f"\n[lit_ti] watch it: tensorboard --logdir {out}"
    )
    stop = next((c for c in callbacks if isinstance(c, GracefulStop) and c.received is not None), None)
    if stop is not None:
        rank_zero_info(f"[lit_ti] stopped by {stop.received.name} at step {trainer.global_step}")
        if stop.checkpoint is not None:  # None when training was ending anyway (max steps, NaN guard)
            rank_zero_info(
                f"[lit_ti] checkpoint: {stop.checkpoint}\n[lit_ti] resume: {_resume_command(stop.checkpoint)}"
            )
        sys.exit(128 + stop.received)
    return float(metric) if metric is not None else None


def _resume_command(checkpoint: Path) -> str:
    return f"python train.py {' '.join(_overrides())} {_shell_literal('ckpt_path', str(checkpoint))}"


def _shell_literal(key: str, value: str) -> str:
    """`key=value` as one shell word that Hydra reads back as `value` (`cli.hydra_literal`)."""
    return shell_word(hydra_literal(key, value))


def _overrides() -> list[str]:
    """The command line's overrides (to print a resume command), or [] outside a Hydra run."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hydra = HydraConfig.get()
        kept = [shlex.quote(o) for o in hydra.overrides.task if not o.startswith(("ckpt_path=", "hydra.run.dir="))]
        return [*kept, _shell_literal("hydra.run.dir", hydra.runtime.output_dir)]  # resume into the same folder
    except ValueError:
        return []


def _check_inside(root: Path, cfg: DictConfig, callbacks: list, loggers: list) -> None:
    """Every configured output folder lies inside the run folder (refused up front, naming its key)."""
    named = [(f"callbacks.{k}", c) for k, c in _keys("callbacks", cfg.get("callbacks"), callbacks)]
    named += [(f"logger.{k}", lg) for k, lg in _keys("logger", cfg.get("logger"), loggers)]
    for key, obj in named:
        for attr in ("dirpath", "path", "save_dir"):
            value = getattr(obj, attr, None)
            if isinstance(value, str | Path) and value:
                try:
                    paths.inside(value, root)
                except UserError:
                    raise UserError(
                        f"{key}.{attr}={value}: lies outside the run folder {root}; lit_ti writes only inside "
                        "it: point it below hydra.run.dir (or leave it at its default)"
                    ) from None


def _keys(group: str, node: DictConfig | None, built: list) -> list[tuple[str, object]]:
    keys = [k for k, c in (node or {}).items() if c is not None and "_target_" in c]
    return list(zip(keys, built, strict=True))


def _caused_by_user(error: BaseException) -> bool:
    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, UserError):
        cause = cause.__cause__ or cause.__context__
    return cause is not None


def _run_undoing(cfg: DictConfig, folder: RunFolder) -> float | None:
    """`run`; a user error or Ctrl-C before training began removes what this process made in the run folder."""
    try:
        return run(cfg, folder)
    except KeyboardInterrupt:  # loading a model or caching latents can take minutes: a stop there keeps nothing
        if folder.training:
            raise
        folder.undo()
        rank_zero_info("[lit_ti] stopped (Ctrl-C) before training began; nothing was trained, nothing kept")
        sys.exit(130)
    except Exception as e:
        if _caused_by_user(e):
            folder.undo()
        raise


def _not_an_advert(record: logging.LogRecord) -> bool:
    """Lightning's tip to install its cloud logger: nothing a lit_ti user can act on, at the top of every run."""
    return not str(record.msg).startswith("💡 Tip")


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_not_an_advert)


def log_to_run_folder() -> None:
    """Send Lightning's lines (ours among them: `rank_zero_info`) and Python warnings to the handlers Hydra set
    up, the console and `<run>/train.log`. Lightning keeps a console handler of its own when it is imported
    before logging is configured, as train.py does, and its lines then never reached the log file."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized() or not logging.getLogger().handlers:
        return  # not a command-line run: the caller's logging (and warnings capture) stays as it is
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if type(h) is logging.StreamHandler]:
            logger.removeHandler(handler)
        logger.propagate = True
    logging.captureWarnings(True)


def main(cfg: DictConfig) -> float | None:
    """`run` with user mistakes reported as one line (exit status 2) instead of a traceback."""
    log_to_run_folder()
    try:
        return report_user_errors(_run_undoing, cfg, RunFolder(cfg.paths.output_dir))
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
