"""Every notebook in tutorials/ runs top to bottom at TUTORIAL_SCALE=smoke."""
import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "tutorials").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_at_smoke_scale(path, monkeypatch, tmp_path):
    monkeypatch.setenv("TUTORIAL_SCALE", "smoke")
    monkeypatch.setenv("TUTORIAL_OUT", str(tmp_path))  # notebooks write checkpoints here, not into the repo
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "tutorials")}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
