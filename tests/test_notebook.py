"""The exploration notebook runs top to bottom as a user opens it: from notebooks/, on the newest run."""

import os
import shutil

import nbformat
from nbclient import NotebookClient

from tests.conftest import ROOT


def test_explore_embedding_notebook_runs_from_its_folder_on_the_newest_run(tmp_path, monkeypatch, cli):
    # a project as a user has it: outputs/ with an older run and the newest one, the notebook in notebooks/
    older = tmp_path / "outputs" / "old-concept" / "2020-01-01_00-00-00-textual_inversion" / ".hydra"
    older.mkdir(parents=True)
    (older / "config.yaml").write_text("name: old-concept\n")
    os.utime(older / "config.yaml", (0, 0))
    newest = tmp_path / "outputs" / "toy-concept" / "newest"
    cli.train_ok(newest, "trainer.max_steps=20", "callbacks.preview.every_n_steps=10", "callbacks.toy_eval=null")
    (tmp_path / "notebooks").mkdir()
    shutil.copy(ROOT / "notebooks" / "explore_embedding.ipynb", tmp_path / "notebooks")
    nb = nbformat.read(tmp_path / "notebooks" / "explore_embedding.ipynb", as_version=4)
    assert nb.cells[1].source.startswith("RUN = None")  # the run is the first cell's visible variable
    for name in [k for k in os.environ if k.startswith("LIT_TI") or k == "MPLBACKEND"]:  # as Jupyter starts it
        monkeypatch.delenv(name)
    NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path / "notebooks")}}
    ).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert f"run: {newest}" in text
    assert "shape (2, 64)" in text  # the default run learns 2 vectors of the toy text encoder's width
    assert "vector 0:" in text
    assert "steps: ['10', '20']" in text
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 2  # the loss plot and the previews over the steps
