"""SIGKILL at random moments: every file left behind is complete, and the run resumes to the same result."""

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from lit_ti import io
from tests.conftest import ROOT

RUN = [
    "callbacks.toy_eval=null",
    "callbacks.export.every_n_steps=2",
    "callbacks.model_checkpoint.every_n_train_steps=2",
    "callbacks.preview.every_n_steps=5",
    "callbacks.preview.num_inference_steps=2",
    "callbacks.loss_csv.every_n_steps=1",
    "trainer.log_every_n_steps=1",
]


class Zygote:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.fork_server"],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert json.loads(self.proc.stdout.readline()) == {"ready": True}

    def ask(self, request: dict) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def start(self, out: Path, log: Path, *extra: str) -> int:
        return self.ask({"run": [f"paths.output_dir={out}", *RUN, *extra], "log": str(log)})["pid"]

    def wait(self, pid: int) -> int:
        return self.ask({"wait": pid})["status"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def check_outputs(out: Path) -> None:
    """Every output file present (temp files aside) is complete and loads."""
    for path in sorted(p for p in out.rglob("*") if p.is_file() and not p.name.endswith(".tmp")):
        if path.suffix in (".pt", ".safetensors"):
            vectors = io.load_embedding(path)
            assert all(torch.isfinite(v).all() for v in vectors.values()), path
        elif path.suffix == ".ckpt":
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            assert ckpt["global_step"] % 2 == 0 and "optimizer_states" in ckpt, path
        elif path.suffix == ".png":
            with Image.open(path) as im:
                im.verify()
        elif path.suffix == ".csv":
            text = path.read_text()
            assert text.endswith("\n") and all(len(r.split(",")) == 5 for r in text.splitlines()), path
        elif path.name.startswith("events.out.tfevents"):
            list(EventFileLoader(str(path)).Load())  # a torn last record is dropped, not an error
        elif path.suffix == ".yaml":
            yaml.safe_load(path.read_text())
        elif path.suffix == ".json":  # metrics.json: written atomically, so whole whenever present
            assert "status" in json.loads(path.read_text()), path
        elif path.name != "log":
            pytest.fail(f"unexpected output {path}")


def newest_checkpoint(out: Path) -> Path | None:
    """last.ckpt, or the latest step's checkpoint when a kill landed between writing it and last.ckpt (a fresh
    run into a folder with checkpoints is refused, so every later run must resume)."""
    last = out / "checkpoints" / "last.ckpt"
    steps = sorted(out.glob("checkpoints/step*.ckpt"), key=lambda p: int(p.stem[4:]))
    return last if last.is_file() else (steps[-1] if steps else None)


NO_STOP = "callbacks.early_stop=null"  # the toy run stops when learned; these runs must not end on their own


# 8 kills in the default lane; the slow lane's 20 also must land one mid-save (a temp file left behind), which a
# handful of kills may miss by chance
@pytest.mark.parametrize(("n", "seed", "must_tear"), [(8, 1, False), pytest.param(20, 0, True, marks=pytest.mark.slow)])
def test_sigkill_at_random_moments_then_resume(tmp_path, n, seed, must_tear):
    zygote = Zygote()
    out, rng, kills, torn = tmp_path / "run", random.Random(seed), 0, 0
    last = out / "checkpoints" / "last.ckpt"
    try:
        for i in range(n):  # a run that never ends on its own, killed after 0.2-4 s (startup included)
            ckpt = newest_checkpoint(out)
            resume = [f"ckpt_path={ckpt}"] if ckpt else []
            pid = zygote.start(out, tmp_path / f"run{i}.log", "trainer.max_steps=100000", NO_STOP, *resume)
            time.sleep(rng.uniform(0.2, 4.0))
            subprocess.run(["kill", "-KILL", str(pid)], check=False)
            kills += zygote.wait(pid) == -9
            torn += any(out.rglob("*.tmp"))  # killed mid-save: a temp file was written but not renamed
            check_outputs(out)
        assert kills == n and (torn >= 1 or not must_tear), (kills, torn)
        assert last.is_file(), "no checkpoint survived the kills"

        # resume once more to a few steps past the last checkpoint, and train the same steps without a break
        steps = torch.load(last, weights_only=True)["global_step"] + 4
        assert (
            zygote.wait(
                zygote.start(out, tmp_path / "final.log", f"trainer.max_steps={steps}", NO_STOP, f"ckpt_path={last}")
            )
            == 0
        )
        reference = tmp_path / "reference"
        assert (
            zygote.wait(zygote.start(reference, tmp_path / "reference.log", f"trainer.max_steps={steps}", NO_STOP)) == 0
        )
    finally:
        zygote.close()

    print(f"{kills} kills, {torn} mid-save, resumed to step {steps - 4}")
    check_outputs(out)
    assert not list(out.rglob("*.tmp"))  # the last run removed what the killed ones left
    rows = (out / "textual_inversion_loss.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(1, steps + 1))  # each step once, in order
    a = io.load_embedding(reference / "toy-concept.safetensors")["toy-concept"]
    b = io.load_embedding(out / "toy-concept.safetensors")["toy-concept"]
    assert float((a - b).abs().max()) <= 1e-6, "killed-and-resumed run differs from the uninterrupted one"
