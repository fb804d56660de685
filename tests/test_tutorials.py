"""Every notebook in tutorials/ runs top to bottom at TUTORIAL_SCALE=smoke, and writes nothing into the repository:
no tracked file changes and no new file appears in results/ (notebooks write only into TUTORIAL_OUT)."""
import hashlib
import subprocess
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "tutorials").glob("*.ipynb"))


def repository_state():
    """{path: sha256} of every file git tracks, and of every file under results/ (tracked or not)."""
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    paths = {p for p in tracked.decode().split("\0") if p} | {str(p.relative_to(ROOT)) for p in
                                                             (ROOT / "results").rglob("*") if p.is_file()}
    return {p: hashlib.sha256((ROOT / p).read_bytes()).hexdigest() if (ROOT / p).is_file() else None
            for p in sorted(paths)}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_at_smoke_scale_and_writes_nothing_into_the_repository(path, monkeypatch, tmp_path):
    monkeypatch.setenv("TUTORIAL_SCALE", "smoke")
    monkeypatch.setenv("TUTORIAL_OUT", str(tmp_path))  # notebooks write checkpoints here, not into the repo
    monkeypatch.delenv("TUTORIAL_WRITE_RESULTS", raising=False)
    before = repository_state()
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "tutorials")}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    after = repository_state()
    changed = sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))
    assert changed == [], f"{path.name} wrote into the repository: {changed}"
