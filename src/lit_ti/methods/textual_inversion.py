"""Textual inversion: `num_vectors` new token vectors learned through the frozen text encoder.

Gal et al., "An Image is Worth One Word" (2022); A1111's variant (init text spread over the vectors,
AdamW without weight decay, LR schedule strings).
"""

from pathlib import Path

from torch import Tensor

from lit_ti import io
from lit_ti.errors import UserError
from lit_ti.io.embeddings import shape_of
from lit_ti.methods.base import DiffusionMethod
from lit_ti.models import Backbone
from lit_ti.modules.embedding_bank import EmbeddingBank
from lit_ti.modules.text_conditioning import PromptTokenizer, check_name, encode, init_vectors

FORMATS = ("pt", "safetensors", "bin")


class TextualInversion(DiffusionMethod):
    """Args (besides the base ones):

    name: the concept name used in prompts and as the file name.
    num_vectors: vectors per token (1-75); each costs one of the prompt's 75 tokens.
    init_text: text whose token embeddings initialise the vectors (spread over them, A1111 style).
    init_file: an existing embedding file (.pt/.safetensors/.bin) to continue from; overrides both above.
    """

    checkpointed = ("bank",)

    def __init__(
        self,
        backbone,
        name: str,
        num_vectors: int = 1,
        init_text: str = "*",
        init_file: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(backbone, **kwargs)
        self.save_hyperparameters(ignore=["backbone", "optimizer", "lr_scheduler"])
        self.name = name
        self.num_vectors = num_vectors
        self.init_text = init_text
        self.init_file = init_file
        self.bank = EmbeddingBank()
        self.prompt_tokenizer: PromptTokenizer | None = None

    def initial_vectors(
        self,
        backbone: Backbone,
        init_text: str,
        num_vectors: int,
        init_file: str | None = None,
        key: str = "method.init_file",
    ) -> Tensor:
        width = backbone.text_encoder.get_input_embeddings().weight.shape[1]
        if init_file:
            try:
                files = io.read_embedding(init_file)
            except UserError as e:
                raise UserError(f"{key}: {e}") from None
            vectors = files[0].vectors
            if isinstance(vectors, dict) or vectors.shape[1] != width:
                raise UserError(
                    f"{key}: {init_file} holds vectors of shape {shape_of(vectors)}, but this model's text "
                    f"encoder needs width {width}; it was trained for another model family"
                )
            return vectors
        return init_vectors(backbone.tokenizer, backbone.text_encoder, init_text, num_vectors)

    def build_trainables(self, backbone: Backbone) -> None:
        check_name(backbone.tokenizer, self.name, "name")
        vectors = self.initial_vectors(backbone, self.init_text, self.num_vectors, self.init_file)
        self.bank.add(self.name, {"text_encoder": vectors})
        self.prompt_tokenizer = PromptTokenizer(backbone.tokenizer, self.bank)

    def param_groups(self) -> list[dict]:
        return [{"params": list(self.bank.parameters())}]

    def encode_prompts(self, prompts: list[str]) -> Tensor:
        ids, slots = self.prompt_tokenizer(list(prompts), self.device)
        return encode(self.text_encoder, ids, slots, self.bank.table("text_encoder"), self.clip_skip)

    def on_fit_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "templates"):
            datamodule.setup("fit")
            if not any("[name]" in line for line in datamodule.templates):
                raise UserError(
                    f"data.template={datamodule.template!r} has no [name] line, so the embedding would never "
                    "be trained; use a template with [name] (e.g. subject or style)"
                )
        super().on_fit_start()

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        if not self.log_now:
            return
        for name in self.bank.names:
            for encoder, v in self.bank.get(name).items():
                suffix = "" if encoder == "text_encoder" else f"/{encoder}"
                self.log(f"train/emb_norm/{name}{suffix}", v.detach().norm(dim=-1).mean(), batch_size=1)

    def concepts(self, tag: str = "") -> dict[str, Tensor]:
        """What to export: `{file stem: [n, d]}` (the live vectors); `tag` marks periodic copies."""
        return {f"{name}{tag}": self.bank.get(name)["text_encoder"] for name in self.bank.names}

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
        named `<stem>-<step>` inside, around the PIL `preview` image."""
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
