"""`python` as the documentation test runs it: a documented command, made small and pointed at test models.

tests/test_docs.py runs every fenced `bash` block of README.md and docs/*.md with `python` bound to this
script. It rewrites the command's arguments and runs the real script from the repository:

* real model paths (`model.path=/models/...`) -> the tiny diffusers folder, or the tiny single file when the
  command says `model=single_file` (the tiny SD3 folder for `model=sd3`; for `model=sd3_single_file` the tiny
  SD3 as one file, its encoders as ComfyUI-style files and its T5 tokenizer folder); a local tagger (`caption.tagger=`) -> a tiny tagger;
* `data.dir=/data/x` (and held-out folders) -> small concept folders, made on first use;
* steps cut to a few (`trainer.max_steps`, sampling steps, benchmark steps), the toy evaluation to its loss
  measures (`callbacks.toy_eval.samples=0`; a style evaluation keeps debug=smoke's 2 samples), sweeps to two jobs (the first swept key's first two values),
  Optuna to two trials, GPUs to the CPU, run folders into the test's folder; evaluate.py to 2 samples;
* `outputs/<name>/<run>` -> the newest run of that name made earlier in the test.

tests/test_docs.py also turns `torch.compile` off for every command (`TORCH_COMPILE_DISABLE=1`).

The test's folder is the working directory; `DOCS_WORLD` (JSON) names the test models.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.conftest, for the concept folders
WORLD = json.loads(os.environ.get("DOCS_WORLD", "{}"))
SCRIPTS = ("train.py", "generate.py", "preprocess.py", "evaluate.py")


def data_folder(path: str) -> str:
    """A small concept folder standing for the user's `path`."""
    from tests.conftest import make_concept_dir

    folder = Path("data") / Path(path).name
    if not folder.is_dir():
        make_concept_dir(folder, n=4)
    return str(folder.resolve())


def newest_run(match: re.Match) -> str:
    runs = sorted(Path("outputs", match.group(1)).glob("run*"), key=lambda p: int(p.name[3:]))
    if not runs:
        raise SystemExit(f"docs_shim: no earlier run named {match.group(1)} for {match.group(0)}")
    return str(runs[-1])


def next_run_dir(kind: str, under: str = "${name}") -> str:
    counter = Path(".docs_runs")
    n = int(counter.read_text()) + 1 if counter.exists() else 0
    counter.write_text(str(n))
    return f"outputs/{under}/{kind}{n}"


def rewrite(script: str, args: list[str]) -> list[str]:
    keys = {a.split("=", 1)[0] for a in args if "=" in a}
    single, sd3_single = "model=single_file" in args, "model=sd3_single_file" in args
    kind = (
        "single_file" if single else "sd3_single_file" if sd3_single else "sd3" if "model=sd3" in args else "diffusers"
    )
    sweep = "-m" in args or "--multirun" in args
    swept = False  # the first swept key keeps two values, the others their first
    out = []
    for a in args:
        key, _, value = a.partition("=")
        if key == "model.path":
            a = f"model.path={WORLD[kind]}"
            if (single or sd3_single) and "model.config" not in keys:  # the tiny model is no shipped shape
                out.append(f"model.config={WORLD['sd3' if sd3_single else 'diffusers']}")
        elif sd3_single and key in ("model.clip_l", "model.clip_g", "model.t5", "model.t5_tokenizer"):
            a = f"{key}={WORLD['sd3_' + key.split('.')[1]]}"  # the tiny SD3's encoder files, its T5 tokenizer
        elif key in ("data.dir", "callbacks.val_loss.dir") and value.startswith("/"):
            a = f"{key}={data_folder(value)}"
        elif key == "caption.tagger":
            a = f"caption.tagger={WORLD['tagger']}"
        elif a == "trainer=gpu":
            a = "trainer=cpu"
        elif key == "trainer.devices" and int(value) > 2:
            a = "trainer.devices=2"
        elif key in ("trainer.max_steps", "steps", "n_iter", "batch_size", "hydra.sweeper.n_trials"):
            continue  # replaced below
        elif key in ("callbacks.toy_eval.samples", "callbacks.toy_style_eval.samples"):
            continue  # replaced below: 64 samples a run took CI's lane past its time
        elif sweep and "," in value and not re.search(r"[\s:()\[\]]", value):
            a = f"{key}={','.join(value.split(',')[: 1 if swept else 2])}"  # two jobs: the sweep path, not the grid
            swept = True
        out.append(a)
    if script == "train.py":
        out += ["trainer.max_steps=2", "debug=smoke"] if "debug" not in keys else ["trainer.max_steps=2"]
        if "callbacks.toy_eval=null" not in args:  # the loss measures only: sampling is most of a smoke run's time
            out.append("callbacks.toy_eval.samples=0")  # (smoke keeps an entry for it in every run)
        if any(a.startswith("trainer.devices=") for a in out):
            out.append("trainer.accelerator=cpu")
        if "hparams_search" in keys:
            out.append("hydra.sweeper.n_trials=2")
        out.append(f"hydra.sweep.dir={next_run_dir('multirun')}" if sweep else f"hydra.run.dir={next_run_dir('run')}")
    elif script == "generate.py":
        out += ["steps=2", "n_iter=1", "batch_size=1", f"hydra.run.dir={next_run_dir('generate', 'generate')}"]
    return out


def benchmark(script: str, args: list[str]) -> list[str]:
    """Benchmark scripts: two steps, one repeat, a few small images or samples, a fresh work folder."""
    cut = {"--steps": "2", "--repeats": "1", "--work": next_run_dir("bench", "bench"), "--per-prompt": "1"}
    args = [cut.get(args[i - 1], a) if i else a for i, a in enumerate(args)]
    if script.endswith("size_margin.py") and "--run" not in args:
        return [*args, "--per-colour", "1"]
    return [*args, "--counts", "3", "--size", "64"] if script.endswith("latent_cache.py") else args


def main(argv: list[str]) -> int:
    if argv[:1] == ["-m"]:
        return subprocess.call([sys.executable, *argv])
    # `<run>` in the docs (tests/test_docs.py): the newest run of that name made earlier in the test
    script, args = argv[0], [re.sub(r"outputs/([\w.-]+)/RUN_PLACEHOLDER", newest_run, a) for a in argv[1:]]
    if script == "evaluate.py":  # its samples are most of its time
        args = [*(a for i, a in enumerate(args) if "--samples" not in args[max(i - 1, 0) : i + 1]), "--samples", "2"]
    elif script in SCRIPTS:
        args = rewrite(script, args)
    elif script.startswith("benchmarks/"):
        args = benchmark(script, args)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.call([sys.executable, str(ROOT / script), *args], env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
