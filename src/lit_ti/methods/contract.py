"""The method contract: what every method must provide, written down as abstract members.

`DiffusionMethod` (`methods/base.py`) inherits it; a subclass missing one member cannot be constructed (see
docs/architecture.md, "Adding a method"): what trains (`checkpointed`, `build_trainables`, `param_groups`),
how prompts become UNet conditioning (`encode_prompts`), what it exports and where (`export`,
`periodic_dirname`), and what previews and evaluations need (`export_images`, `concept_bank`). The members with
a default (`base_model`, `applied_at`, `learned`, the class attributes) are facts a method states only when they differ.
"""

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

from lit_ti.models import Backbone
from lit_ti.modules.embedding_bank import EmbeddingBank
from lit_ti.modules.text_conditioning import Conditioning


class MethodContract(ABC):
    """The members a method provides; each docstring is its specification."""

    needs_pixels = False  # whether training steps need the images themselves (a pixel-space loss)
    # whether the trained tensors act inside the UNet or text encoders, not only through the prompt's tokens:
    # then `base_model()` switches them off, and the toy evaluation also checks what else they change
    changes_model = False
    # whether `step_loss` trains on the datamodule's prior images (`data.prior_dir`, the `prior_*` batch keys):
    # they never name the concept, so they serve only a method whose tensors act without the concept's token
    learns_prior = False

    # ----------------------------------------------------------------- the contract: what trains
    @property
    @abstractmethod
    def checkpointed(self) -> tuple[str, ...]:
        """Prefixes of the submodules that train (made by `build_trainables`): Lightning checkpoints hold these
        and nothing else, and `io.checkpoint_io.TRAINED` lists every method's. A class attribute in methods."""

    @abstractmethod
    def build_trainables(self, backbone: Backbone) -> None:
        """Make the trainable modules, once the frozen `backbone` is loaded (and attach them to it when they act
        inside the UNet or text encoder). Called once, by `configure_model`, before the optimizer exists."""

    @abstractmethod
    def param_groups(self) -> list[dict]:
        """Optimizer groups; a group's optional `lr_weight` scales the optimizer's lr for it (kept by the
        LR schedule)."""

    # ----------------------------------------------------------------- the contract: prompts -> conditioning
    @abstractmethod
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """UNet conditioning (states `[B, 77, d]`, SDXL's pooled `[B, 1280]`) for a list of prompts, with the
        trained tensors in it (training steps, previews and evaluations all go through here)."""

    # ----------------------------------------------------------------- the contract: exports
    @property
    @abstractmethod
    def periodic_dirname(self) -> str:
        """Folder (under the run folder) of the periodic copies `callbacks.export` writes. A class attribute."""

    @abstractmethod
    def export(self, directory: Path, step: int, tag: str = "", formats=("pt", "safetensors")) -> list[Path]:
        """Write what trained as files other tools load, `<directory>/<name><tag>.<format>` for each of
        `formats` (names from `io.formats`; a UserError naming `callbacks.export.formats` for one this method
        cannot write). `tag` (`-<step>`) marks periodic copies. Returns the paths written (rank zero only)."""

    # ----------------------------------------------------------------- the contract: previews and evaluations
    @abstractmethod
    def export_images(self, directory: Path, step: int, preview) -> list[Path]:
        """Files that carry the trained tensors inside the preview image (PIL), A1111's "embedding in PNG";
        [] when the method has no such format. Called by `callbacks.preview` after each preview."""

    @property
    @abstractmethod
    def concept_bank(self) -> EmbeddingBank | None:
        """The trained prompt tokens, which concept measures (`callbacks.toy_eval`) snapshot and swap for their
        initial values; None when the method trains no token (its measures are of another kind)."""

    def base_model(self) -> AbstractContextManager:
        """A context in which the backbone acts as it did before training: what the trained tensors change
        inside the UNet or text encoders (pivotal tuning's LoRA) is switched off, so evaluations can score
        the base model's captions. Methods whose tensors act only through the prompt keep the default."""
        return nullcontext()

    def applied_at(self, strength: float, max_timestep: int | None = None) -> AbstractContextManager:
        """A context in which what the trained tensors change inside the model acts at `strength` (A1111's
        `<lora:name:strength>`; 1 = as trained), and with `max_timestep` only in UNet calls below that timestep
        (`modules.lora.below_timestep`), `base_model()` inside it included: how a user applies the files, for
        evaluations. Methods that change no model take only 1 and None."""
        if strength != 1.0 or max_timestep is not None:
            raise ValueError(f"{type(self).__name__} changes no model weights; a strength or gate means nothing")
        return nullcontext()

    # ----------------------------------------------------------------- the contract: a stop rule's verdict
    def learned(self, step: int) -> bool:
        """A stop rule (`callbacks.early_stop`) finds the trained tensors learned after `step` optimizer steps;
        return whether the run ends there. A method with phases may end a phase instead (pivotal tuning's
        `ti_steps: auto`), and the rule then stops measuring."""
        return True
