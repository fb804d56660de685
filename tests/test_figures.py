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
        path = keyfigs.results_path(module)
        if path is None:
            continue
        for fig in module.FIGURES:
            if keyfigs.missing(module, fig, path):  # a part of a multi-file module not committed yet
                assert f"skip {name}-{fig}: its results are not committed yet (" in run.stdout
                continue
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


@pytest.mark.parametrize("name", ["brierlm", "dispersion", "overview", "calm", "mtp"])
def test_notebook_shows_its_key_figures_through_keyfigs(name):
    """The notebook and figures.py draw with the same functions: each key figure is called in cells (live, and
    stored beside it) that each show an image in the committed notebook, and the cpu-scale results the figures are
    drawn from are committed."""
    nb = nbformat.read(TUTORIALS / f"{name}.ipynb", as_version=4)
    module = figures.load_module(name)
    assert "from keyfigs import " + name + " as figs" in nb.cells[1].source
    for fig in module.FIGURES:
        cells = [c for c in nb.cells if c.cell_type == "code" and f"figs.{fig}(" in c.source]
        assert cells, fig
        for cell in cells:
            assert any("image/png" in o.get("data", {}) for o in cell.outputs), fig
    if name == "brierlm":
        results = json.loads((ROOT / "results" / "brierlm_cpu.json").read_text())
        assert results["meta"]["scale"] == "cpu" and len(results["checkpoints"]) == 15
    elif name == "dispersion":  # one file per part, each written by `python -m bench dispersion <part>` at cpu scale
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


# ----------------------------------------------------------------------------- calm and mtp on synthetic results
# (the schema of bench/calm_runs.py and bench/mtp_experiments.py, with what a sweep in progress lacks: a seed cut
# short, a seed never run, a part with no file)

def calm_point(it, flops, b1, se=0.01):
    return dict(iter=it, train_flops=flops, flops_per_token=1.0, train_seconds=1.0, val_loss=1.0, threads=1, brier1=b1,
                brier2=b1 / 2, brier3=b1 / 3, brier4=b1 / 4, brierlm=100 * b1 / 4, brier1_se=se, brier2_se=se,
                brier3_se=se, brier4_se=se, brierlm_se=None)


def calm_results():
    """curves_4x128 (NTP; CALM K = 4 with seed 1 cut after two points; K = 2, one seed; temperature posts) and
    heads; no curves_6x192 and no recipe."""
    temps = lambda exact: {f"{T:g}" + (" exact" if s == "exact" else ""): dict(
        T=T, sampler=s, acc1=0.5 - T / 4, acc4=0.1 - T / 20, agree4=1 - T, distinct2=0.2 + T / 4, acc1_se=0.01)
        for T in (1.0, 0.5) for s in (("batch", "exact") if exact else ("batch",))}
    curves = {f"ntp {f:g}": dict(flags={}, points=[calm_point(int(80 * f), 8e12 * f, 0.2 + 0.1 * f)])
              for f in (0.25, 0.5, 1)}
    curves["ntp 1"]["post"] = dict(temperature=temps(False), samples=["a"])
    for seed, n in ((0, 3), (1, 2)):
        curves[f"calm K=4 seed {seed}"] = dict(flags={}, points=[
            calm_point(100 * f, 8e12 * f, 0.1 * f + 0.01 * seed) for f in (0.25, 0.5, 1)][:n])
    curves["calm K=4 seed 0"]["post"] = dict(temperature=temps(True), samples=["b"])
    curves["calm K=2 seed 0"] = dict(flags={}, points=[calm_point(50 * f, 8.05e12 * f, 0.12 * f) for f in (0.5, 1)])
    steps = lambda calls: {str(n): dict(calm_point(100, 8e12, 0.05 * n ** 0.3), calls=n * calls) for n in (1, 2, 5)}
    heads = {"flow seed 0": dict(flags={}, points=[calm_point(100, 8e12, 0.09)], post=dict(
                 steps=steps(2), distinct2=0.3, samples=["c"])),
             "diffusion seed 0": dict(flags={}, points=[calm_point(100, 8e12, 0.08)], post=dict(
                 steps=steps(1), distinct2=0.3, samples=["d"])),
             "mse seed 0": dict(flags={}, points=[calm_point(100, 8e12, 0.02)])}
    return {"curves_4x128": {"runs": curves}, "heads": {"runs": heads}}


def test_calm_curves_average_the_seeds_that_reached_each_point():
    from keyfigs import calm as figs
    cv = figs.curves(calm_results()["curves_4x128"]["runs"])
    assert list(cv) == ["ntp", "calm K=4", "calm K=2"]
    assert [p["train_flops"] for p in cv["ntp"]] == [2e12, 4e12, 8e12] and cv["ntp"][0]["brier1_se"] is None
    k4 = cv["calm K=4"]
    assert [p["seeds"] for p in k4] == [2, 2, 1]  # seed 1 was cut after two points: the last point is seed 0's
    assert k4[0]["brier1"] == pytest.approx(0.03) and k4[0]["brier1_se"] == pytest.approx(0.005)
    assert k4[2]["brier1"] == pytest.approx(0.1) and k4[2]["brier1_se"] is None  # one seed: no error bar
    assert figs.ntp_at(cv["ntp"], 2 * 8e12 ** 0.5 * 2e12 ** 0.5 / 2) == pytest.approx(0.25)  # half-way in log FLOPs
    assert figs.ntp_at(cv["ntp"], 8.05e12) == pytest.approx(0.3)  # CALM's rounded budget, a hair past NTP's
    assert figs.ntp_at(cv["ntp"], 1e12) is None


def test_calm_figures_draw_what_exists_and_figures_py_skips_a_missing_part(tmp_path, monkeypatch, capsys):
    """Every figure draws from a partial sweep (one column without curves_6x192, no error bar for one seed);
    figures.py skips the recipe figure alone, naming its file, and says which files each figure came from."""
    from keyfigs import calm as figs
    results = calm_results()
    for name in ("performance_vs_compute", "ratio_to_ntp", "heads", "temperature"):
        fig = figs.FIGURES[name](results)
        assert fig.axes and all(a.has_data() for a in fig.axes[:2]), name
    assert len(figs.performance_vs_compute(results).axes) == 2  # one backbone size, Brier-1 and BrierLM
    heads = figs.heads(results).axes[0].get_legend_handles_labels()[1]
    assert sorted(heads) == ["MSE (regression)", "diffusion (1 seed)", "energy (1 seed)", "flow (1 seed)"]
    recipe = {"runs": {"calm K=4 lr=0.001": dict(flags={}, points=[calm_point(5, 1e12, 0.1), calm_point(9, 2e12, 0.2)]),
                       "ntp lr=0.003 cos": dict(flags={}, points=[calm_point(3, 1e12, 0.3), calm_point(6, 2e12, 0.4)])}}
    assert [t.get_text() for t in figs.recipe_sweep({"recipe": recipe}).axes[0].get_yticklabels()] == \
        ["calm K=4 lr=0.001", "ntp lr=0.003 cos"]
    root = fake_tutorials(tmp_path, monkeypatch)
    nbformat.write(nbformat.v4.new_notebook(), root / "tutorials" / "calm.ipynb")
    (root / "tutorials" / "keyfigs" / "calm.py").write_text((TUTORIALS / "keyfigs" / "calm.py").read_text())
    for part, data in results.items():
        (root / "results" / f"calm_{part}.json").write_text(json.dumps(data))
    assert figures.main(["--out", str(root / "figs"), "--only", "calm"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "skip calm-recipe_sweep: its results are not committed yet (results/calm_recipe.json)" in out
    assert "wrote figs/calm-heads.png/.svg  (from results/calm_heads.json, results/calm_curves_4x128.json)" in out
    assert len(list((root / "figs").glob("calm-*.svg"))) == 4


def mtp_results():
    """size (2 seeds of n = 1, 2 at one size; one of a larger size, n = 4 without its n = 1: unpaired), induction
    (n = 2 with one seed), polynomial, bytes and speedup; the schema of bench/mtp_experiments.py."""
    def size_run(L, d, n, s, loss):
        return dict(n_layer=L, n_embd=d, n=n, seed=s, params_non_embedding=12 * L * d * d, val_loss_h1=loss,
                    brier1=1 - loss / 3, brierlm=30 - 5 * loss, brier1_se=0.01, brierlm_se=1.0, tokens=1, seconds=1.0)
    size = {f"{L}x{d}_n{n}_s{s}": size_run(L, d, n, s, loss) for L, d, n, s, loss in (
        (4, 16, 1, 0, 2.0), (4, 16, 2, 0, 2.1), (4, 16, 1, 1, 2.2), (4, 16, 2, 1, 2.5), (8, 32, 1, 0, 1.5),
        (8, 32, 2, 0, 1.4), (8, 32, 4, 1, 1.0))}
    task = lambda L, d, n, s, acc, ood=False: dict(
        n_layer=L, n_embd=d, n=n, seed=s, params_non_embedding=12 * L * d * d, acc_val=acc, token_acc_val=acc,
        **(dict(acc_val_ood=acc / 2, token_acc_val_ood=acc / 2, acc_ops1_val=acc) if ood else {}))
    induction = {f"4x{d}_n{n}_s{s}": task(4, d, n, s, 0.1 + d / 100 + n / 10) for d in (16, 32) for n in (1, 2)
                 for s in range(2) if not (n == 2 and s == 1)}
    polynomial = {f"4x16_n{n}_s0": task(4, 16, n, 0, 0.01 * n, True) for n in (1, 2, 4)}
    byt = {f"{ds}_n{n}": dict(dataset=ds, n=n, n_layer=4, n_embd=16, tokens_per_forward=1 + n / 4, per_prompt=[1.5],
                              identical=True, tokens_per_forward_t1=1 + n / 5, val_loss_h1=2.0, seconds=1.0)
           for ds in ("pystdlib", "shakespeare") for n in (2, 4)}
    speed = {"code": dict(n=4, n_layer=4, n_embd=32, verify_over_step=1.3, speedup=1.2, speedup_se=0.1,
                          tokens_per_forward=1.8, per_prompt=[dict(tokens_per_forward=1.5, speedup=1.1),
                                                              dict(tokens_per_forward=2.1, speedup=1.5)])}
    return {name: {"sweep": name, "scale": "cpu", "hardware": "test", "runs": runs} for name, runs in (
        ("size", size), ("induction", induction), ("polynomial", polynomial), ("bytes", byt), ("speedup", speed))}


def test_mtp_size_summary_pairs_by_seed_and_leaves_an_unpaired_run_out():
    from keyfigs import mtp as figs
    results = mtp_results()
    rows = {(r["n_embd"], r["n"]): r for r in figs.size_summary(results["size"])}
    assert (32, 4) not in rows and rows[16, 2]["seeds"] == 2  # n = 4 has no n = 1 run of its seed to pair with
    assert rows[16, 2]["d_val_loss_h1"] == pytest.approx(0.2) and rows[32, 2]["d_val_loss_h1_se"] is None


def test_mtp_figures_draw_what_exists_and_figures_py_skips_a_missing_part(tmp_path, monkeypatch, capsys):
    from keyfigs import mtp as figs
    results = mtp_results()
    for name, fn in figs.FIGURES.items():
        fig = fn(results)
        assert fig.axes and fig.axes[0].has_data(), name
    labels = figs.induction_vs_size(results).axes[0].get_legend_handles_labels()[1]
    assert sorted(labels) == ["chance (10 digits)", "n = 1 (2 seeds)", "n = 2 (1 seed)"]
    root = fake_tutorials(tmp_path, monkeypatch)
    nbformat.write(nbformat.v4.new_notebook(), root / "tutorials" / "mtp.ipynb")
    (root / "tutorials" / "keyfigs" / "mtp.py").write_text((TUTORIALS / "keyfigs" / "mtp.py").read_text())
    for part, data in results.items():
        if part != "induction":
            (root / "results" / f"mtp_{part}.json").write_text(json.dumps(data))
    assert figures.main(["--out", str(root / "figs"), "--only", "mtp"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "skip mtp-induction_vs_size: its results are not committed yet (results/mtp_induction.json)" in out
    assert sorted(p.name for p in (root / "figs").glob("*.svg")) == [
        f"mtp-{f}.svg" for f in sorted(figs.FIGURES) if f != "induction_vs_size"]
