"""At the end of training on a toy concept, measure how well it was learned (see lit_ti.toy.evaluation)."""

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from lit_ti.callbacks.interrupt import Stopped, stoppable
from lit_ti.errors import UserError, check_choice, check_number
from lit_ti.methods import HypernetworkMethod
from lit_ti.toy.evaluation import check_concept, check_samples, evaluate
from lit_ti.toy.style import evaluate_style
from lit_ti.toy.world import STYLES

TOY_MODEL = "toy_base"  # the shipped model's folder name; on any other model there is no ground truth


class ToyEvaluation(L.Callback):
    """Logs `eval/recovery` and `eval/accuracy` (plus the four losses) to the loggers and the trainer's
    metrics, so sweeps can optimise them.

    Args:
        concept: the toy concept the data shows, `<colour>_<shape>` (e.g. `purple_star`).
        samples: generated images judged by the classifier.
        lora_strength: the strength the learned measures apply a method's model change at (pivotal tuning's LoRA,
            as A1111's `<lora:name:0.75>`); the initial and oracle measures use the base model at any strength.
        lora_max_timestep: the learned measures' samples apply that change only in steps below this timestep
            (generate.py's `lora_max_timestep`); null = in every step.
    """

    def __init__(
        self, concept: str, samples: int = 32, lora_strength: float = 1.0, lora_max_timestep: int | None = None
    ) -> None:
        self.concept = check_concept("callbacks.toy_eval.concept", concept)
        self.samples = check_samples("callbacks.toy_eval.samples", samples)
        self.lora_strength = check_number("callbacks.toy_eval.lora_strength", lora_strength, -10, 10)
        self.lora_max_timestep = check_number(
            "callbacks.toy_eval.lora_max_timestep", lora_max_timestep, 1, 10_000, integer=True, optional=True
        )
        self.init: dict | None = None
        self.results: dict = {}

    def setup(self, trainer, pl_module, stage: str) -> None:
        changed = {"lora_strength": self.lora_strength != 1.0, "lora_max_timestep": self.lora_max_timestep is not None}
        for key in (k for k, set_ in changed.items() if set_ and not pl_module.changes_model):  # said before training
            raise UserError(
                f"callbacks.toy_eval.{key}={getattr(self, key)}: {type(pl_module).__name__} trains no LoRA to apply; "
                "leave it at its default (it is for method=pivotal)"
            )

    def on_train_start(self, trainer, pl_module) -> None:
        if self.init is None and pl_module.concept_bank is not None:
            self.init = {k: v.detach().clone() for k, v in pl_module.concept_bank.vectors.items()}

    def state_dict(self) -> dict:
        return {"init": self.init}  # a resumed run still measures against the very first vectors

    def load_state_dict(self, state_dict: dict) -> None:
        self.init = state_dict["init"]

    @rank_zero_only
    def on_train_end(self, trainer, pl_module) -> None:
        if pl_module.concept_bank is None:
            return  # not a concept-embedding method (hypernetworks are judged by lit_ti.toy.style)
        if pl_module.backbone.name != TOY_MODEL:
            rank_zero_info(
                f"[lit_ti] toy evaluation skipped: the model is not the toy base ({pl_module.backbone.name})"
            )
            return
        init = {k: v.to(pl_module.device) for k, v in self.init.items()}
        try:  # a stop, before or during it, gives it up: it takes minutes, and evaluate.py runs it on the files
            with (
                stoppable(trainer, "toy evaluation"),
                pl_module.as_exported(),  # judge what the files hold
                pl_module.applied_at(self.lora_strength, self.lora_max_timestep),  # as the user applies them
            ):
                self.results = evaluate(pl_module, self.concept, init, samples=self.samples)
        except Stopped:
            files = f"{trainer.default_root_dir}/{pl_module.name}.pt"
            rank_zero_info(
                f"[lit_ti] toy evaluation skipped (interrupted); to run it: python evaluate.py {files} {self.concept}"
            )
            return
        # results, not points on a curve: RunResults logs them with the run's settings (final/eval/*)
        metrics = {f"eval/{k}": v for k, v in self.results.items()}
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})


class ToyStyleEvaluation(L.Callback):
    """At the end of a hypernetwork run on the toy model: `eval/style_rate` (share of samples in the style for
    unseen captions) and `eval/accuracy` (shape and colour still right), each also for the base model
    (`_base`), and `eval/accuracy_drop`.

    Args:
        style: the toy style trained (`topleft` or `night`, see `lit_ti.toy.style`).
        samples: generated images per measure.
    """

    def __init__(self, style: str = "topleft", samples: int = 32) -> None:
        self.style = check_choice("callbacks.toy_style_eval.style", style, STYLES[1:])
        self.samples = check_samples("callbacks.toy_style_eval.samples", samples, low=1)
        self.results: dict = {}

    @rank_zero_only
    def on_train_end(self, trainer, pl_module) -> None:
        if not isinstance(pl_module, HypernetworkMethod) or pl_module.backbone.name != TOY_MODEL:
            rank_zero_info("[lit_ti] toy style evaluation skipped: needs a hypernetwork on the toy base model")
            return
        try:
            with stoppable(trainer, "toy style evaluation"):
                self.results = evaluate_style(pl_module, style=self.style, samples=self.samples)
        except Stopped:
            rank_zero_info("[lit_ti] toy style evaluation skipped (interrupted)")
            return
        # results, not points on a curve: RunResults logs them with the run's settings (final/eval/*)
        metrics = {f"eval/{k}": v for k, v in self.results.items()}
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
