"""Run tutorial notebooks at one scale and write them back with their outputs.

    python tutorials/run.py [--scale smoke|cpu|gpu] [--executor auto|nbclient|builtin] [--timeout SECONDS]
                            [--out DIR] [--failed_dir out/notebooks] [NOTEBOOK.ipynb ...]

Every notebook of tutorials/ (or the ones named) runs top to bottom with TUTORIAL_SCALE=<scale> (default: gpu when
CUDA is available, else cpu), in its own folder as working directory, and is written back in place (or into --out)
with its outputs, the way a reader sees it. --executor auto uses nbclient (a Jupyter kernel) when nbclient, nbformat
and ipykernel are installed, else the built-in executor, which needs nothing beyond the standard library and
matplotlib: each notebook runs in a fresh Python process, its code cells in one namespace; what a cell prints
becomes a stdout / stderr stream output, the value of its last expression an execute_result, each matplotlib figure
it shows or leaves open a PNG display_data, and an exception an error output that ends the notebook.

A notebook that fails is not written over: its partial copy (outputs up to the failing cell) goes to
<failed_dir>/<name>.failed.ipynb, the error is printed as one line, the other notebooks still run, and the exit
code is 1. Bad input (an unknown notebook or scale, gpu without CUDA) is one line and exit code 2.
"""
import argparse
import ast
import base64
import builtins
import importlib.util
import io
import json
import linecache
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
FAILED = HERE.parent / "out" / "notebooks"
SCALES = ("smoke", "cpu", "gpu")


class UsageError(Exception):
    """Bad input: one line, exit code 2."""


# ----------------------------------------------------------------------------- the built-in executor

def lines(text):
    """A string as notebook JSON stores it: a list of lines, each keeping its newline."""
    return text.splitlines(keepends=True)


class StreamCapture(io.TextIOBase):
    """sys.stdout / sys.stderr during a cell: consecutive writes to one stream become one stream output."""

    def __init__(self, name, outputs):
        self.name, self.outputs = name, outputs

    def writable(self):
        return True

    def write(self, text):
        if text:
            last = self.outputs[-1] if self.outputs else None
            if last and last["output_type"] == "stream" and last["name"] == self.name:
                last["text"] += text
            else:
                self.outputs.append({"output_type": "stream", "name": self.name, "text": text})
        return len(text)


def show_figures(outputs):
    """Every open matplotlib figure as a PNG display_data (what the inline backend shows), then closed."""
    if "matplotlib.pyplot" not in sys.modules:
        return
    plt = sys.modules["matplotlib.pyplot"]
    for num in plt.get_fignums():
        fig = plt.figure(num)
        png = io.BytesIO()
        fig.savefig(png, format="png", bbox_inches="tight")
        outputs.append({"output_type": "display_data", "metadata": {},
                        "data": {"image/png": base64.b64encode(png.getvalue()).decode() + "\n",
                                 "text/plain": [repr(fig)]}})
        plt.close(fig)


def error_output(exc, filename):
    frames = traceback.extract_tb(exc.__traceback__)
    keep = [i for i, f in enumerate(frames) if f.filename == filename]  # start at the cell, not at this runner
    tb = traceback.format_list(frames[keep[0]:]) if keep else []
    return {"output_type": "error", "ename": type(exc).__name__, "evalue": str(exc),
            "traceback": ["Traceback (most recent call last):\n"] + tb +
                         traceback.format_exception_only(type(exc), exc)}


def run_cell(source, namespace, filename, outputs, timeout):
    """Execute one cell's source; returns its error (or None). Prints and figures go to outputs."""
    linecache.cache[filename] = (len(source), None, lines(source), filename)  # tracebacks show the cell's lines
    old = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = StreamCapture("stdout", outputs), StreamCapture("stderr", outputs)
    if timeout:
        signal.alarm(int(timeout))
    try:
        tree = ast.parse(source, filename)
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        exec(compile(tree, filename, "exec"), namespace)
        if last is not None:
            value = eval(compile(ast.Expression(last.value), filename, "eval"), namespace)
            if value is not None and not source.rstrip().endswith(";"):  # a trailing ; hides the value, as in Jupyter
                outputs.append({"output_type": "execute_result", "metadata": {}, "data": {"text/plain": repr(value)}})
        error = None
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 (the notebook's own error, shown in the notebook)
        error = exc
        outputs.append(error_output(exc, filename))
    finally:
        signal.alarm(0)
        sys.stdout, sys.stderr = old
    show_figures(outputs)  # what the cell left open, as the inline backend does
    return error


def on_alarm(signum, frame):
    raise TimeoutError("the cell ran past --timeout")


def execute_builtin(nb, name, timeout, progress):
    """Run the code cells of nb (notebook JSON, changed in place); returns None or a one-line error."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    if importlib.util.find_spec("matplotlib") is not None:
        import matplotlib.pyplot as plt
        plt.show = lambda *args, **kwargs: show_figures(current)  # figures appear where the cell shows them
    signal.signal(signal.SIGALRM, on_alarm)
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    failure = None
    for n, cell in enumerate(code, 1):
        current = []
        cell["metadata"].pop("execution", None)
        if failure is not None:  # after an error nothing else ran: no stale outputs
            cell["outputs"], cell["execution_count"] = [], None
            continue
        t = time.time()
        error = run_cell("".join(cell["source"]), namespace, f"<cell {n}>", current, timeout)
        for out in current:
            if out["output_type"] == "stream":
                out["text"] = lines(out["text"])
            elif out["output_type"] == "execute_result":
                out["execution_count"] = n
                out["data"]["text/plain"] = lines(out["data"]["text/plain"])
        cell["outputs"], cell["execution_count"] = current, n
        if error is not None:
            failure = one_line(name, n, type(error).__name__, str(error))
        progress(f"{name}: cell {n}/{len(code)} {'failed' if error else 'done'} ({time.time() - t:.0f}s)")
    return failure


def one_line(name, n, ename, evalue):
    first = evalue.strip().splitlines()
    return f"{name} cell {n}: {ename}: {first[0] if first else ''}"


def first_error(cells, name):
    """The one-line error of a notebook's first failing code cell (None if none failed)."""
    for n, cell in enumerate((c for c in cells if c["cell_type"] == "code"), 1):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                return one_line(name, n, out.get("ename", "error"), out.get("evalue", ""))
    return None


def child(path, dest, failed, timeout):
    """One notebook in this (fresh) process: python run.py --child PATH DEST FAILED TIMEOUT."""
    nb = json.loads(Path(path).read_text(encoding="utf-8"))
    os.chdir(Path(path).parent)
    sys.path.insert(0, "")  # as in a kernel: the working directory is importable
    failure = execute_builtin(nb, Path(path).name, float(timeout) or None,
                              lambda msg: print(msg, file=sys.__stderr__, flush=True))
    write(nb, failed if failure else dest)
    sys.exit(1 if failure else 0)


def write(nb, dest):
    Path(dest).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(dest) + ".tmp")
    tmp.write_text(json.dumps(nb, sort_keys=True, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, dest)  # never a half-written notebook


# ----------------------------------------------------------------------------- nbclient, and the driver

def execute_nbclient(path, dest, failed, timeout):
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    try:
        client.execute()
    except CellExecutionError as e:
        failed.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, failed)
        return first_error(nb.cells, path.name) or f"{path.name}: {getattr(e, 'ename', 'error')}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, dest)
    return None


def has_nbclient():
    return all(importlib.util.find_spec(m) is not None for m in ("nbclient", "nbformat", "ipykernel"))


def cuda_available():
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def parse(argv):
    class Parser(argparse.ArgumentParser):
        def error(self, message):
            raise UsageError(message)
    p = Parser(prog="python tutorials/run.py", description=__doc__.splitlines()[0])
    p.add_argument("notebooks", nargs="*", help="default: every tutorials/*.ipynb")
    p.add_argument("--scale", choices=SCALES, default=None, help="default: gpu with CUDA, else cpu")
    p.add_argument("--executor", choices=("auto", "nbclient", "builtin"), default="auto")
    p.add_argument("--timeout", type=float, default=None, help="seconds per cell (default: no limit)")
    p.add_argument("--out", default=None, help="write the executed notebooks here instead of in place")
    p.add_argument("--failed_dir", default=str(FAILED), help="where the partial copy of a failing notebook goes")
    a = p.parse_args(argv)
    a.scale = a.scale or ("gpu" if cuda_available() else "cpu")
    a.notebooks = [Path(n).resolve() for n in a.notebooks] or sorted(HERE.glob("*.ipynb"))
    missing = [str(n) for n in a.notebooks if not n.is_file() or n.suffix != ".ipynb"]
    if missing:
        raise UsageError(f"no notebook at {missing[0]}")
    if a.scale == "gpu" and not cuda_available():
        raise UsageError("--scale gpu needs a CUDA GPU and none was found: use --scale cpu or --scale smoke")
    if a.executor == "nbclient" and not has_nbclient():
        raise UsageError("--executor nbclient needs nbclient, nbformat and ipykernel: pip install them, or use "
                         "--executor builtin")
    a.executor = a.executor if a.executor != "auto" else ("nbclient" if has_nbclient() else "builtin")
    return a


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child(*argv[1:5])
    try:
        a = parse(argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    os.environ["TUTORIAL_SCALE"] = a.scale
    failures = []
    print(f"{len(a.notebooks)} notebook(s) at scale {a.scale}, executor {a.executor}", flush=True)
    for path in a.notebooks:
        dest = Path(a.out).resolve() / path.name if a.out else path
        failed = Path(a.failed_dir).resolve() / (path.stem + ".failed.ipynb")
        t = time.time()
        if a.executor == "nbclient":
            failure = execute_nbclient(path, dest, failed, a.timeout)
        else:
            if failed.exists():
                failed.unlink()  # a partial copy left by an earlier run
            r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(path), str(dest),
                                str(failed), str(a.timeout or 0)])  # a fresh process per notebook, like a kernel
            failure = None if r.returncode == 0 else (
                first_error(json.loads(failed.read_text(encoding="utf-8"))["cells"], path.name) if failed.exists()
                else f"{path.name}: the notebook's process ended with exit code {r.returncode}")
        minutes = (time.time() - t) / 60
        if failure:
            failures.append(failure)
            print(f"error: {failure} (partial notebook: {failed})", file=sys.stderr, flush=True)
        else:
            print(f"{path.name}: ok in {minutes:.1f} min -> {dest}", flush=True)
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
