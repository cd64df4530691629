"""Every out-of-range config value is one `error:` line naming its key (exit 2), and no data can put a run into
a crash loop: prompts that lost the trained token never reach the loss as a RuntimeError, and a run of them
resumes from any of its checkpoints to the end.

User-facing cases go through the `entry` fixture (tests/conftest.py), which also checks the trust rules.
"""

import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from lit_ti.io import load_embedding, save_embedding
from tests.conftest import make_concept_dir

FAST = ["callbacks.toy_eval=null", "callbacks.preview=null", "callbacks.model_checkpoint=null"]
DA = ["experiment=toy_dreamartist"]
HN = ["~experiment", "method=hypernetwork", "data.template=hypernetwork"]
TOY_WIDTH = 64  # the toy base's text width


class Evil:
    def __reduce__(self):
        return (os.system, ("true",))


def make_files(root):
    """The files the cases point at, under `root/user/files`; returns the placeholders for them."""
    files = root / "user" / "files"
    files.mkdir(parents=True, exist_ok=True)
    (files / "nameless.txt").write_text("a photo of [name]\na plain photo\n", encoding="utf-8")
    save_embedding(files / "eighty.safetensors", torch.randn(80, TOY_WIDTH), name="eighty")
    save_file({"emb_params": torch.full((2, TOY_WIDTH), float("nan"))}, files / "nan.safetensors")  # kohya's layout
    torch.save({"string_to_param": {"*": torch.zeros(0, TOY_WIDTH)}, "name": "none"}, files / "none.pt")
    (files / "empty.pt").write_bytes(b"")
    with open(files / "evil.pt", "wb") as f:
        pickle.dump({"string_to_param": {"*": Evil()}}, f)
    (files / "notes.txt").write_text("not an embedding\n", encoding="utf-8")
    make_concept_dir(root / "user" / "raw", n=2)
    return {"files": str(files), "raw": str(root / "user" / "raw"), "root": str(root)}


# (case id, entry point, arguments, exit code, key the one error line names)
CASES = [
    # train: the run's seed and Lightning's Trainer arguments
    ("seed-negative", "train", ["seed=-1"], 2, "seed"),
    ("seed-too-large", "train", ["seed=4294967296"], 2, "seed"),
    ("seed-text", "train", ["seed=abc"], 2, "seed"),
    ("max-steps-zero", "train", ["trainer.max_steps=0"], 2, "trainer.max_steps"),
    ("max-steps-infinite", "train", ["trainer.max_steps=-1"], 2, "trainer.max_steps"),
    ("max-steps-fraction", "train", ["trainer.max_steps=1.5"], 2, "trainer.max_steps"),
    ("accumulate-zero", "train", ["trainer.accumulate_grad_batches=0"], 2, "trainer.accumulate_grad_batches"),
    ("accumulate-huge", "train", ["trainer.accumulate_grad_batches=100000"], 2, "trainer.accumulate_grad_batches"),
    ("clip-negative", "train", ["trainer.gradient_clip_val=-1"], 2, "trainer.gradient_clip_val"),
    ("clip-nan", "train", ["trainer.gradient_clip_val=nan"], 2, "trainer.gradient_clip_val"),
    ("clip-algorithm", "train", ["trainer.gradient_clip_algorithm=max"], 2, "trainer.gradient_clip_algorithm"),
    ("log-every-zero", "train", ["trainer.log_every_n_steps=0"], 2, "trainer.log_every_n_steps"),
    # train: every method
    ("vectors-fraction", "train", ["method.num_vectors=2.5"], 2, "method.num_vectors"),
    ("vectors-text", "train", ["method.num_vectors=abc"], 2, "method.num_vectors"),
    ("clip-skip-zero", "train", ["method.clip_skip=0"], 2, "method.clip_skip"),
    ("clip-skip-huge", "train", ["method.clip_skip=100"], 2, "method.clip_skip"),
    ("clip-skip-over-layers", "train", ["method.clip_skip=4"], 2, "method.clip_skip"),
    ("min-timestep-negative", "train", ["method.min_timestep=-1"], 2, "method.min_timestep"),
    ("min-timestep-fraction", "train", ["method.min_timestep=0.5"], 2, "method.min_timestep"),
    ("max-timestep-zero", "train", ["method.max_timestep=0"], 2, "method.max_timestep"),
    ("timesteps-reversed", "train", ["method.min_timestep=500", "method.max_timestep=100"], 2, "method.min_timestep"),
    # train: textual inversion's data and init files
    ("template-line-without-name", "train", ["data.template={files}/nameless.txt"], 2, "data.template"),
    ("template-none", "train", ["data.template=none"], 2, "data.template"),
    ("init-file-no-vectors", "train", ["method.init_file={files}/none.pt"], 2, "method.init_file"),
    ("init-file-empty", "train", ["method.init_file={files}/empty.pt"], 2, "method.init_file"),
    ("init-file-80-vectors", "train", ["method.init_file={files}/eighty.safetensors"], 2, "method.init_file"),
    ("init-file-nan", "train", ["method.init_file={files}/nan.safetensors"], 2, "method.init_file"),
    # train: DreamArtist
    ("cfg-text", "train", [*DA, "method.cfg_scale=abc"], 2, "method.cfg_scale"),
    ("cfg-below-one", "train", [*DA, "method.cfg_scale=0.5"], 2, "method.cfg_scale"),
    ("cfg-huge", "train", [*DA, "method.cfg_scale=100"], 2, "method.cfg_scale"),
    ("cfg-nan", "train", [*DA, "method.cfg_scale=nan"], 2, "method.cfg_scale"),
    ("cfg-three-parts", "train", [*DA, "method.cfg_scale='1-2-3'"], 2, "method.cfg_scale"),
    ("cfg-range-too-high", "train", [*DA, "method.cfg_scale='2-50:cos'"], 2, "method.cfg_scale"),
    ("cfg-unknown-ramp", "train", [*DA, "method.cfg_scale='1.5-3:exp'"], 2, "method.cfg_scale"),
    ("ema-zero", "train", [*DA, "method.ema_decay=0"], 2, "method.ema_decay"),
    ("ema-above-one", "train", [*DA, "method.ema_decay=1.5"], 2, "method.ema_decay"),
    ("neg-ema-nan", "train", [*DA, "method.neg_ema_decay=nan"], 2, "method.neg_ema_decay"),
    ("ema-reset-negative", "train", [*DA, "method.ema_reset_every=-1"], 2, "method.ema_reset_every"),
    ("neg-ema-reset-fraction", "train", [*DA, "method.neg_ema_reset_every=2.5"], 2, "method.neg_ema_reset_every"),
    ("neg-lr-weight-zero", "train", [*DA, "method.neg_lr_weight=0"], 2, "method.neg_lr_weight"),
    ("neg-lr-weight-inf", "train", [*DA, "method.neg_lr_weight=inf"], 2, "method.neg_lr_weight"),
    (
        "reconstruction-weight-negative",
        "train",
        [*DA, "method.reconstruction_weight=-1"],
        2,
        "method.reconstruction_weight",
    ),
    ("clip-norm-zero", "train", [*DA, "method.embedding_clip_norm=0"], 2, "method.embedding_clip_norm"),
    ("neg-vectors-zero", "train", [*DA, "method.neg_num_vectors=0"], 2, "method.neg_num_vectors"),
    ("neg-vectors-76", "train", [*DA, "method.neg_num_vectors=76"], 2, "method.neg_num_vectors"),
    ("neg-noise-negative", "train", [*DA, "method.neg_init_noise=-0.1"], 2, "method.neg_init_noise"),
    ("export-vectors-unknown", "train", [*DA, "method.export_vectors=best"], 2, "method.export_vectors"),
    # train: hypernetworks
    ("layers-not-from-one", "train", [*HN, "method.layer_structure=[2,2,1]"], 2, "method.layer_structure"),
    ("layers-negative", "train", [*HN, "method.layer_structure=[1,-1,1]"], 2, "method.layer_structure"),
    ("layers-huge", "train", [*HN, "method.layer_structure=[1,100,1]"], 2, "method.layer_structure"),
    ("layers-not-a-list", "train", [*HN, "method.layer_structure=3"], 2, "method.layer_structure"),
    ("dropout-above-one", "train", [*HN, "method.dropout_structure=[0,1.5,0]"], 2, "method.dropout_structure"),
    ("dropout-short", "train", [*HN, "method.dropout_structure=[0,0.3]"], 2, "method.dropout_structure"),
    ("dropout-first-not-zero", "train", [*HN, "method.dropout_structure=[0.3,0.3,0]"], 2, "method.dropout_structure"),
    ("activation-unknown", "train", [*HN, "method.activation_func=wiggle"], 2, "method.activation_func"),
    ("init-unknown", "train", [*HN, "method.weight_initialization=Zero"], 2, "method.weight_initialization"),
    ("strength-negative", "train", [*HN, "method.strength=-1"], 2, "method.strength"),
    ("strength-huge", "train", [*HN, "method.strength=1000"], 2, "method.strength"),
    ("sizes-zero", "train", [*HN, "method.sizes=[0]"], 2, "method.sizes"),
    ("sizes-text", "train", [*HN, "method.sizes=abc"], 2, "method.sizes"),
    ("sizes-unused", "train", [*HN, "method.sizes=[123]"], 2, "method.sizes"),
    # train: callbacks
    ("export-every-negative", "train", ["callbacks.export.every_n_steps=-1"], 2, "callbacks.export.every_n_steps"),
    ("preview-every-negative", "train", ["callbacks.preview.every_n_steps=-5"], 2, "callbacks.preview.every_n_steps"),
    ("preview-no-images", "train", ["callbacks.preview.num_images=0"], 2, "callbacks.preview.num_images"),
    ("preview-1000-images", "train", ["callbacks.preview.num_images=1000"], 2, "callbacks.preview.num_images"),
    (
        "preview-no-steps",
        "train",
        ["callbacks.preview.num_inference_steps=0"],
        2,
        "callbacks.preview.num_inference_steps",
    ),
    ("preview-guidance-nan", "train", ["callbacks.preview.guidance_scale=nan"], 2, "callbacks.preview.guidance_scale"),
    ("preview-size-65", "train", ["callbacks.preview.size=65"], 2, "callbacks.preview.size"),
    ("preview-seed-negative", "train", ["callbacks.preview.seed=-1"], 2, "callbacks.preview.seed"),
    ("preview-sampler-unknown", "train", ["callbacks.preview.sampler=plms"], 2, "callbacks.preview.sampler"),
    ("preview-gate-zero", "train", ["callbacks.preview.lora_max_timestep=0"], 2, "callbacks.preview.lora_max_timestep"),
    (
        "preview-gate-no-lora",
        "train",
        ["callbacks.preview.lora_max_timestep=500"],
        2,
        "callbacks.preview.lora_max_timestep=500: TextualInversion trains no LoRA",
    ),
    ("toy-eval-samples-negative", "train", ["callbacks.toy_eval.samples=-1"], 2, "callbacks.toy_eval.samples"),
    ("toy-eval-concept-unknown", "train", ["callbacks.toy_eval.concept=pink_blob"], 2, "callbacks.toy_eval.concept"),
    (
        "toy-eval-strength-huge",
        "train",
        ["callbacks.toy_eval.lora_strength=1e9"],
        2,
        "callbacks.toy_eval.lora_strength",
    ),
    (
        "toy-eval-strength-no-lora",
        "train",
        ["callbacks.toy_eval.lora_strength=0.5"],
        2,
        "callbacks.toy_eval.lora_strength=0.5: TextualInversion trains no LoRA",
    ),
    (
        "toy-eval-gate-zero",
        "train",
        ["callbacks.toy_eval.lora_max_timestep=0"],
        2,
        "callbacks.toy_eval.lora_max_timestep",
    ),
    (
        "toy-eval-gate-no-lora",
        "train",
        ["callbacks.toy_eval.lora_max_timestep=500"],
        2,
        "callbacks.toy_eval.lora_max_timestep=500: TextualInversion trains no LoRA",
    ),
    ("nan-guard-zero", "train", ["callbacks.nan_guard.max_bad_steps=0"], 2, "callbacks.nan_guard.max_bad_steps"),
    ("loss-csv-every-zero", "train", ["callbacks.loss_csv.every_n_steps=0"], 2, "callbacks.loss_csv.every_n_steps"),
    ("loss-csv-filename-path", "train", ["callbacks.loss_csv.filename=../../x.csv"], 2, "callbacks.loss_csv.filename"),
    (
        "val-loss-draws-zero",
        "train",
        ["+callbacks.val_loss._target_=lit_ti.callbacks.ValidationLoss", "+callbacks.val_loss.draws=0"],
        2,
        "callbacks.val_loss.draws",
    ),
    # evaluate.py
    ("evaluate-missing-file", "evaluate", ["{root}/user/none.pt", "purple_star"], 2, "embedding"),
    ("evaluate-hostile-file", "evaluate", ["{files}/evil.pt", "purple_star"], 2, "embedding"),
    ("evaluate-not-an-embedding", "evaluate", ["{files}/notes.txt", "purple_star"], 2, "embedding"),
    ("evaluate-concept-unknown", "evaluate", ["{files}/evil.pt", "pink_blob"], 2, "concept"),
    ("evaluate-samples-negative", "evaluate", ["{files}/evil.pt", "purple_star", "--samples=-1"], 2, "--samples"),
    (
        "evaluate-first-seed-negative",
        "evaluate",
        ["{files}/evil.pt", "purple_star", "--first-seed=-1"],
        2,
        "--first-seed",
    ),
    ("evaluate-samples-text", "evaluate", ["{files}/evil.pt", "purple_star", "--samples=abc"], 2, "argument --samples"),
    ("evaluate-cfg-text", "evaluate", ["{files}/evil.pt", "purple_star", "--cfg-scale=abc"], 2, "--cfg-scale"),
    ("evaluate-cfg-zero", "evaluate", ["{files}/evil.pt", "purple_star", "--cfg-scale=0"], 2, "--cfg-scale"),
    (
        "evaluate-lora-gate-alone",
        "evaluate",
        ["{files}/evil.pt", "purple_star", "--lora-max-timestep=500"],
        2,
        "--lora-max-timestep: there is no LoRA to gate",
    ),
    (
        "evaluate-lora-strength-alone",
        "evaluate",
        ["{files}/evil.pt", "purple_star", "--lora-strength=0.5"],
        2,
        "--lora-strength",
    ),
    (
        "evaluate-lora-strength-text",
        "evaluate",
        ["{files}/evil.pt", "purple_star", "--lora-strength=abc"],
        2,
        "argument --lora-strength",
    ),
    (
        "evaluate-lora-strength-huge",
        "evaluate",
        ["{files}/evil.pt", "purple_star", "--lora={files}/notes.txt", "--lora-strength=1e9"],
        2,
        "--lora-strength",
    ),
    (
        "evaluate-lora-missing",
        "evaluate",
        ["{files}/evil.pt", "purple_star", "--lora={root}/user/none.safetensors"],
        2,
        "--lora",
    ),
    # preprocess.py
    ("preprocess-width-zero", "preprocess", ["src={raw}", "width=0"], 2, "width"),
    ("preprocess-width-text", "preprocess", ["src={raw}", "width=abc"], 2, "width"),
    ("preprocess-width-huge", "preprocess", ["src={raw}", "width=100000"], 2, "width"),
    ("preprocess-height-negative", "preprocess", ["src={raw}", "height=-5"], 2, "height"),
    ("preprocess-threshold-zero", "preprocess", ["src={raw}", "split_threshold=0"], 2, "split_threshold"),
    ("preprocess-overlap-one", "preprocess", ["src={raw}", "split_overlap=1"], 2, "split_overlap"),
    ("preprocess-overlap-negative", "preprocess", ["src={raw}", "split_overlap=-0.1"], 2, "split_overlap"),
    ("preprocess-focal-negative", "preprocess", ["src={raw}", "focal_entropy=-1"], 2, "focal_entropy"),
    ("preprocess-tag-threshold", "preprocess", ["src={raw}", "caption.threshold=2"], 2, "caption.threshold"),
    ("preprocess-tag-sort", "preprocess", ["src={raw}", "caption.sort=random"], 2, "caption.sort"),
    ("preprocess-exclude-number", "preprocess", ["src={raw}", "caption.exclude=5"], 2, "caption.exclude"),
    ("preprocess-split-yes", "preprocess", ["src={raw}", "split=yes"], 2, "split"),
    ("preprocess-caption-action", "preprocess", ["src={raw}", "existing_caption=merge"], 2, "existing_caption"),
    ("preprocess-no-src", "preprocess", [], 2, "src"),
    # the args are str.format templates ({raw}): literal braces doubled
    ("preprocess-cutout-colour", "preprocess", ["src={raw}", "cutout.backgrounds={{white: nocolour}}"], 2, "cutout"),
    ("preprocess-cutout-size", "preprocess", ["src={raw}", "cutout.sizes={{small: 1.5}}"], 2, "cutout.sizes"),
    ("preprocess-cutout-sizes-alone", "preprocess", ["src={raw}", "cutout.sizes={{small: 0.3}}"], 2, "cutout.sizes"),
    (
        "preprocess-cutout-caption",
        "preprocess",
        ["src={raw}", "cutout.caption='{{caption}} on {{colour}}'"],
        2,
        "cutout",
    ),
]


@pytest.mark.parametrize(("case", "kind", "args", "code", "key"), CASES, ids=[c[0] for c in CASES])
def test_out_of_range_values_are_one_line(entry, case, kind, args, code, key):
    places = make_files(entry.root)
    args = [a.format(**places) for a in args]
    if kind == "train":
        fast = [f for f in FAST if not any(a.startswith(f.split("=")[0] + ".") for a in args)]
        outcome = entry.train("name=zz-concept", "trainer.max_steps=1", *fast, *args)
    else:
        outcome = getattr(entry, kind)(*args)
    assert outcome.code == code, outcome.stderr[-2000:]
    assert len(outcome.errors) == 1, outcome.stderr[-2000:]
    assert outcome.errors[0].startswith(f"error: {key}"), outcome.errors[0]
    assert len(outcome.errors[0]) < 600 and "\x1b" not in outcome.errors[0]
    assert not (outcome.out / "zz-concept.safetensors").exists()


# ---------------------------------------------------------------- no crash loop
LOOP = [
    "name=zz-concept",
    "trainer.max_steps=2",
    "data.batch_size=2",
    "callbacks.toy_eval=null",
    "callbacks.preview=null",
    "callbacks.export.every_n_steps=0",
    "callbacks.model_checkpoint.every_n_train_steps=1",
]


DA_REC = ["experiment=toy_dreamartist", "method.reconstruction=true"]  # the pair, with its pixel loss


def train_and_resume_from_every_checkpoint(entry, *overrides):
    """A run to its end, then a resume from each of its checkpoints, each to the end: the first run's outcome."""
    first = entry.train(*LOOP, *overrides)
    assert first.code == 0 and not first.errors, first.stderr[-3000:]
    checkpoints = sorted((entry.out / "checkpoints").glob("step*.ckpt"))
    assert len(checkpoints) == 2
    for checkpoint in checkpoints:
        again = entry.train(*LOOP, *overrides, f"ckpt_path={checkpoint}")
        assert again.code == 0 and not again.errors, again.stderr[-3000:]
        assert (entry.out / "zz-concept.safetensors").is_file()
    return first


def long_caption_folder(folder):
    """Two images whose captions are far longer than a prompt's 75 tokens."""
    make_concept_dir(folder, n=2)
    words = ", ".join(f"detail {i} of a very long and wordy caption" for i in range(20))
    for txt in [folder / "000-a square thing.txt", folder / "001-a square thing.txt"]:
        txt.write_text(words + "\n", encoding="utf-8")
    return folder


@pytest.mark.parametrize("method", [[], pytest.param(DA_REC, marks=pytest.mark.slow)], ids=["ti", "da"])
def test_long_captions_keep_the_name_and_resume_from_any_checkpoint(entry, method):
    data = long_caption_folder(entry.root / "user" / "long")
    first = train_and_resume_from_every_checkpoint(entry, *method, f"data.dir={data}", "data.template=style_filewords")
    budget = [w for w in first.warnings if "token budget" in w]
    assert len(budget) == 1 and "every concept token is kept" in budget[0]
    assert not [w for w in first.warnings if "no trained token" in w]


@pytest.mark.parametrize("method", [[], pytest.param(DA_REC, marks=pytest.mark.slow)], ids=["ti", "da"])
def test_samples_without_the_token_never_crash_a_run(entry, monkeypatch, method):
    # past the up-front template check (the refusal is its own case above), straight into the step
    monkeypatch.setattr("lit_ti.methods.textual_inversion.check_names", lambda *args: None)
    template = entry.root / "user" / "mixed.txt"
    template.parent.mkdir(parents=True, exist_ok=True)
    template.write_text("a photo of [name]\na plain photo\n", encoding="utf-8")
    first = train_and_resume_from_every_checkpoint(entry, *method, f"data.template={template}")
    assert any("hold no trained token" in w for w in first.warnings)


def test_a_step_without_any_token_changes_nothing(entry, monkeypatch):
    from lit_ti.models import DiffusersFolder
    from lit_ti.modules.text_conditioning import init_vectors
    from lit_ti.train import _asset

    monkeypatch.setattr("lit_ti.methods.textual_inversion.check_names", lambda *args: None)
    template = entry.root / "user" / "plain.txt"
    template.parent.mkdir(parents=True, exist_ok=True)
    template.write_text("a plain photo\n", encoding="utf-8")
    first = train_and_resume_from_every_checkpoint(entry, f"data.template={template}")
    assert any("changes nothing" in w for w in first.warnings)
    bb = DiffusersFolder(_asset("toy_base")).load()
    trained = load_embedding(entry.out / "zz-concept.safetensors")["zz-concept"]
    assert torch.equal(trained, init_vectors(bb.tokenizer, bb.text_encoder, "*", 2))
