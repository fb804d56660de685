"""Build the exercise notebooks from their sources, one source per notebook (src/<name>.py), so the students'
and the teachers' notebooks cannot drift apart.

    python tutorials/exercises/build.py              # students: tutorials/exercises/<name>.ipynb (not executed)
                                                     # teachers: tutorials/exercises/solutions/<name>.ipynb (executed)
    python tutorials/exercises/build.py --check      # exit 1 if a committed notebook is not its source's build
    python tutorials/exercises/build.py --no-execute # write the solutions without running them
    python tutorials/exercises/build.py --handout DIR
                                                     # the students' handout: the exercise notebooks and the modules
                                                     # they import (no solutions, no answers); DIR must lie inside a
                                                     # clone of the repository (the checks import its paper files)

Source format (a "percent" script, readable and diffable as plain Python):
    # %% [markdown]         a markdown cell: the following comment lines, with their leading "# " removed
    # %%                    a code cell
    # %% setup              the standard first code cell (finds the repository; imports reference as ref, checks)
    # %% [answer]           the model answer to the question in the markdown cell before it: in the teachers'
                            notebook a markdown cell "**Answer.** ...", in the students' an empty answer cell
    inside a code cell:     # BEGIN SOLUTION
                            ... the teacher's code ...
                            # END SOLUTION
                            # STUB raise NotImplementedError("exercise 1.2: a hint")
The students' build drops the solution lines and turns the STUB line into code at the same indentation; the
solutions' build drops the STUB line and the markers. Everything else is the same in both.
Hints come in two tiers: the STUB's NotImplementedError message is the short one (it must not give the answer
away), and a markdown cell `<details><summary>Hint 2 ...</summary> ... </details>` before the function holds the
fuller one, which the student opens on purpose.
"""
import argparse
import glob
import os
import sys

import nbformat

HERE = os.path.dirname(os.path.abspath(__file__))
SRC, SOLUTIONS = os.path.join(HERE, "src"), os.path.join(HERE, "solutions")

SETUP = """\
# setup: make the exercise kit (reference.py, checks.py) importable: this notebook's folder, or tutorials/exercises/
# when Jupyter was started higher up in the repository
import os, sys
kit = os.path.abspath('')
while not os.path.exists(os.path.join(kit, 'reference.py')):
    if os.path.exists(os.path.join(kit, 'tutorials', 'exercises', 'reference.py')):
        kit = os.path.join(kit, 'tutorials', 'exercises')
    elif os.path.dirname(kit) == kit:
        raise RuntimeError('open this notebook from its own folder (tutorials/exercises/, or the handout folder)')
    else:
        kit = os.path.dirname(kit)
sys.path.insert(0, kit)
import torch
import reference as ref  # the repository's functions, through one adapter module (it finds the repository)
import checks            # one check per exercise: prints PASS, or FAIL and what differs"""

STUDENT_ANSWER = "**Your answer:** *(double-click to write here)*"
HANDOUT_FILES = ("reference.py", "checks.py", "compare.py", "grade.py")  # what the notebooks (and grading) import
HANDOUT_README = """\
# Exercises: four language-modelling papers on one tiny GPT

Five notebooks, 14 functions to write. Each exercise states the equation, gives you a function that raises
`NotImplementedError` (its message is a first hint; a second, fuller hint is folded under "Hint 2"), and follows it
with a check cell that prints `PASS`, or `FAIL` and what differs. Each notebook ends with questions: write your
answers in the cells under them.

This folder must sit **inside a clone of the repository** (anywhere in it): the checks compare your functions with
the repository's paper files (gpt.py, brierlm.py, mtp.py, calm.py, dispersion.py), which `reference.py` finds by
looking upwards from this folder. Then:

    pip install -r requirements.txt        # in the clone, once
    jupyter lab 1_core.ipynb               # from this folder

Check everything at once (what your teacher's grading does): `python grade.py *.ipynb`.

| file | what |
| --- | --- |
| `1_core.ipynb` ... `5_dispersion.ipynb` | the exercises |
| `checks.py`, `compare.py` | the checks the notebooks call |
| `reference.py` | the one module that imports the repository |
| `grade.py` | runs notebooks and writes PASS/FAIL per exercise (`--out grades.csv` or `.json`) |
"""


class SourceError(Exception):
    pass


def parse(path):
    """[(kind, lines)] cells of a source file; kind is 'markdown', 'code' or 'setup'."""
    cells, kind, lines = [], None, []
    with open(path, encoding="utf-8") as f:
        text = f.read().splitlines()
    for n, line in enumerate(text, 1):
        if line.startswith("# %%"):
            if kind is not None:
                cells.append((kind, lines))
            tag = line[4:].strip()
            kind = {"[markdown]": "markdown", "[answer]": "answer", "": "code", "setup": "setup"}.get(tag)
            if kind is None:
                raise SourceError(f"{path}:{n}: unknown cell marker {line!r}")
            lines = []
        elif kind in ("markdown", "answer"):
            if line and line != "#" and not line.startswith("# "):
                raise SourceError(f"{path}:{n}: markdown lines must start with '# ': {line!r}")
            lines.append(line[2:])
        elif kind is not None:
            lines.append(line)
        elif line.strip() and not line.startswith("#"):
            raise SourceError(f"{path}:{n}: code before the first cell marker")
    if kind is not None:
        cells.append((kind, lines))
    return [(k, trim(v)) for k, v in cells]


def trim(lines):
    while lines and not lines[-1].strip():
        lines = lines[:-1]
    while lines and not lines[0].strip():
        lines = lines[1:]
    return lines


def split_solution(lines, where):
    """(students' lines, teachers' lines) of one code cell; checks the markers pair up."""
    student, teacher, inside, pending = [], [], False, False
    for line in lines:
        s = line.strip()
        if s == "# BEGIN SOLUTION":
            if inside or pending:
                raise SourceError(f"{where}: BEGIN SOLUTION without the END/STUB of the previous one")
            inside = True
        elif s == "# END SOLUTION":
            if not inside:
                raise SourceError(f"{where}: END SOLUTION without BEGIN")
            inside, pending = False, True
        elif s.startswith("# STUB "):
            if not pending:
                raise SourceError(f"{where}: a STUB line must follow END SOLUTION")
            student.append(line[:len(line) - len(line.lstrip())] + s[len("# STUB "):])
            pending = False
        elif inside:
            teacher.append(line)
        else:
            if pending:
                raise SourceError(f"{where}: END SOLUTION must be followed by its STUB line")
            student.append(line)
            teacher.append(line)
    if inside or pending:
        raise SourceError(f"{where}: unterminated solution block")
    return student, teacher


def build(path, solutions):
    """The notebook (nbformat node) that the source at path gives, for students or with solutions."""
    name = os.path.splitext(os.path.basename(path))[0]
    banner = f"*Generated by `tutorials/exercises/build.py` from `src/{name}.py`: edit the source, not this notebook.*"
    if solutions:
        banner = "**Teacher's copy, with the solutions and the answers.** " + banner
    else:
        banner = ("*Write your code in the functions that raise `NotImplementedError`, run every cell, and answer the "
                  f"questions at the end.* (Maintainers: this notebook is generated from `src/{name}.py`.)")
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                   "language_info": {"name": "python"}}
    cells = [nbformat.v4.new_markdown_cell(banner)]
    for i, (kind, lines) in enumerate(parse(path)):
        if kind == "markdown":
            cells.append(nbformat.v4.new_markdown_cell("\n".join(lines)))
        elif kind == "answer":
            text = "**Answer.** " + "\n".join(lines) if solutions else STUDENT_ANSWER
            cells.append(nbformat.v4.new_markdown_cell(text))
        elif kind == "setup":
            cells.append(nbformat.v4.new_code_cell(SETUP))
        else:
            student, teacher = split_solution(lines, f"{path}, cell {i + 1}")
            cells.append(nbformat.v4.new_code_cell("\n".join(teacher if solutions else student)))
    for i, cell in enumerate(cells):
        cell["id"] = f"{name}-{i:02d}"
    nb.cells = cells
    return nb


def sources():
    return sorted(glob.glob(os.path.join(SRC, "*.py")))


def targets(path):
    name = os.path.splitext(os.path.basename(path))[0] + ".ipynb"
    return os.path.join(HERE, name), os.path.join(SOLUTIONS, name)


def execute(nb, cwd):
    from nbclient import NotebookClient
    NotebookClient(nb, timeout=300, kernel_name="python3", record_timing=False,
                   resources={"metadata": {"path": cwd}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    fails = [line for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
             for line in o.get("text", "").splitlines() if line.startswith("FAIL")]
    return errors, fails


def cell_sources(nb):
    return [(c.cell_type, c.source) for c in nb.cells]


def drift():
    """Every way the committed notebooks differ from what the sources build: [message]."""
    problems = []
    for path in sources():
        student_path, teacher_path = targets(path)
        if not os.path.exists(student_path):
            problems.append(f"{os.path.relpath(student_path, HERE)} is missing")
        elif open(student_path, encoding="utf-8").read() != nbformat.writes(build(path, False)) + "\n":
            problems.append(f"{os.path.relpath(student_path, HERE)} differs from the build of its source")
        if not os.path.exists(teacher_path):
            problems.append(f"{os.path.relpath(teacher_path, HERE)} is missing")
        elif cell_sources(nbformat.read(teacher_path, as_version=4)) != cell_sources(build(path, True)):
            problems.append(f"{os.path.relpath(teacher_path, HERE)} differs from the build of its source")
    built = {os.path.basename(t) for p in sources() for t in targets(p)[:1]}
    for nb_path in glob.glob(os.path.join(HERE, "*.ipynb")) + glob.glob(os.path.join(SOLUTIONS, "*.ipynb")):
        if os.path.basename(nb_path) not in built:
            problems.append(f"{os.path.relpath(nb_path, HERE)} has no source in src/")
    return problems


def inside_a_clone(folder):
    """Whether reference.py, copied into folder, will find the repository above it (the folder holding gpt.py)."""
    folder = os.path.abspath(folder)
    while not os.path.exists(os.path.join(folder, "gpt.py")):
        if os.path.dirname(folder) == folder:
            return False
        folder = os.path.dirname(folder)
    return True


def handout(folder):
    """Write the students' handout into folder: the exercise notebooks (the students' build: no solutions, no
    answers), the modules they import, and a README; [path] of the files written."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise SourceError(f"--handout {folder}: exists and is not a folder")
    if os.path.abspath(folder) in (os.path.abspath(HERE), os.path.abspath(SOLUTIONS), os.path.abspath(SRC)):
        raise SourceError(f"--handout {folder}: choose a folder of its own, not the exercises' folders")
    os.makedirs(folder, exist_ok=True)
    written = []
    for path in sources():
        target = os.path.join(folder, os.path.basename(targets(path)[0]))
        nbformat.write(build(path, False), target)
        written.append(target)
    for name in HANDOUT_FILES:
        with open(os.path.join(HERE, name), encoding="utf-8") as f:
            text = f.read()
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            f.write(text)
        written.append(os.path.join(folder, name))
    with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as f:
        f.write(HANDOUT_README)
    return written + [os.path.join(folder, "README.md")]


def main(argv=None):
    p = argparse.ArgumentParser(description="build the exercise notebooks from src/*.py")
    p.add_argument("--check", action="store_true", help="only report committed notebooks that differ from the build")
    p.add_argument("--no-execute", action="store_true", help="do not run the solutions' notebooks")
    p.add_argument("--handout", metavar="DIR", help="write the students' handout (notebooks without solutions or "
                   "answers, and the modules they import) into DIR, which must lie inside a clone of the repository")
    a = p.parse_args(argv)
    try:
        if a.handout:
            written = handout(a.handout)
            print(f"wrote {len(written)} files into {a.handout}: the exercise notebooks without solutions or answers, "
                  f"{', '.join(HANDOUT_FILES)} and README.md")
            if not inside_a_clone(a.handout):
                print(f"note: {a.handout} is not inside a clone of the repository (no gpt.py above it): the notebooks "
                      "need one, so copy the folder into a clone before handing it out")
            return 0
        if a.check:
            problems = drift()
            for line in problems:
                print(f"drift: {line}")
            print("the exercise notebooks match their sources" if not problems else
                  "run: python tutorials/exercises/build.py")
            return 1 if problems else 0
        os.makedirs(SOLUTIONS, exist_ok=True)
        failed = False
        for path in sources():
            student_path, teacher_path = targets(path)
            nbformat.write(build(path, False), student_path)
            teacher = build(path, True)
            if not a.no_execute:
                errors, fails = execute(teacher, SOLUTIONS)
                for line in fails + [f"error in a cell: {e.ename}: {e.evalue}" for e in errors]:
                    print(f"{os.path.basename(teacher_path)}: {line}")
                failed = failed or bool(errors or fails)
            nbformat.write(teacher, teacher_path)
            print(f"wrote {os.path.relpath(student_path)} and {os.path.relpath(teacher_path)}")
        return 1 if failed else 0
    except SourceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
