"""Textual inversion: `num_vectors` new token vectors learned through the frozen text encoder.

Gal et al., "An Image is Worth One Word" (2022); A1111's variant (init text spread over the vectors,
AdamW without weight decay, LR schedule strings).
"""

from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lit_ti import io
from lit_ti.data import ConceptDataModule
from lit_ti.data.templates import check_names
from lit_ti.errors import UserError, check_choice, check_number, quote
from lit_ti.io.embeddings import from_file, shape_of, to_file
from lit_ti.io.formats import EMBEDDING, exportable
from lit_ti.methods.base import DiffusionMethod
from lit_ti.models import Backbone
from lit_ti.modules.embedding_bank import MAX_VECTORS, EmbeddingBank
from lit_ti.modules.text_conditioning import Conditioning, PromptEncoder, check_name
from lit_ti.modules.vector_init import INIT_MODES, rescale, start_vectors, vocabulary_norm

FORMATS = exportable(EMBEDDING)  # pt, safetensors, bin
ENCODER_NAMES = {"clip_l": "text_encoder", "clip_g": "text_encoder_2", "t5": "text_encoder_3"}  # config -> bank


def check_vectors(key: str, n) -> int:
    return check_number(key, n, 1, MAX_VECTORS, integer=True, hint="each vector takes one of the prompt's 75 tokens")


def check_file_vectors(key: str, path: str, vectors: dict[str, Tensor]) -> dict[str, Tensor]:
    """An init file's vectors, refused when a prompt could not hold them or training could not start from them."""
    first = next(iter(vectors.values()))
    if not 1 <= first.shape[0] <= MAX_VECTORS:
        raise UserError(
            f"{key}: {quote(path)} holds {first.shape[0]} vectors; a prompt holds 1 to {MAX_VECTORS}, so start "
            "from another file (or from method.init_text)"
        )
    if not all(bool(v.isfinite().all()) for v in vectors.values()):
        raise UserError(f"{key}: {quote(path)} holds NaN or infinite values; start from another file")
    return vectors


class TextualInversion(DiffusionMethod):
    """Args (besides the base ones):

    name: the concept name used in prompts and as the file name.
    num_vectors: vectors per token (1-75); each costs one of the prompt's 75 tokens.
    init_text: text whose token embeddings initialise the vectors (spread over them, A1111 style).
    init_file: an existing embedding file (.pt/.safetensors/.bin) to continue from; overrides both above.
    init_mode: how init_text becomes vectors: `copy` (A1111: its token embeddings), `cross` (the text encoder's
        output for it, Cross Initialization) or `median_norm` (the copy at the vocabulary's median norm).
    keep_norm: after every step, rescale each vector to the vocabulary's median norm (OneTrainer's
        `preserve_embedding_norm`): only the direction is learned.
    encoders: which text encoders get vectors, among `clip_l`, `clip_g`, `t5`; null = every CLIP encoder of
        the model. Only SD3 trains a subset, or T5 (whose gradient runs through T5-XXL: see the README's SD3.5
        section for its cost); a prompt leaves a concept out of the encoders it has no vectors for.
    """

    checkpointed = ("bank",)
    periodic_dirname = "embeddings"

    def __init__(
        self,
        backbone,
        name: str,
        num_vectors: int = 1,
        init_text: str = "*",
        init_file: str | None = None,
        init_mode: str = "copy",
        keep_norm: bool = False,
        encoders: list[str] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(backbone, name, **kwargs)
        for encoder in encoders or []:
            check_choice("method.encoders", encoder, ENCODER_NAMES)
        if encoders is not None and not encoders:
            raise UserError("method.encoders is empty; name at least one of clip_l, clip_g, t5 (or null)")
        self.encoders = None if encoders is None else list(encoders)
        self.save_hyperparameters(ignore=["backbone", "optimizer", "lr_scheduler"])
        self.num_vectors = check_vectors("method.num_vectors", num_vectors)
        self.init_text = init_text
        self.init_file = init_file
        self.init_mode = check_choice("method.init_mode", init_mode, INIT_MODES)
        self.keep_norm = keep_norm
        self.norms: dict[str, float] = {}  # the vocabulary's median norm per text encoder (keep_norm)
        self.bank = EmbeddingBank()
        self.prompt_encoder: PromptEncoder | None = None
        self.warned_png = False

    def initial_vectors(
        self,
        backbone: Backbone,
        init_text: str,
        num_vectors: int,
        init_file: str | None = None,
        key: str = "method.init_file",
    ) -> dict[str, Tensor]:
        """`{encoder: [n, d]}` for every trained text encoder of the backbone (SDXL: both)."""
        encoders = self.trained_encoders(backbone)
        widths = {enc: te.get_input_embeddings().weight.shape[1] for enc, (_, te) in encoders.items()}
        if init_file:
            try:
                files = io.read_embedding(init_file)
            except UserError as e:
                raise UserError(f"{key}: {e}") from None
            vectors = from_file(files[0].vectors, widths)
            if vectors is not None and set(vectors) != set(widths):  # an SD3 file without a trained part
                vectors = None
            if vectors is None:
                want = to_file(widths)
                raise UserError(
                    f"{key}: {init_file} holds vectors of shape {shape_of(files[0].vectors)}, but this model's text "
                    f"encoders need width {want}; it was trained for another model family"
                )
            return check_file_vectors(key, init_file, vectors)
        return {
            enc: start_vectors(self.init_mode, tok, te, init_text, num_vectors) for enc, (tok, te) in encoders.items()
        }

    def trained_encoders(self, backbone: Backbone) -> dict:
        """`{encoder: (tokenizer, text encoder)}` of the encoders this run trains vectors for (`encoders`)."""
        available = backbone.text_encoders
        if self.encoders is None:
            return {k: v for k, v in available.items() if k != "text_encoder_3"}
        keys = [ENCODER_NAMES[e] for e in self.encoders]
        missing = [e for e, k in zip(self.encoders, keys) if k not in available]
        if missing:
            raise UserError(
                f"method.encoders: this model has no {', '.join(missing)} encoder "
                "(T5 is SD3's, and absent when model.t5=false or the model folder has none); remove it"
            )
        clips = {k for k in available if k != "text_encoder_3"}
        if not backbone.is_sd3 and set(keys) != clips:
            raise UserError(f"method.encoders={self.encoders}: only SD3 trains some encoders; use null here")
        return {k: available[k] for k in keys}

    def build_trainables(self, backbone: Backbone) -> None:
        check_name(backbone.tokenizer, self.name, "name")
        self.bank.add(self.name, self.initial_vectors(backbone, self.init_text, self.num_vectors, self.init_file))
        self.norms = {enc: vocabulary_norm(te) for enc, (_, te) in self.trained_encoders(backbone).items()}
        self.prompt_encoder = PromptEncoder(backbone, self.bank, self.clip_skip)

    def param_groups(self) -> list[dict]:
        return [{"params": list(self.bank.parameters())}]

    @property
    def concept_bank(self) -> EmbeddingBank:
        return self.bank

    def identity(self) -> dict:
        identity = {**super().identity(), "vectors": {n: self.bank.num_vectors(n) for n in self.bank.names}}
        return identity | ({"encoders": self.bank.encoders()} if self.backbone and self.backbone.is_sd3 else {})

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        return self.prompt_encoder(list(prompts), self.device)

    def trained_samples(self, batch: dict) -> list[bool]:
        return self.prompt_encoder.carries(batch["prompt"])

    def on_fit_start(self) -> None:
        datamodule = self.trainer.datamodule
        if isinstance(datamodule, ConceptDataModule):
            datamodule.setup("fit")
            check_names(datamodule.template, datamodule.templates, datamodule.captions)
        super().on_fit_start()

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.keep_norm:
            with torch.no_grad():
                for key, v in self.bank.vectors.items():
                    v.copy_(rescale(v, self.norms[key.rsplit("__", 1)[0]]))

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        if not self.log_now:
            return
        for name in self.bank.names:
            for encoder, v in self.bank.get(name).items():
                suffix = "" if encoder == "text_encoder" else f"/{encoder}"
                self.log(f"train/emb_norm/{name}{suffix}", v.detach().norm(dim=-1).mean(), batch_size=1)

    def concepts(self, tag: str = "") -> dict[str, Tensor | dict[str, Tensor]]:
        """What to export: `{file stem: vectors}` (the live ones; SDXL: `{"clip_l", "clip_g"}`); `tag` marks
        periodic copies."""
        return {f"{name}{tag}": to_file(self.bank.get(name)) for name in self.bank.names}

    def export(self, directory: Path, step: int, tag: str = "", formats=("pt", "safetensors")) -> list[Path]:
        """Write every concept as `<directory>/<stem>.<fmt>`; A1111 reads the stem as its name."""
        unknown = set(formats) - set(FORMATS)
        if unknown:
            raise UserError(f"callbacks.export.formats: unknown {sorted(unknown)}; use some of {', '.join(FORMATS)}")
        written = []
        for stem, vectors in self.concepts(tag).items():
            for fmt in formats:
                written.append(
                    io.save_embedding(
                        Path(directory) / f"{stem}.{fmt}",
                        vectors,
                        name=stem,
                        step=step,
                        sd_checkpoint=self.backbone.checkpoint_hash,
                        sd_checkpoint_name=self.backbone.name,
                    )
                )
        return written

    def export_images(self, directory: Path, step: int, preview) -> list[Path]:
        """A1111's "save images with embedding in PNG chunks": `<directory>/<stem>-<step>.png` per concept,
        named `<stem>-<step>` inside, around the PIL `preview` image. Not for SDXL or SD3: A1111's PNG format
        holds one encoder's vectors, so their parts are skipped (with one warning)."""
        if self.bank.encoders() != ["text_encoder"]:
            if not self.warned_png:
                self.warned_png = True
                rank_zero_warn(
                    "SDXL/SD3 embeddings cannot be written into PNGs (A1111's format holds one encoder); skipped"
                )
            return []
        return [
            io.save_image_embedding(
                Path(directory) / f"{stem}.png",
                preview,
                vectors,
                name=stem,
                step=step,
                sd_checkpoint=self.backbone.checkpoint_hash,
                sd_checkpoint_name=self.backbone.name,
            )
            for stem, vectors in self.concepts(f"-{step}").items()
        ]
