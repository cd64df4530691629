"""The test suite's own layout: shared helpers are conftest fixtures, never imported from another test module."""

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


def imported_test_modules(path: Path) -> list[str]:
    """The `tests/test_*` modules other than itself that the file at `path` imports, at any depth (inside
    functions too), in every spelling: `import tests.test_x`, `from tests.test_x import y`,
    `from tests import test_x`, `from .test_x import y`, `from . import test_x`."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative to tests/ (a flat package)
                base = "tests" + (f".{node.module}" if node.module else "")
            else:
                base = node.module or ""
            names += [base, *(f"{base}.{alias.name}" for alias in node.names)]
    found = set()
    for name in names:
        parts = name.split(".")
        if len(parts) >= 2 and parts[0] == "tests" and parts[1].startswith("test_") and parts[1] != path.stem:
            found.add(parts[1])
    return sorted(found)


@pytest.mark.parametrize(
    "source",
    [
        "from tests.test_cli import train",
        "import tests.test_cli",
        "import tests.test_cli as cli",
        "from tests import conftest, test_cli",
        "from .test_cli import train",
        "from . import test_cli",
        "def f():\n    from tests.test_cli import train\n",
    ],
)
def test_every_spelling_of_a_cross_import_is_found(tmp_path, source):
    (tmp_path / "test_other.py").write_text(source + "\n")
    assert imported_test_modules(tmp_path / "test_other.py") == ["test_cli"]


def test_helpers_conftest_and_self_imports_are_allowed(tmp_path):
    source = "from tests.conftest import NAME\nimport tests.ldm_layout\nfrom tests.test_self import worker\n"
    (tmp_path / "test_self.py").write_text(source)
    assert imported_test_modules(tmp_path / "test_self.py") == []


def test_no_test_module_imports_another():
    """Shared helpers live in conftest.py as fixtures; a test module importing another one couples them."""
    offenders = {p.name: found for p in sorted(TESTS.glob("*.py")) if (found := imported_test_modules(p))}
    assert not offenders, f"move the shared helpers into tests/conftest.py as fixtures: {offenders}"
