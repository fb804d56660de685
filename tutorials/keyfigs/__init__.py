"""Key figures of the tutorials, drawn from committed results, by the notebook and by tutorials/figures.py alike.

The convention (one file per notebook):

  tutorials/keyfigs/<notebook>.py      for tutorials/<notebook>.ipynb, e.g. keyfigs/brierlm.py
      RESULTS = ["results/<name>_gpu.json", "results/<name>_cpu.json"]
                                        paths from the repository root; figures.py draws from the first that exists
      FIGURES = {"<figure name>": function, ...}
                                        each function(results: dict) -> matplotlib Figure; its docstring's first
                                        paragraph is the caption (what the figure shows); no plt.show(), no I/O
  the notebook                          computes `results` (or reads the committed JSON at cpu/gpu scale), writes
                                        results/<name>_<scale>.json at cpu/gpu scale, and shows each key figure with
                                        `figs.<function>(results)`: the same code draws the notebook and the slides
  python tutorials/figures.py          writes every FIGURES entry of every module as PNG and SVG into one folder;
                                        a notebook with no module, or a module whose results file is absent, is
                                        skipped with one line; a function that raises is reported and the rest go on

Nothing here imports torch or the repository: a figure module needs only matplotlib, numpy and its JSON.
"""
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def results_path(module, root=ROOT):
    """The first of module.RESULTS (paths from the repository root) that exists, as an absolute path; or None."""
    candidates = [module.RESULTS] if isinstance(module.RESULTS, str) else list(module.RESULTS)
    for path in candidates:
        full = os.path.join(root, path)
        if os.path.exists(full):
            return full
    return None


def load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def caption(fn):
    """The first paragraph of a figure function's docstring, on one line."""
    return " ".join((fn.__doc__ or "").strip().split("\n\n")[0].split())
