"""The `entry` fixture: lit_ti's four entry points run in-process under the trust rules (a pytest plugin
that tests/conftest.py loads); the short runs, the one-line-error assertions and the trained `checkpoint`
the trust tests share."""

import hashlib
import os
import stat
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT, compose


# ---------------------------------------------------------------- the trust harness
@dataclass
class Outcome:
    """What one entry-point run did, as its user would see it."""

    code: int  # exit status (0 = finished)
    stderr: str
    stdout: str
    errors: list[str]  # the `error: ...` lines
    warnings: list[str]  # warnings.warn messages and `warning: ...` lines
    out: Path  # the run folder


def _snapshot(root: Path, skip: Path) -> dict[str, str]:
    """sha256 of every file under `root` outside `skip` (symlinks by their target text)."""
    seen = {}
    for p in sorted(root.rglob("*")):
        if p == skip or skip in p.parents or not (p.is_file() or p.is_symlink()):
            continue
        if p.is_symlink():
            seen[str(p)] = "link:" + os.readlink(p)
        elif stat.S_ISREG(p.lstat().st_mode):
            seen[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return seen


class Entry:
    """Runs lit_ti's four entry points in-process, as their command lines would, and checks the trust rules
    on every run: no traceback, nothing outside the run folder changed, nothing the user put into the run
    folder deleted or changed. The neighbourhood is `root` (a tmp folder); the run folder is
    `root/user/projects/run`, deep enough that `../../x` still lands inside what is watched."""

    def __init__(self, root: Path, capsys):
        self.root, self.capsys = root, capsys
        self.out = root / "user" / "projects" / "run"

    def _guarded(self, out: Path, fn) -> Outcome:
        before = _snapshot(self.root, out)
        user_files = _snapshot(out, out / ".lit_ti-none") if out.is_dir() else {}
        code = 0
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                fn()
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
            except KeyboardInterrupt:  # escaping, it would end pytest's session, and print a traceback for the user
                pytest.fail("a Ctrl-C escaped the entry point as a KeyboardInterrupt")
        captured = self.capsys.readouterr()
        err = captured.err
        assert "Traceback" not in err, err[-3000:]
        assert _snapshot(self.root, out) == before, "a file outside the run folder was written or deleted"
        after = _snapshot(out, out / ".lit_ti-none") if out.is_dir() else {}
        lost = {p for p in user_files if p not in after}
        assert not lost, f"files the user put in the run folder were deleted: {sorted(lost)}"
        lines = err.splitlines()
        errors = [line for line in lines if line.startswith("error: ")]
        warned = [str(w.message) for w in caught] + [line for line in lines if line.startswith("warning: ")]
        return Outcome(code, err, captured.out, errors, warned, out)

    def train(self, *overrides: str) -> Outcome:
        import lit_ti.train

        cfg = compose(f"paths.output_dir={self.out}", *overrides)
        return self._guarded(self.out, lambda: lit_ti.train.main(cfg))

    def generate(self, *overrides: str) -> Outcome:
        import lit_ti.generate
        from lit_ti.errors import report_user_errors

        cfg = compose(f"out_dir={self.out}", *overrides, config="generate")
        return self._guarded(self.out, lambda: report_user_errors(lit_ti.generate.run, cfg))

    def preprocess(self, *overrides: str) -> Outcome:
        import lit_ti.preprocess
        from lit_ti.errors import report_user_errors

        cfg = compose(f"dst={self.out}", "progress=false", *overrides, config="preprocess")
        return self._guarded(self.out, lambda: report_user_errors(lit_ti.preprocess.run, cfg))

    def evaluate(self, *argv: str) -> Outcome:
        """`python evaluate.py ARGV` (it writes nothing; its run folder is only watched)."""
        import runpy

        def call():
            old = sys.argv
            sys.argv = ["evaluate.py", *argv]
            try:
                runpy.run_path(str(ROOT / "evaluate.py"), run_name="__main__")
            finally:
                sys.argv = old

        return self._guarded(self.out, call)


@pytest.fixture
def entry(tmp_path, capsys) -> Entry:
    """The four entry points under the trust rules (see Entry)."""
    return Entry(tmp_path, capsys)


# ---------------------------------------------------------------- what the trust tests share
QUICK = ["model=tiny", "trainer.max_steps=2", "callbacks.toy_eval=null", "callbacks.preview=null"]
METHODS = {
    "ti": ["experiment=toy_ti", *QUICK],
    "dreamartist": ["experiment=toy_dreamartist", *QUICK],
    "hypernetwork": ["experiment=hypernetwork_style", *QUICK[:2], "callbacks.toy_style_eval=null", *QUICK[3:]],
}
CKPT = ["callbacks.model_checkpoint.every_n_train_steps=1"]


def one_error(outcome, *needles: str) -> str:
    assert outcome.code == 2, outcome.stderr[-2000:]
    assert len(outcome.errors) == 1, outcome.stderr[-2000:]
    for needle in needles:
        assert needle in outcome.errors[0], outcome.errors[0]
    return outcome.errors[0]


def nothing_left(outcome) -> None:
    """A run that stopped with a user error wrote nothing: not even its run folder."""
    assert not outcome.out.exists(), sorted(outcome.out.rglob("*"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A TI run's last.ckpt (tiny model, 2 vectors, name zz-concept) outside any watched folder."""
    import lit_ti.train

    out = tmp_path_factory.mktemp("trained")
    lit_ti.train.main(compose(f"paths.output_dir={out}", "name=zz-concept", *QUICK, *CKPT))
    return out / "checkpoints" / "last.ckpt"
