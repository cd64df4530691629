"""The exploration notebook runs top to bottom on a short real run."""

import os

import nbformat
from nbclient import NotebookClient

from tests.conftest import ROOT
from tests.test_cli import train_ok


def test_explore_embedding_notebook_runs(tmp_path):
    train_ok(tmp_path, "trainer.max_steps=20", "callbacks.preview.every_n_steps=10", "callbacks.toy_eval=null")
    nb = nbformat.read(ROOT / "notebooks" / "explore_embedding.ipynb", as_version=4)
    os.environ["LIT_TI_RUN"] = str(tmp_path)
    os.environ["MPLBACKEND"] = "Agg"
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    finally:
        del os.environ["LIT_TI_RUN"]
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "shape (2, 64)" in text  # the default run learns 2 vectors of the toy text encoder's width
    assert "vector 0:" in text
    assert "steps: ['10', '20']" in text
