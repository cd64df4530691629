"""The documentation is executable: every fenced `bash` block of README.md and docs/*.md runs with `python`
bound to tests/docs_shim.py (tiny test models for real paths, a few steps instead of thousands), two blocks at a
time, in document order where a command uses an earlier run.

Before that slow run, a fast test checks that every documented command line parses as written (its Hydra
config composes, its argparse options exist) and names its run folders in the form the slow run resolves.

A command the test cannot run here (an install, the test suite itself, a GPU- or cluster-only command) must
be listed in SKIPPED with the reason, so a new documented command is never skipped silently.
"""

import importlib
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.conftest import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIPPED = {  # a command's first words -> why it does not run in this test
    "python3 -m venv": "the install; CI runs it on a clean clone",
    "pip install": "installs; CI installs as README says",
    ". .venv/bin/activate && python -m pytest": "the test suite itself",
    "python train.py -m cluster=slurm": "needs a SLURM cluster (cluster=local runs the same path in tests/test_sweeps.py)",
    "bash benchmarks/gpu_targets.sh": "needs CUDA (its CPU dry run below runs)",
    "python benchmarks/ti_speed.py --backbone sd15": "a GPU row (SD1.5 shapes at 512 px); the tiny and small rows run",
    "python benchmarks/compile_check.py --backbone sd15": "needs CUDA; its CPU dry run compiles for minutes, and "
    "tests/test_speed_switches.py checks the compiled gradient",
    "python -m pytest -m gpu": "needs CUDA",
    "python benchmarks/early_stop_replay.py": "scores every copy of a 600-step run (about 30 s each); the rule it "
    "replays is the callback's own `learned`, tested in tests/test_time_to_quality.py",
    "python benchmarks/best_copy_reference.py": "scores 6 copies on 32 samples and 3 files on 96 (about 5 min a run); "
    "its table is tested in tests/test_toy_evaluation.py, its --first-seed in evaluate.py's tests",
    "python benchmarks/stop_measures.py": "scores every copy of a logged run on 640 fixed draws (about 9 min a "
    "run) and checks its draws against the run's logged val/loss at every copy",
}


def commands(block: str) -> list[str]:
    """A block's commands: continuation lines joined, comments and blank lines dropped."""
    lines = block.replace("\\\n", " ").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def blocks() -> list[tuple[str, list[str]]]:
    found = []
    for doc in DOCS:
        for i, block in enumerate(re.findall(r"```bash\n(.*?)```", doc.read_text(encoding="utf-8"), re.S)):
            found.append((f"{doc.name}#{i}", commands(block)))
    return found


def runnable(command: str) -> bool:
    return not any(command.startswith(prefix) for prefix in SKIPPED)


def test_every_documented_command_is_run_or_skipped_with_a_reason():
    every = [c for _, cs in blocks() for c in cs]
    assert every, "no bash blocks found"
    used = {prefix for prefix in SKIPPED if any(c.startswith(prefix) for c in every)}
    assert used == set(SKIPPED), f"SKIPPED lists commands the docs no longer have: {set(SKIPPED) - used}"
    for command in every:
        assert "..." not in command, f"a documented command must run as written, not elide: {command}"
        assert "<" not in command.replace("<run>", ""), f"placeholders other than <run>: {command}"


def test_every_documented_and_configured_target_is_installed_by_the_test_install():
    """A `_target_` in a documented command or a config names a package the install README gives for tests
    (`.[dev]`) provides — else the documented run fails in CI with an import error nobody saw here."""
    documented = [t for _, cs in blocks() for c in cs for t in re.findall(r"_target_=(\S+)", c)]
    configured = [
        t for path in (ROOT / "configs").rglob("*.yaml") for t in re.findall(r"_target_:\s*(\S+)", path.read_text())
    ]
    assert documented and configured
    for target in {*documented, *configured}:
        module = target.rsplit(".", 1)[0]
        assert importlib.util.find_spec(module.split(".")[0]) is not None, f"{target}: its package is not in .[dev]"
        assert hasattr(importlib.import_module(module), target.rsplit(".", 1)[1]), f"{target}: no such name"


def test_the_shim_cuts_a_documented_run_to_seconds(tmp_path, monkeypatch):
    """What makes the documented commands fit CI's lane: a few steps, no samples in the toy evaluation (the
    command's 64 a run took CI past its time), a sweep cut to two jobs."""
    from tests.docs_shim import rewrite

    monkeypatch.chdir(tmp_path)  # the shim counts its run folders in the working folder
    documented = "-m toy_concept=a,b,c seed=0,1,2 trainer.max_steps=600 callbacks=[default,early_stop]"
    args = rewrite(
        "train.py", [*documented.split(), "callbacks.toy_eval.samples=64", "callbacks.toy_style_eval.samples=8"]
    )
    assert args[:3] == ["-m", "toy_concept=a,b", "seed=0"]
    assert [a for a in args if "samples" in a or "max_steps" in a] == [
        "trainer.max_steps=2",
        "callbacks.toy_eval.samples=0",
    ]
    assert {"debug=smoke", "callbacks=[default,early_stop]"} <= set(args)
    assert "callbacks.toy_eval.samples=0" not in rewrite("train.py", ["callbacks.toy_eval=null"])
    assert args[-1].startswith("hydra.sweep.dir=outputs/")


def checkable(command: str) -> bool:
    """Runs in the docs test, or calls a script whose command line parses anywhere (a GPU row, a long replay)."""
    return runnable(command) or bool(re.match(r"python (?!-m )", command))


def documented_calls(tmp_path: Path) -> list[tuple[str, list[str]]]:
    """Every `python SCRIPT ARGS` the runnable blocks make, as bash expands it (loops, variables, the scripts the
    blocks call), recorded instead of run: `python` is a function that writes its arguments down."""
    calls, record, folder = [], tmp_path / "calls", tmp_path / "work"  # what a block writes stays in the folder
    folder.mkdir()
    (folder / "benchmarks").symlink_to(ROOT / "benchmarks")  # documented as run from the repository root
    for where, block in blocks():
        script = "\n".join(
            [
                "set -eo pipefail",
                f"python() {{ printf '%s\\x1f' \"$@\" >> {shlex.quote(str(record))}; printf '\\x1e' >> "
                f"{shlex.quote(str(record))}; }}",
                "export -f python",
                *(c for c in block if checkable(c)),
            ]
        ).replace("<run>", "RUN_PLACEHOLDER")
        done = subprocess.run(["bash", "-c", script], cwd=folder, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"{where}: the block fails in bash itself: {done.stderr[-500:]}"
        if record.exists():
            calls += [(where, c.split("\x1f")[:-1]) for c in record.read_text().split("\x1e")[:-1]]
            record.unlink()
    return calls


def parses(script: str, args: list[str]) -> str | None:
    """Why `python script args` stops at its command line, or None: a Hydra entry point composes its config (as
    it does before running), an argparse one parses its arguments and stops there."""
    import argparse
    import contextlib
    import io
    import runpy

    from lit_ti.cli import check, quote_literals
    from lit_ti.errors import UserError

    hydra_entry = {"train.py": "train", "generate.py": "generate", "preprocess.py": "preprocess"}
    if script in hydra_entry:
        try:
            check(ROOT / "configs", hydra_entry[script], quote_literals(args))
        except UserError as e:
            return str(e)
        return None

    class Parsed(Exception):
        pass

    original = argparse.ArgumentParser.parse_args

    def parse_only(self, *a, **k):
        original(self, *a, **k)
        raise Parsed

    err, argv = io.StringIO(), sys.argv
    try:
        argparse.ArgumentParser.parse_args, sys.argv = parse_only, [script, *args]
        with contextlib.redirect_stderr(err):
            runpy.run_path(str(ROOT / script), run_name="__main__")
    except Parsed:
        return None
    except SystemExit as e:
        return (err.getvalue().strip().splitlines() or [f"exit {e.code}"])[-1]
    finally:
        argparse.ArgumentParser.parse_args, sys.argv = original, argv
    return "ran to the end without parsing a command line"


def test_every_documented_command_line_parses(tmp_path):
    """Each documented call gets past its command line as written: a wrong option or key fails here in seconds,
    not in the slow lane's run of the block; and every `<run>` is one the docs test can find."""
    calls = documented_calls(tmp_path)
    assert len({c[1][0] for c in calls}) >= 8, "the blocks' scripts were not recorded"
    wrong = []
    for where, (script, *args) in calls:
        for arg in args:
            if "RUN_PLACEHOLDER" in arg and not re.search(r"outputs/[\w.-]+/RUN_PLACEHOLDER", arg):
                wrong.append(
                    f"{where}: {arg}: write a run folder as outputs/<name>/<run>, the form readers and the "
                    "docs test resolve"
                )
        if script.endswith(".py") and (why := parses(script, args)):
            wrong.append(f"{where}: python {script} {' '.join(args)}\n  {why}")
    assert not wrong, "\n".join(wrong)


@pytest.fixture(scope="module")
def docs_world(tmp_path_factory) -> Path:
    """The test's working folder with the models real commands name: a tiny SD1-shaped diffusers folder, the
    same model as an A1111 single file, a tiny SD3 folder, the same SD3 as a single file with ComfyUI-style
    encoder files and a tiny tagger (each worker makes its own folder: `workplace`)."""
    from lit_ti.models import TinyBackbone, TinySD3
    from tests.conftest import make_tagger
    from tests.ldm_layout import write_sd3_single_file, write_single_file

    home = tmp_path_factory.mktemp("docs")
    backbone = TinyBackbone().load()
    backbone.pipeline().save_pretrained(home / "models" / "sd15")
    sd3 = TinySD3().load()
    sd3.pipeline().save_pretrained(home / "models" / "sd3")
    sd3_files = write_sd3_single_file(sd3, home / "models" / "sd3_file")
    world = {
        "sd3_single_file": str(sd3_files.pop("path")),
        **{f"sd3_{key}": str(path) for key, path in sd3_files.items()},  # clip_l, clip_g, t5
        "sd3_t5_tokenizer": str(home / "models" / "sd3" / "tokenizer_3"),
        "diffusers": str(home / "models" / "sd15"),
        "sd3": str(home / "models" / "sd3"),
        "single_file": str(write_single_file(backbone, home / "models" / "model.safetensors")),
        "tagger": str(make_tagger(home / "models" / "tagger")),
    }
    (home / "world.json").write_text(json.dumps(world))
    return home


def workplace(home: Path, name: str) -> Path:
    """A worker's working folder: what the documented commands name relative to it (`raw/`, `benchmarks/`);
    its `data/` and `outputs/` are its own, so two workers never see each other's runs."""
    from PIL import Image

    from tests.conftest import make_concept_dir

    folder = home / name
    make_concept_dir(folder / "raw" / "my-cat", n=3, size=96)
    cutout = Image.new("RGBA", (96, 96), (0, 0, 0, 0))  # README's one image, its background removed
    cutout.paste((180, 120, 60, 255), (30, 20, 70, 80))
    (folder / "raw" / "my-cat-cutout").mkdir()
    cutout.save(folder / "raw" / "my-cat-cutout" / "cat.png")
    (folder / "benchmarks").symlink_to(ROOT / "benchmarks")  # documented as run from the repository root
    return folder


def run_block(home: Path, block: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    shim = shlex.quote(str(ROOT / "tests" / "docs_shim.py"))
    python = shlex.quote(sys.executable)
    # `<run>` (a run folder the reader picks) would be a shell redirection: the shim resolves RUN_PLACEHOLDER
    script = "\n".join(
        ["set -eo pipefail", f'python() {{ {python} {shim} "$@"; }}', *(c for c in block if runnable(c))]
    ).replace("<run>", "RUN_PLACEHOLDER")
    env = {**os.environ, "DOCS_WORLD": (home / "world.json").read_text(), "HYDRA_FULL_ERROR": "1"}
    # compiled benchmark rows run eagerly: inductor compiles cold for minutes a row on a CPU, which CI's lane
    # cannot afford; tests/test_speed_switches.py checks the compiled step itself
    env["TORCH_COMPILE_DISABLE"] = "1"
    return subprocess.run(
        ["bash", "-c", script], cwd=cwd or home, env=env, capture_output=True, text=True, timeout=1800
    )


def work_items() -> list[list[tuple[str, list[str]]]]:
    """The runnable blocks as items that can run side by side: a document whose commands use an earlier run
    (`outputs/<name>/<run>`) is one item, in order; each block of any other document is an item of its own."""
    by_doc: dict[str, list[tuple[str, list[str]]]] = {}
    for where, block in blocks():
        if any(runnable(c) for c in block):
            by_doc.setdefault(where.split("#")[0], []).append((where, block))
    chained = [found for found in by_doc.values() if any("<run>" in c for _, b in found for c in b if runnable(c))]
    single = [[item] for found in by_doc.values() if found not in chained for item in found]
    return chained + single  # the chains first: they are the longest


@pytest.mark.slow
def test_documented_commands_run(docs_world):
    """Every runnable block, two at a time (CI's lane must fit its time; each worker has its own folder), in
    document order where later commands use earlier runs."""
    queue = work_items()
    assert sum(len(item) for item in queue) == sum(1 for _, b in blocks() if any(runnable(c) for c in b))
    lock, failed = threading.Lock(), []

    def worker(folder: Path) -> None:
        while True:
            with lock:
                if not queue:
                    return
                item = queue.pop(0)
            for where, block in item:
                done = run_block(docs_world, block, cwd=folder)
                if done.returncode != 0 or "Traceback" in done.stderr:
                    with lock:
                        failed.append(f"{where}: exit {done.returncode}\n{done.stderr[-2500:]}")

    threads = [threading.Thread(target=worker, args=(workplace(docs_world, f"w{i}"),)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failed, "\n\n".join(sorted(failed))
