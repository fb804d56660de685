"""Every key figure of the tutorials as PNG and SVG in one folder, drawn from committed results in seconds (no
training, no notebook run), for slides.

    python tutorials/figures.py                      # -> out/figures/<notebook>-<figure>.png / .svg + index.md
    python tutorials/figures.py --out DIR --only brierlm overview

For every notebook tutorials/<name>.ipynb, the module tutorials/keyfigs/<name>.py draws its key figures from the
first of its RESULTS files that exists, or from one such file per part when RESULTS is a dict of parts (the
convention is in tutorials/keyfigs/__init__.py). A notebook without a module, or whose results are not committed
yet, is skipped with one line saying so; so is a figure whose part is missing (a module with NEEDS). A figure function that raises is reported on one line and the other
figures are still written; the exit code is then 1.
"""
import argparse
import glob
import importlib.util
import os
import sys
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

TUTORIALS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TUTORIALS)
if TUTORIALS not in sys.path:
    sys.path.insert(0, TUTORIALS)
import keyfigs  # noqa: E402


def names():
    """Notebooks of tutorials/ and figure modules of tutorials/keyfigs/, by name."""
    notebooks = {os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(TUTORIALS, "*.ipynb"))}
    modules = {os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(TUTORIALS, "keyfigs", "*.py"))}
    return sorted(notebooks | (modules - {"__init__"}))


def load_module(name):
    """tutorials/keyfigs/<name>.py, imported from its file."""
    spec = importlib.util.spec_from_file_location(f"keyfigs.{name}", os.path.join(TUTORIALS, "keyfigs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shown(path):
    """A path as printed: relative to the repository when inside it (a dict of paths: comma-separated)."""
    if isinstance(path, dict):
        return ", ".join(shown(p) for p in path.values())
    rel = os.path.relpath(path, ROOT)
    return path if rel.startswith("..") else rel


def draw(name, out, index):
    """Write the figures of one notebook; returns the number of failures. One printed line per figure or skip."""
    if not os.path.exists(os.path.join(TUTORIALS, "keyfigs", f"{name}.py")):
        print(f"skip {name}: no tutorials/keyfigs/{name}.py yet (this notebook does not provide its key figures)")
        return 0
    try:
        module = load_module(name)
        path = keyfigs.results_path(module, ROOT)
        if path is None:
            print(f"skip {name}: none of its results is committed yet ({', '.join(keyfigs.wanted(module, ROOT))}); run "
                  f"the notebook at cpu scale to write one")
            return 0
        results = keyfigs.load(path)
        figures = module.FIGURES
    except Exception as e:  # noqa: BLE001 -- a broken module must not stop the others
        print(f"FAILED {name}: {type(e).__name__}: {e}")
        return 1
    failures = 0
    for fig_name, fn in figures.items():
        stem = f"{name}-{fig_name}"
        absent = keyfigs.missing(module, fig_name, path)
        if absent:
            print(f"skip {stem}: its results are not committed yet ({', '.join(absent)})")
            continue
        try:
            fig = fn(results)
            fig.savefig(os.path.join(out, stem + ".png"), dpi=150)
            fig.savefig(os.path.join(out, stem + ".svg"), metadata={"Date": None})
            plt.close(fig)
        except Exception as e:  # noqa: BLE001
            print(f"FAILED {stem}: {type(e).__name__}: {e} (results: {shown(path)})")
            plt.close("all")
            failures += 1
            continue
        used = keyfigs.used(module, fig_name, path)
        index.append(f"| `{stem}` | `tutorials/{name}.ipynb` | `{shown(used)}` | {keyfigs.caption(fn)} |")
        print(f"wrote {shown(os.path.join(out, stem))}.png/.svg  (from {shown(used)})")
    return failures


def main(argv=None):
    p = argparse.ArgumentParser(description="write every key figure of the tutorials as PNG and SVG")
    p.add_argument("--out", default=os.path.join(ROOT, "out", "figures"), help="folder (default: out/figures)")
    p.add_argument("--only", nargs="+", metavar="NOTEBOOK", help="only these notebooks (e.g. brierlm overview)")
    a = p.parse_args(argv)
    known = names()
    unknown = [n for n in a.only or [] if n not in known]
    if unknown:
        print(f"error: unknown notebook {', '.join(unknown)}; known: {', '.join(known)}", file=sys.stderr)
        return 2
    os.makedirs(a.out, exist_ok=True)
    t, index = time.time(), []
    failures = sum(draw(name, a.out, index) for name in (a.only or known))
    with open(os.path.join(a.out, "index.md"), "w", encoding="utf-8") as f:
        f.write("# Key figures of the tutorials\n\nWritten by `python tutorials/figures.py` (PNG and SVG of each).\n\n"
                "| figure | notebook | data | what it shows |\n| --- | --- | --- | --- |\n" + "\n".join(index) + "\n")
    print(f"{len(index)} figures in {shown(os.path.abspath(a.out))} ({time.time() - t:.1f} s); index.md lists them"
          + (f"; {failures} FAILED" if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
