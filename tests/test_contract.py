"""The method contract (`DiffusionMethod`'s abstract members): a fourth method that leaves one out cannot be
built, and one that provides them works with the export and preview callbacks, with no other change."""

from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file, save_file

from lit_ti.callbacks import ExportEmbeddings, PreviewImages, ToyEvaluation
from lit_ti.data import ConceptDataModule
from lit_ti.io.atomic import atomic_path
from lit_ti.io.checkpoint_io import TRAINED
from lit_ti.methods import DiffusionMethod, DreamArtist, HypernetworkMethod, PivotalTuning, TextualInversion
from lit_ti.models import Backbone, TinyBackbone
from lit_ti.modules.embedding_bank import EmbeddingBank
from lit_ti.modules.text_conditioning import Conditioning, PromptEncoder

CONTRACT = {
    "checkpointed",
    "build_trainables",
    "param_groups",
    "encode_prompts",
    "periodic_dirname",
    "export",
    "export_images",
    "concept_bank",
}


class TextShift(DiffusionMethod):
    """The smallest method: one trainable vector `[d]` added to every prompt's text states."""

    checkpointed = ("shift",)
    periodic_dirname = "shifts"

    def build_trainables(self, backbone: Backbone) -> None:
        width = backbone.text_encoder.config.hidden_size
        self.shift = torch.nn.ParameterDict({"vector": torch.nn.Parameter(torch.zeros(width))})
        self.prompt_encoder = PromptEncoder(backbone, EmbeddingBank(), self.clip_skip)

    def param_groups(self) -> list[dict]:
        return [{"params": list(self.shift.parameters())}]

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        with torch.no_grad():
            cond = self.prompt_encoder(list(prompts), self.device)
        return Conditioning(cond.states + self.shift["vector"], cond.pooled)  # [B, 77, d]

    def export(self, directory: Path, step: int, tag: str = "", formats=("safetensors",)) -> list[Path]:
        path = Path(directory) / f"{self.name}{tag}.safetensors"
        with atomic_path(path) as tmp:
            save_file({"shift": self.shift["vector"].detach().cpu().contiguous()}, tmp)
        return [path]

    def export_images(self, directory: Path, step: int, preview) -> list[Path]:
        return []

    @property
    def concept_bank(self) -> None:
        return None


def test_the_contract_is_what_the_docs_list():
    assert DiffusionMethod.__abstractmethods__ == CONTRACT
    for method in (TextualInversion, DreamArtist, HypernetworkMethod, PivotalTuning, TextShift):
        assert not method.__abstractmethods__, method


def test_resume_accepts_what_every_shipped_method_checkpoints():
    for method in (TextualInversion, DreamArtist, HypernetworkMethod, PivotalTuning):
        assert set(method.checkpointed) <= set(TRAINED), method


def test_the_run_folder_knows_every_shipped_method_folder():
    from lit_ti.run_folder import MADE, METHOD_FOLDERS, WRITTEN

    for method in (TextualInversion, DreamArtist, HypernetworkMethod, PivotalTuning):
        assert method.periodic_dirname in METHOD_FOLDERS, method
    assert set(METHOD_FOLDERS) <= set(MADE) & set(WRITTEN)


@pytest.mark.parametrize("missing", sorted(CONTRACT))
def test_a_method_missing_a_contract_member_fails_at_construction(missing):
    members = {k: v for k, v in vars(TextShift).items() if k != missing}
    incomplete = type("Incomplete", (DiffusionMethod,), members)
    with pytest.raises(TypeError, match=rf"abstract .*\b{missing}\b"):
        incomplete(TinyBackbone(), name="zz-shift")


def test_a_fourth_method_works_with_the_export_and_preview_callbacks(tmp_path, concept_dir):
    L.seed_everything(0, verbose=False)
    method = TextShift(TinyBackbone(), name="zz-shift", optimizer=lambda groups: torch.optim.SGD(groups, lr=1.0))
    preview = PreviewImages(str(tmp_path), every_n_steps=2, num_inference_steps=2)
    toy = ToyEvaluation("purple_star", samples=0)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ExportEmbeddings(str(tmp_path), every_n_steps=1, formats=["safetensors"]), preview, toy],
    )
    trainer.fit(method, datamodule=ConceptDataModule(dir=str(concept_dir), name="zz-shift", template="subject"))

    final = load_file(tmp_path / "zz-shift.safetensors")["shift"]
    assert final.abs().sum() > 0  # it trained, and the callback exported the trained vector
    assert torch.equal(final, method.shift["vector"].detach())
    assert {p.name for p in (tmp_path / "shifts").iterdir()} == {"zz-shift-1.safetensors", "zz-shift-2.safetensors"}
    assert [p.name for p in preview.written] == ["zz-shift-2.png"]  # `[name]` became the method's name
    assert set(method.state_dict()) == {"shift.vector"}  # checkpoints hold what trains, nothing frozen
    assert toy.init is None and toy.results == {}  # no token trains: the concept measure stands aside


@pytest.mark.parametrize(
    ("method_cls", "kw"),
    [(TextualInversion, {}), (DreamArtist, {"reconstruction": True}), (HypernetworkMethod, {}), (PivotalTuning, {})],
    ids=["ti", "dreamartist", "hypernetwork", "pivotal"],
)
def test_every_loss_is_logged_synced_across_ranks(tmp_path, concept_dir, monkeypatch, method_cls, kw):
    """Per-rank losses differ under DDP: every `train/loss*` value is averaged over the ranks (`sync_dist`)."""
    L.seed_everything(0, verbose=False)
    method = method_cls(TinyBackbone(), name="zz-thing", **kw)
    logged = {}
    log = method.log
    monkeypatch.setattr(method, "log", lambda key, value, **k: (logged.setdefault(key, k), log(key, value, **k)))
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    trainer.fit(method, datamodule=ConceptDataModule(dir=str(concept_dir), name="zz-thing", template="subject"))
    losses = {key: k for key, k in logged.items() if key.startswith("train/loss")}
    assert "train/loss" in losses
    if kw:
        assert {"train/loss_diffusion", "train/loss_reconstruction"} <= set(losses)
    assert all(k.get("sync_dist") for k in losses.values()), losses


def test_a_model_change_applies_at_a_strength_the_base_model_keeps():
    """`applied_at(s)`: the LoRA acts at s inside; `base_model()` inside it comes back to s, not to training's 1
    (the toy evaluation's base-model measures sit between its learned ones); training's 1 is back after it.
    A method that changes no model takes only 1."""
    from lit_ti.modules import lora

    method = PivotalTuning(TinyBackbone(), name="zz-concept")
    method.configure_model()
    torch.manual_seed(0)
    layer = next(iter(method.adapted["unet"].values()))
    torch.nn.init.normal_(layer.lora_B[lora.ADAPTER].weight, std=0.5)  # a LoRA that changes the output
    x = torch.randn(2, layer.in_features)  # [B, in]

    def change() -> torch.Tensor:  # what the LoRA adds to this layer's output now
        with torch.no_grad():
            return layer(x) - layer.get_base_layer()(x)

    full = change()
    assert full.abs().max() > 1e-3
    with method.applied_at(0.5):
        torch.testing.assert_close(change(), 0.5 * full)
        with method.base_model():
            assert change().abs().max() == 0
        torch.testing.assert_close(change(), 0.5 * full)
    torch.testing.assert_close(change(), full)
    with TextualInversion(TinyBackbone(), name="zz-concept").applied_at(1.0):
        pass
    with pytest.raises(ValueError, match="changes no model weights"):
        TextualInversion(TinyBackbone(), name="zz-concept").applied_at(0.5)
