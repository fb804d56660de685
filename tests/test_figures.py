"""python tutorials/figures.py: every key figure a notebook provides is written as PNG and SVG from committed results;
a notebook without a figure module, or without results, is skipped with one line; a figure that fails is reported
and the others are still written; every figure module follows the convention of tutorials/keyfigs/__init__.py."""
import ast
import json
import subprocess
import sys
from pathlib import Path

import nbformat
import numpy as np
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
        assert sorted(results) == ["gap", "knn", "sweep"]
        assert all(r["experiment"] == f"dispersion_{part}" and r["runs"] and
                   all("provenance" in run and run["config"]["scale"] == "cpu" for run in r["runs"].values())
                   for part, r in results.items())
    elif name == "mtp":  # bench/records.py's format, every run with its configuration and provenance
        for part in ("size", "induction", "polynomial", "bytes", "speedup"):
            results = json.loads((ROOT / "results" / f"mtp_{part}.json").read_text())
            assert results["experiment"] == f"mtp_{part}" and results["runs"]
            assert all({"config", "metrics", "provenance"} <= set(r) for r in results["runs"].values())


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
    assert sorted(heads) == ["MSE (regression)", "diffusion (1 seed)", "energy (1 seed)", "flow (1 seed)",
                             "no skill: unigram bytes (0.054)"]
    recipe = {"runs": {"calm K=4 lr=0.001": dict(flags={}, points=[calm_point(5, 1e12, 0.1), calm_point(9, 2e12, 0.2)]),
                       "ntp lr=0.003 cos": dict(flags={}, points=[calm_point(3, 1e12, 0.3), calm_point(6, 2e12, 0.4)])}}
    assert [t.get_text() for t in figs.recipe_sweep({"recipe": recipe}).axes[0].get_yticklabels()] == \
        ["CALM, learning rate 0.001", "NTP, learning rate 0.003, cosine"]  # labels for slides, not run names
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


def scaling_results():
    """scaling_4x128 with 2 seeds (seed 1's CALM cut after two budgets), recorded corpus facts; head_study;
    autoencoder_noise (the plain arm with one seed fewer)."""
    def point(it, flops, b1, exact=None, epochs=0.5):
        p = calm_point(it, flops, b1, se=0.005)
        p.update(epochs=epochs, train_loss=1.0)
        if exact is not None:
            p.update(brier1_exact=exact, brier1_exact_se=0.002, brierlm_vr=10 * exact)
        return p
    base = 1e13
    runs = {}
    for seed in (0, 1):
        for b, ntp in ((0.5, 0.30), (1, 0.35), (2, 0.38), (4, 0.40)):
            runs[f"ntp x{b:g} seed {seed}"] = dict(flags={}, points=[point(int(100 * b), b * base, ntp - 0.01, ntp + 0.01 * seed, b / 4)])
        calm = [point(int(200 * b), b * base * 1.001, 0.1 + 0.05 * i + 0.01 * seed, epochs=b / 2)
                for i, b in enumerate((0.5, 1, 2, 4))]
        runs[f"calm K=4 seed {seed}"] = dict(flags={}, points=calm if seed == 0 else calm[:2])
    corpus = {"pystdlib": dict(dataset="pystdlib", train_tokens=10, val_tokens=1, unigram_brier1=0.09, mode_accuracy=0.28)}
    study = {f"{head} seed {s}": dict(flags={}, points=[calm_point(100 * f, 1e12 * f, b + 0.02 * f + 0.01 * s)
                                                       for f in (1, 2, 4)])
             for head, b in (("energy", 0.19), ("flow", 0.25)) for s in (0, 1)}
    study.update({f"energy {c} seed {s}": dict(flags={}, points=[calm_point(100, 1e12, b + 0.01 * s)])
                  for c, b in (("N=16", 0.2), ("head width 128", 0.265)) for s in (0, 1)})
    ae = {f"{arm} seed {s}": dict(flags={}, points=[dict(iter=10, recon_acc=1.0, latent_rms=r, tokens=4096,
          recon_rel={"0": 1.0, "0.3": 0.99 - drop, "1": 0.9 - 3 * drop}, recon_abs={"0": 1.0, "0.3": 0.99, "1": 0.9})])
          for arm, r, drop in (("regularised", 1.0, 0.0), ("no variational", 2.0, 0.01), ("plain", 3.0, 0.1))
          for s in range(3 if arm != "plain" else 2)}
    return {"scaling_4x128": {"runs": runs, "corpus": corpus}, "head_study": {"runs": study},
            "autoencoder_noise": {"runs": ae}}


def test_scaling_pairs_ntp_and_calm_by_seed_and_budget():
    from keyfigs import calm as figs
    rows = figs.scaling_rows(scaling_results()["scaling_4x128"]["runs"])
    assert [r["budget"] for r in rows] == [0.5, 1, 2, 4]
    assert [len(r["calm"]) for r in rows] == [2, 2, 1, 1] and all(len(r["ntp"]) == 2 for r in rows)
    r = rows[0]  # seed 0: 0.10 / 0.30, seed 1: 0.11 / 0.31 (NTP's exact Brier-1, not its sampled one)
    assert r["ratio"] == pytest.approx((0.10 / 0.30 + 0.11 / 0.31) / 2) and r["ratio_seeds"] == 2
    assert r["ratio_se"] >= abs(0.10 / 0.30 - 0.11 / 0.31) / 2  # at least the spread over the two seeds
    assert r["ntp_brier1"][0] == pytest.approx(0.305) and r["calm_epochs"] == 0.25 and r["ntp_epochs"] == 0.125
    assert rows[-1]["ratio_seeds"] == 1 and rows[-1]["ratio"] == pytest.approx(0.25 / 0.40)


def test_the_headline_is_an_interpolation_or_a_stated_extrapolation():
    from keyfigs import calm as figs
    rows = figs.scaling_rows(scaling_results()["scaling_4x128"]["runs"])
    h = figs.headline(rows)
    # CALM's 0.25 at 4e13 is below NTP's smallest budget (0.305 at 5e12): no equivalent compute inside the curve
    assert h["equivalent"] is None and h["slope"] > 0
    ratios = [r["ratio"] for r in rows]
    slope, icpt = np.polyfit(np.log10([r["flops"] for r in rows]), ratios, 1)
    assert h["crossing"] == pytest.approx(10 ** ((1 - icpt) / slope))
    for r in rows:  # NTP lower: now CALM's last Brier-1 is inside NTP's range
        for s, p in r["ntp"]:
            p["brier1_exact"] -= 0.1
    h = figs.headline(figs.scaling_rows({**{f"ntp x{r['budget']:g} seed {s}": dict(points=[p]) for r in rows
                                            for s, p in r["ntp"]},
                                         **{k: v for k, v in scaling_results()["scaling_4x128"]["runs"].items()
                                            if k.startswith("calm")}}))
    assert h["equivalent"]["calm_flops"] == 4e13  # the budget, NTP's FLOPs (CALM's are within 1% of them)
    assert 5e12 < h["equivalent"]["ntp_flops"] < 4e13


def test_issue23_figures_draw_with_baselines_and_the_paper(tmp_path):
    from keyfigs import calm as figs
    results = scaling_results()
    for name in ("scaling", "head_study", "autoencoder_noise"):
        fig = figs.FIGURES[name](results)
        texts = [t.get_text() for a in fig.axes for t in a.texts]
        labels = [t for a in fig.axes for t in a.get_legend_handles_labels()[1]]
        assert any(t.startswith("paper:") for t in texts), name  # the paper's result, in one line of text
        assert any(l.startswith("no skill") for l in labels), name  # the baseline a model with no skill reaches
        fig.savefig(tmp_path / f"{name}.png")
    texts = [t.get_text() for a in figs.head_study(results).axes for t in a.texts]
    assert any("closes the gap" in t and "head as wide as the backbone" in t for t in texts)
    weak = scaling_results()
    for k in [k for k in weak["head_study"]["runs"] if k.startswith("energy ")]:
        weak["head_study"]["runs"][k]["points"][0]["brier1"] = 0.15
    assert any(t.startswith("null result") for a in figs.head_study(weak).axes for t in [x.get_text() for x in a.texts])
    verdict = figs.robustness_verdict(results["autoencoder_noise"]["runs"]).splitlines()
    assert verdict[0].startswith("σ = 0.3 × RMS: regularised 0.990 vs plain 0.890 (+0.100")
    assert verdict[1].startswith("σ = 1 × RMS: regularised 0.900 vs plain 0.600")
    assert "scaling_4x128" in figs.NEEDS["scaling"] and figs.baseline(results, "scaling_4x128") == 0.09
    assert figs.baseline({}, "curves_4x128") == figs.SHAKESPEARE["unigram_brier1"]


def mtp_results():
    """size (2 seeds of n = 1, 2 at one size; one of a larger size, n = 4 without its n = 1: unpaired), induction
    (n = 2 with one seed), polynomial, bytes and speedup; bench/records.py's format, as bench/mtp_experiments.py
    writes it."""
    def rec(cfg, metrics):
        return dict(config=cfg, metrics=metrics, provenance=dict(commit="abc", code="sha256:x", threads=1,
                                                                 seed=cfg.get("seed"), hardware="test"))

    def size_run(L, d, n, s, loss):
        return rec(dict(sweep="size", model=[L, d, 2], n=n, seed=s), dict(
            params_non_embedding=12 * L * d * d, val_loss_h1=loss, brier1=1 - loss / 3, brierlm=30 - 5 * loss,
            brier1_se=0.01, brierlm_se=1.0, tokens=24 * L * d * d, trunk_blocks=L - n, train_seconds=1.0))
    size = {f"{L}x{d}_n{n}_s{s}": size_run(L, d, n, s, loss) for L, d, n, s, loss in (
        (4, 16, 1, 0, 2.0), (4, 16, 2, 0, 2.1), (4, 16, 1, 1, 2.2), (4, 16, 2, 1, 2.5), (8, 32, 1, 0, 1.5),
        (8, 32, 2, 0, 1.4), (8, 32, 4, 1, 1.0))}

    def task(L, d, n, s, acc, ood=False):
        base = dict(val=dict(chance=0.1, guess_seen=0.125)) if not ood else dict(
            val=dict(chance=7 ** -5, chance_per_digit=1 / 7, common_digit=0.0, common_digit_per_digit=0.17),
            val_ood=dict(chance=7 ** -5, chance_per_digit=1 / 7, common_digit=0.0, common_digit_per_digit=0.2))
        m = dict(params_non_embedding=12 * L * d * d, acc_val=acc, token_acc_val=acc, n_scored_val=100,
                 curve=[dict(iter=10, acc_val=acc / 2), dict(iter=20, acc_val=acc)], no_skill=base)
        if ood:
            m.update(acc_val_ood=acc / 2, token_acc_val_ood=acc / 2, acc_m1_val=acc, acc_m2_val_ood=acc / 2,
                     acc_m1_add_val=1.0, n_scored_val_ood=100)
        return rec(dict(sweep="polynomial" if ood else "induction", model=[L, d, 2], n=n, seed=s), m)
    induction = {f"4x{d}_n{n}_s{s}": task(4, d, n, s, 0.1 + d / 100 + n / 10) for d in (16, 32) for n in (1, 2)
                 for s in range(2) if not (n == 2 and s == 1)}
    polynomial = {f"4x16_n{n}_s0": task(4, 16, n, 0, 0.01 * n, True) for n in (1, 2, 4)}
    byt = {f"{ds}_n{n}": rec(dict(sweep="bytes", model=[4, 16, 2], n=n, data=ds), dict(
        dataset=ds, n=n, n_layer=4, n_embd=16, tokens_per_forward=1 + n / 4, per_prompt=[1.5], identical=True,
        tokens_per_forward_t1=1 + n / 5, val_loss_h1=2.0)) for ds in ("pystdlib", "shakespeare") for n in (2, 4)}
    speed = {"code": rec(dict(sweep="speedup", model=[4, 32, 2], n=4), dict(
        n=4, n_layer=4, n_embd=32, verify_over_step=1.3, speedup=1.2, speedup_se=0.1, tokens_per_forward=1.8,
        per_prompt=[dict(tokens_per_forward=1.5, speedup=1.1), dict(tokens_per_forward=2.1, speedup=1.5)]))}
    return {name: {"experiment": f"mtp_{name}", "module": "bench.mtp_experiments", "runs": runs} for name, runs in (
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
    assert sorted(labels) == ["chance (0.100)", "n = 1 (2 seeds)", "n = 2 (1 seed)",
                              "no induction: guess among seen (0.125)"]
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
