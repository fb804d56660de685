"""python tutorials/figures.py: every key figure a notebook provides is written as PNG and SVG from committed results;
a notebook without a figure module, or without results, is skipped with one line; a figure that fails is reported
and the others are still written; every figure module follows the convention of tutorials/keyfigs/__init__.py."""
import ast
import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
TUTORIALS = ROOT / "tutorials"
sys.path.insert(0, str(TUTORIALS))
import figures  # noqa: E402
import keyfigs  # noqa: E402

MODULES = sorted(p.stem for p in (TUTORIALS / "keyfigs").glob("*.py") if p.stem != "__init__")


def test_the_script_writes_every_provided_figure_and_skips_the_rest(tmp_path):
    run = subprocess.run([sys.executable, str(TUTORIALS / "figures.py"), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    for nb in TUTORIALS.glob("*.ipynb"):  # every notebook is either drawn or skipped with a reason
        assert any(f"{nb.stem}-" in line and line.startswith("wrote ") for line in lines) or \
            any(line.startswith(f"skip {nb.stem}: ") for line in lines), nb.stem
    written = 0
    for name in MODULES:
        module = figures.load_module(name)
        if keyfigs.results_path(module) is None:
            continue
        for fig in module.FIGURES:
            png, svg = tmp_path / f"{name}-{fig}.png", tmp_path / f"{name}-{fig}.svg"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and b"<svg" in svg.read_bytes()[:2000]
            assert f"`{name}-{fig}`" in (tmp_path / "index.md").read_text()
            written += 1
    assert written == len(list(tmp_path.glob("*.png"))) and written >= 4
    assert (tmp_path / "brierlm-brierlm_vs_ce.svg").exists()  # the owned notebook's figures come from its results


def fake_tutorials(tmp_path, monkeypatch):
    """tutorials/ with a notebook and no module (a), a module without results (b), a module whose second figure
    raises (c), and the results of c."""
    tut, results = tmp_path / "tutorials", tmp_path / "results"
    (tut / "keyfigs").mkdir(parents=True)
    results.mkdir()
    for name in "abc":
        nbformat.write(nbformat.v4.new_notebook(), tut / f"{name}.ipynb")
    (tut / "keyfigs" / "b.py").write_text('RESULTS = "results/b_cpu.json"\nFIGURES = {}\n')
    (tut / "keyfigs" / "c.py").write_text(
        "import matplotlib.pyplot as plt\nRESULTS = ['results/c_gpu.json', 'results/c_cpu.json']\n"
        "def line(r):\n    '''A line through the points.'''\n    fig, ax = plt.subplots()\n    ax.plot(r['y'])\n"
        "    return fig\n"
        "def broken(r):\n    '''Needs a key the results lack.'''\n    return r['missing']\n"
        "FIGURES = {'broken': broken, 'line': line}\n")
    (results / "c_cpu.json").write_text(json.dumps({"y": [1, 3, 2]}))
    monkeypatch.setattr(figures, "TUTORIALS", str(tut))
    monkeypatch.setattr(figures, "ROOT", str(tmp_path))
    return tmp_path


def test_missing_modules_and_results_are_skipped_and_a_failing_figure_is_reported(tmp_path, monkeypatch, capsys):
    root = fake_tutorials(tmp_path, monkeypatch)
    assert figures.main(["--out", str(root / "figs")]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "skip a: no tutorials/keyfigs/a.py yet (this notebook does not provide its key figures)"
    assert out[1].startswith("skip b: none of its results is committed yet (results/b_cpu.json)")
    assert out[2] == "FAILED c-broken: KeyError: 'missing' (results: results/c_cpu.json)"
    assert out[3].startswith("wrote figs/c-line.png/.svg")
    assert out[-1].startswith("1 figures in figs") and out[-1].endswith("1 FAILED")
    assert sorted(p.name for p in (root / "figs").iterdir()) == ["c-line.png", "c-line.svg", "index.md"]
    assert "| `c-line` | `tutorials/c.ipynb` | `results/c_cpu.json` | A line through the points. |" in \
        (root / "figs" / "index.md").read_text()


def test_the_first_existing_results_file_is_used(tmp_path, monkeypatch, capsys):
    root = fake_tutorials(tmp_path, monkeypatch)
    (root / "results" / "c_gpu.json").write_text(json.dumps({"y": [0, 1]}))
    figures.main(["--out", str(root / "figs"), "--only", "c"])
    assert "wrote figs/c-line.png/.svg  (from results/c_gpu.json)" in capsys.readouterr().out


def test_an_unknown_notebook_is_a_one_line_error(capsys):
    assert figures.main(["--only", "nosuch"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown notebook nosuch; known: ") and "\n" not in err


@pytest.mark.parametrize("name", MODULES)
def test_every_figure_module_follows_the_convention(name):
    path = TUTORIALS / "keyfigs" / f"{name}.py"
    assert (TUTORIALS / f"{name}.ipynb").exists(), f"keyfigs/{name}.py has no notebook tutorials/{name}.ipynb"
    imported = {a.name.split(".")[0] for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Import)
                for a in n.names}
    assert not imported & {"torch", "gpt", "calm", "mtp", "brierlm", "dispersion", "train", "bench"}
    module = figures.load_module(name)
    groups = module.RESULTS.values() if isinstance(module.RESULTS, dict) else [module.RESULTS]  # dict: per part
    paths = [p for g in groups for p in ([g] if isinstance(g, str) else g)]
    assert paths and all(p.startswith("results/") and p.endswith(".json") for p in paths)
    assert module.FIGURES and all(callable(f) and keyfigs.caption(f) for f in module.FIGURES.values())


@pytest.mark.parametrize("name", ["brierlm", "dispersion"])
def test_notebook_shows_its_key_figures_through_keyfigs(name):
    """The notebook and figures.py draw with the same functions: each key figure is called in a cell that shows
    an image in the committed notebook, and the cpu-scale results the figures are drawn from are committed."""
    nb = nbformat.read(TUTORIALS / f"{name}.ipynb", as_version=4)
    module = figures.load_module(name)
    for fig in module.FIGURES:
        cells = [c for c in nb.cells if c.cell_type == "code" and f"figs.{fig}(results)" in c.source]
        assert len(cells) == 1, fig
        assert any("image/png" in o.get("data", {}) for o in cells[0].outputs), fig
    if name == "brierlm":
        results = json.loads((ROOT / "results" / "brierlm_cpu.json").read_text())
        assert results["meta"]["scale"] == "cpu" and len(results["checkpoints"]) == 15
    else:  # one file per part, each written by `python -m bench dispersion <part>` at cpu scale
        results = keyfigs.load(keyfigs.results_path(module))
        assert sorted(results) == ["arithmetic", "layers_knn", "sweep"]
        assert all(r["scale"] == "cpu" and r["rows"] for r in results.values())


FIGURE_OF_TWO_PARTS = '''import matplotlib.pyplot as plt
RESULTS = {"one": "results/d_one.json", "two": ["results/d_two_gpu.json", "results/d_two.json"]}
def both(r):
    """Both parts."""
    fig, ax = plt.subplots()
    ax.plot(r["one"]["y"] + r["two"]["y"])
    return fig
FIGURES = {"both": both}
'''


def test_a_module_may_read_one_file_per_part(tmp_path, monkeypatch, capsys):
    """RESULTS as a dict {part: paths}: skipped, naming the missing part's files, until every part has one; then
    the figures get {part: its JSON} and index.md names every file."""
    root = fake_tutorials(tmp_path, monkeypatch)
    nbformat.write(nbformat.v4.new_notebook(), root / "tutorials" / "d.ipynb")
    (root / "tutorials" / "keyfigs" / "d.py").write_text(FIGURE_OF_TWO_PARTS)
    (root / "results" / "d_one.json").write_text(json.dumps({"y": [1, 2]}))
    assert figures.main(["--out", str(root / "figs"), "--only", "d"]) == 0
    assert capsys.readouterr().out.startswith(
        "skip d: none of its results is committed yet (results/d_two_gpu.json, results/d_two.json)")
    (root / "results" / "d_two.json").write_text(json.dumps({"y": [3]}))
    assert figures.main(["--out", str(root / "figs"), "--only", "d"]) == 0
    assert "wrote figs/d-both.png/.svg  (from results/d_one.json, results/d_two.json)" in capsys.readouterr().out
    assert "| `d-both` | `tutorials/d.ipynb` | `results/d_one.json, results/d_two.json` | Both parts. |" in \
        (root / "figs" / "index.md").read_text()
