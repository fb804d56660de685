"""Grade students' exercise notebooks: PASS or FAIL per exercise, as CSV or JSON.

    python tutorials/exercises/grade.py NOTEBOOK... [--out grades.csv|grades.json] [--timeout SECONDS]

Each notebook runs in a fresh Python process, in this folder (so its setup cell imports this folder's checks.py
and reference.py, whatever the student's folder holds). Its cells run in order, with their output discarded; a
cell that raises is skipped and the rest still run. The notebook's own check cells are not used: once its cells
have run, this script calls the check of every exercise of that notebook on the function the notebook defined
(a function that is missing, still the stub, or wrong is a FAIL with the check's message). Which exercise notebook
a file is comes from its content (cell ids, check calls), not its name, so a student may rename it.

It prints one line per exercise and a count, and with --out writes one row per exercise (notebook, exercise,
function, result, detail) as CSV or JSON (by the file's extension). Exit status 0 once everything is graded,
whatever passed; bad input (a file that is not a notebook, a notebook that is not one of the exercise notebooks,
an --out that is neither .csv nor .json) is one line `error: ...` on stderr and exit status 2, before anything
runs.
"""
import argparse
import ast
import csv
import io
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))

# the exercises of each notebook: (id, the function the student writes = the check in checks.py that tests it)
NOTEBOOKS = {
    "1_core": [("1.1", "rope_tables"), ("1.2", "apply_rope"), ("1.3", "cached_attention"),
               ("1.4", "generate_cached")],
    "2_brierlm": [("2.1", "two_sample_brier"), ("2.2", "exact_brier1"), ("2.3", "brierlm")],
    "3_mtp": [("3.1", "head_by_head_backward"), ("3.2", "verify_greedy")],
    "4_calm": [("4.1", "energy_loss"), ("4.2", "clipped_kl"), ("4.3", "autoencoder_loss")],
    "5_dispersion": [("5.1", "dispersion"), ("5.2", "dispersion_loss")],
}
FIELDS = ("notebook", "exercise", "function", "result", "detail")


class BadInput(Exception):
    pass


def read_notebook(path):
    import nbformat
    if not os.path.isfile(path):
        raise BadInput(f"{path}: no such file")
    try:
        return nbformat.read(path, as_version=4)
    except Exception as e:  # noqa: BLE001 -- whatever nbformat or json says, it is one line for the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadInput(f"{path}: not a Jupyter notebook ({first})") from None


def code_of(nb):
    return [c.source for c in nb.cells if c.cell_type == "code"]


def calls_checks(source):
    """The names of checks.<name>(...) calls in a cell (empty if it does not parse)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return set()
    return {n.func.attr for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
            and isinstance(n.func.value, ast.Name) and n.func.value.id == "checks"}


def which_exercises(path, nb):
    """The exercise notebook that nb is (its name in NOTEBOOKS): by the ids build.py gave its cells, else by the
    checks its cells call."""
    ids = {str(c.get("id", "")).rsplit("-", 1)[0] for c in nb.cells}
    called = set().union(*map(calls_checks, code_of(nb)))
    for name, exercises in NOTEBOOKS.items():
        if name in ids or called & {fn for _, fn in exercises}:
            return name
    raise BadInput(f"{path} is not one of the exercise notebooks ({', '.join(n + '.ipynb' for n in NOTEBOOKS)}): "
                   "none of its cells has their ids or calls their checks")


def only_check_calls(source):
    """True for a cell that does nothing but call checks.<name>(...) (the notebook's check cells, and summary)."""
    try:
        body = ast.parse(source).body
    except SyntaxError:
        return False
    def is_check_call(s):
        return (isinstance(s, ast.Expr) and isinstance(s.value, ast.Call) and isinstance(s.value.func, ast.Attribute)
                and isinstance(s.value.func.value, ast.Name) and s.value.func.value.id == "checks")
    return bool(body) and all(map(is_check_call, body))


def as_python(source):
    """A cell's source as Python: IPython magics (%time, !pip) become calls when IPython is there to translate them."""
    try:
        from IPython.core.inputtransformer2 import TransformerManager
    except ImportError:
        return source
    return TransformerManager().transform_cell(source)


def worker(notebook, name, out_path):
    """Run in a fresh process (cwd = HERE): execute the notebook's cells, then every check of its exercises.
    Writes {exercise: [passed, message]} to out_path after each check, so a timeout keeps what finished."""
    import contextlib
    import nbformat
    sys.path.insert(0, HERE)
    nb = nbformat.read(notebook, as_version=4)
    namespace = {"__name__": "__main__"}
    sink = io.StringIO()
    for i, source in enumerate(code_of(nb)):
        if only_check_calls(source):
            continue
        try:
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                exec(compile(as_python(source), f"{os.path.basename(notebook)} cell {i}", "exec"), namespace)
        except BaseException:  # noqa: BLE001 -- a student's cell that fails is skipped, as in Jupyter
            pass
    import checks
    import compare
    results = {}
    for exercise, function in NOTEBOOKS[name]:
        fn = namespace.get(function)
        if not callable(fn):
            results[exercise] = [False, f"FAIL {exercise} {function}: the notebook defines no function {function}"]
        else:
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                passed = bool(getattr(checks, function)(fn))
            results[exercise] = [passed, compare.RESULTS[exercise][1]]
        with open(out_path, "w", encoding="utf-8") as f:
            json.dump(results, f)


def grade(notebook, name, timeout):
    """[(exercise, function, passed, detail)] for one notebook, run in its own process."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "results.json")
        note = None
        try:
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", name, out,
                                   os.path.abspath(notebook)], cwd=HERE, capture_output=True, text=True,
                                  timeout=timeout)
            if proc.returncode != 0:
                lines = proc.stderr.strip().splitlines()
                note = f"the notebook's run crashed ({lines[-1] if lines else f'exit status {proc.returncode}'})"
        except subprocess.TimeoutExpired:
            note = f"the notebook did not finish in {timeout:g} s"
        results = {}
        if os.path.exists(out):
            with open(out, encoding="utf-8") as f:
                results = json.load(f)
    rows = []
    for exercise, function in NOTEBOOKS[name]:
        passed, message = results.get(exercise, [False, f"FAIL {exercise} {function}: not checked: {note}"])
        detail = message.split(": ", 1)[1] if ": " in message else message
        rows.append((exercise, function, passed, detail))
    return rows


def write(rows, path):
    records = [dict(zip(FIELDS, row)) for row in rows]
    with open(path, "w", encoding="utf-8", newline="") as f:
        if path.endswith(".json"):
            json.dump(records, f, indent=1)
            f.write("\n")
        else:
            w = csv.DictWriter(f, fieldnames=FIELDS)
            w.writeheader()
            w.writerows(records)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        name, out, notebook = argv[1:4]
        worker(notebook, name, out)
        return 0
    p = argparse.ArgumentParser(description="grade exercise notebooks: PASS/FAIL per exercise")
    p.add_argument("notebooks", nargs="+", metavar="NOTEBOOK")
    p.add_argument("--out", help="write the grades to this file: .csv or .json")
    p.add_argument("--timeout", type=float, default=600, help="seconds each notebook may run (default 600)")
    a = p.parse_args(argv)
    try:
        if a.out and not a.out.endswith((".csv", ".json")):
            raise BadInput(f"--out {a.out}: the file must end in .csv or .json")
        if a.timeout <= 0:
            raise BadInput(f"--timeout must be positive, got {a.timeout:g}")
        which = [(path, which_exercises(path, read_notebook(path))) for path in a.notebooks]
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = []
    for path, name in which:
        for exercise, function, passed, detail in grade(path, name, a.timeout):
            rows.append((path, exercise, function, "PASS" if passed else "FAIL", detail))
            print(f"{rows[-1][3]} {exercise} {function} ({path})" + ("" if passed else f": {detail}"))
    print(f"{sum(r[3] == 'PASS' for r in rows)} of {len(rows)} exercises pass")
    if a.out:
        write(rows, a.out)
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
