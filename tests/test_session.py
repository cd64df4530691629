"""The user's session: what the console shows while a run trains."""

import re

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tests.conftest import ROOT

FAST = ["trainer.max_steps=6", "callbacks.toy_eval=null", "callbacks.preview=null", "callbacks.model_checkpoint=null"]


def test_the_bar_counts_the_runs_steps_with_an_eta_and_a_smoothed_loss(entry):
    outcome = entry.train(
        "name=zz-concept", *FAST, "callbacks.progress.estimate_after=3", "trainer.log_every_n_steps=100"
    )
    assert outcome.code == 0, outcome.stderr[-2000:]
    screen = outcome.stdout.replace("\r", "\n")
    # step N/M of the whole run (not the epoch's batches), an ETA, a speed, and the loss between log steps
    assert re.search(r"^step 6/6 \|.*\| \d\d:\d\d<\d\d:\d\d ETA,\s+[\d.]+(it/s|s/it), loss=\d\.\d{4}$", screen, re.M), (
        screen
    )
    assert "Epoch" not in screen
    # the toy run stops early by default (configs/tuning/toy): the estimate is an upper bound and says so
    estimate = r"^\[lit_ti\] 6 steps at [\d.]+ it/s: about .* to go \(done near \d\d:\d\d\); early stopping"
    assert re.search(estimate, screen, re.M), screen
    assert "Training" not in screen  # no stray bar of Lightning's before lit_ti's


def test_a_resumed_run_continues_the_count(entry):
    quick = ["name=zz-concept", "callbacks.toy_eval=null", "callbacks.preview=null", "save_every_n_steps=3"]
    first = entry.train(*quick, "trainer.max_steps=3")
    assert first.code == 0, first.stderr[-2000:]
    ckpt = entry.out / "checkpoints" / "last.ckpt"
    resumed = entry.train(*quick, "trainer.max_steps=5", f"ckpt_path={ckpt}")
    assert resumed.code == 0, resumed.stderr[-2000:]
    screen = resumed.stdout.replace("\r", "\n")
    assert re.search(r"^step 5/5 ", screen, re.M) and not re.search(r"^step [12]/5 ", screen, re.M), screen


MISTAKES = [
    (["trainer.max_step=30"], "trainer.max_step=30: no such key; did you mean trainer.max_steps?"),
    (["method.lr=0.1"], "method.lr=0.1: no such key; did you mean method.optimizer.lr?"),
    (["method=textual_inversio"], "method=textual_inversio: no such option; use one of dreamartist, hypernetwork, "),
    (["experiment=ti_subjct"], "(did you mean ti_subject?)"),
    (["-m", "method.num_vectors=1,2", "trainer.max_stepz=3"], "trainer.max_stepz=3: no such key"),
    (["data.dirr=/x"], "data.dirr=/x: no such key; did you mean data.dir?"),
    (["method.optimizer.lr=[1"], "method.optimizer.lr=[1: Hydra cannot read this value"),
    (["seed=1,2"], "seed=1,2: a comma makes this a sweep; for one value with a comma quote it"),
]


@pytest.mark.parametrize(("argv", "line"), MISTAKES, ids=[m[0][-1] for m in MISTAKES])
def test_a_command_line_mistake_is_one_line_and_exit_2(capsys, argv, line):
    from lit_ti.cli import entry

    ran = []
    with pytest.raises(SystemExit) as stop:
        entry(lambda: ran.append(1), str(ROOT / "train.py"), "train", argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and not ran
    assert err.count("\n") == 1 and err.startswith("error: ") and line in err, err


@pytest.mark.parametrize(
    ("script", "config"), [("train.py", "train"), ("generate.py", "generate"), ("preprocess.py", "preprocess")]
)
def test_a_mistake_points_to_the_help_of_the_script_that_was_run(capsys, script, config):
    """An unknown key with no close spelling sends the user to the keys of the command they typed."""
    from lit_ti.cli import entry

    with pytest.raises(SystemExit) as stop:
        entry(lambda: pytest.fail("a mistake must not run the task"), str(ROOT / script), config, ["zzqx_frobnicate=4"])
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert err == f"error: zzqx_frobnicate=4: no such key; see python {script} --help or --cfg job for the keys\n"


def test_help_lists_groups_options_and_keys_from_the_configs(capsys):
    from lit_ti.cli import entry

    entry(lambda: pytest.fail("--help must not run the task"), str(ROOT / "train.py"), "train", ["--help"])
    text = capsys.readouterr().out
    methods = ", ".join(sorted(p.stem for p in (ROOT / "configs" / "method").glob("*.yaml")))  # every one, no more
    assert re.search(rf"^  method +{re.escape(methods)}  \[textual_inversion\]$", text, re.M)
    assert re.search(r"^  experiment +.*dreamartist_character.*  \[null\]$", text, re.M)
    # a key's meaning is its comment in configs/, so the two cannot disagree
    comment = "vectors per token; each uses one of the prompt's 75 tokens"
    assert comment in (ROOT / "configs" / "method" / "textual_inversion.yaml").read_text()
    assert re.search(rf"^  method\.num_vectors +{re.escape(comment)}$", text, re.M)
    assert "Hydra" not in text.split("--hydra-help")[0].replace("Hydra's own options", "")


@pytest.mark.parametrize("script", ["generate.py", "preprocess.py"])
def test_help_of_a_small_script_lists_every_key_it_takes(capsys, script):
    """generate.py and preprocess.py have a few dozen keys: --help lists each (a key without a comment in its
    config file was left out, `prompt` among them)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import DictConfig, OmegaConf

    from lit_ti.cli import entry, key_paths

    config = script.removesuffix(".py")
    entry(lambda: pytest.fail("--help must not run the task"), str(ROOT / script), config, ["--help"])
    text = capsys.readouterr().out
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
        cfg = compose(config)
    groups = {p.name for p in (ROOT / "configs").iterdir() if p.is_dir()}  # listed as groups, not keys
    keys = [
        k
        for k in key_paths(cfg)
        if k.split(".")[0] not in groups
        and not isinstance(OmegaConf.select(cfg, k, throw_on_resolution_failure=False), DictConfig)
    ]
    missing = [k for k in keys if not re.search(rf"^  {re.escape(k)} ", text, re.M)]
    assert keys and not missing, missing


@settings(max_examples=30, deadline=None, derandomize=True)
@given(text=st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=40))
def test_a_prompt_reaches_the_config_exactly_as_typed(text):
    """SD prompts carry commas, `(word:1.2)`, `[name]`, `\\(`, quotes: Hydra's grammar reads them as sweeps,
    lists and escapes. Typed as `prompt=...` in a single run, the config holds exactly what was typed."""
    from hydra import compose, initialize_config_dir

    from lit_ti.cli import quote_literals

    assume("${" not in text and text == text.strip() and text[:1] not in "'\"")
    [argv] = quote_literals([f"prompt={text}"])
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
        assert compose("generate", overrides=[argv]).prompt == text


@settings(max_examples=40, deadline=None, derandomize=True)
@given(text=st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=40))
def test_any_value_quoted_for_hydra_reads_back_as_typed(text):
    """What lit_ti prints for the user to paste (the resume line's run folder) and what it suggests for a value
    Hydra cannot read: one shell word whose value reaches the config exactly, whatever the characters."""
    import shlex

    from hydra import compose, initialize_config_dir

    from lit_ti.cli import hydra_literal, shell_word

    assume("${" not in text)
    [word] = shlex.split(shell_word(hydra_literal("lora", text)))
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
        assert compose("generate", overrides=[word]).lora == text


@pytest.mark.parametrize("folder", ["0-pivotal-seed=0,lr=0.001", "it's [a run] {x}", "a,b=c d"])
def test_a_pasted_path_into_a_run_folder_reaches_the_config(tmp_path, folder):
    """Run folders are named `<time>-<method>-<key>=<value>,...`; a path into one typed bare (as the README's
    `lora=outputs/<name>/<run>/<name>-lora.safetensors` invites) is that path in a single run, left to Hydra
    under -m, and a path that does not exist gets one line with the quoted form to paste."""
    import shlex

    from hydra import compose, initialize_config_dir

    from lit_ti.cli import check, quote_literals
    from lit_ti.errors import UserError

    bundle = tmp_path / folder / "x-lora.safetensors"
    bundle.parent.mkdir()
    bundle.write_bytes(b"")
    [argv] = quote_literals([f"lora={bundle}"])
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
        assert compose("generate", overrides=[argv]).lora == str(bundle)
    assert quote_literals(["-m", f"lora={bundle}"]) == ["-m", f"lora={bundle}"]
    missing = f"lora={tmp_path / folder / 'typo.safetensors'}"
    if "=" in folder or "'" in folder:  # (a bare `[`/`,` parses: as a list or a sweep, refused elsewhere)
        with pytest.raises(UserError) as e:
            check(ROOT / "configs", "generate", [missing])
        message = str(e.value)
        assert "\n" not in message and message.startswith(missing) and "quote" in message
        [word] = shlex.split(message.rsplit(": ", 1)[1])
        with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
            assert compose("generate", overrides=[word]).lora == missing.split("=", 1)[1]


def test_a_preview_prompt_with_commas_and_weights_reaches_the_training_config():
    from hydra import compose, initialize_config_dir

    from lit_ti.cli import quote_literals

    text = r"a photo of [name], (detailed:1.2), \(artist\), it's 0"
    [neg] = quote_literals([f"callbacks.preview.negative_prompt={text}"])
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
        assert compose("train", overrides=[neg]).callbacks.preview.negative_prompt == text
