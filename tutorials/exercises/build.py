"""Build the exercise notebooks from their sources, one source per notebook (src/<name>.py), so the students'
and the teachers' notebooks cannot drift apart.

    python tutorials/exercises/build.py              # students: tutorials/exercises/<name>.ipynb (not executed)
                                                     # teachers: tutorials/exercises/solutions/<name>.ipynb (executed)
    python tutorials/exercises/build.py --check      # exit 1 if a committed notebook is not its source's build
    python tutorials/exercises/build.py --no-execute # write the solutions without running them

Source format (a "percent" script, readable and diffable as plain Python):
    # %% [markdown]         a markdown cell: the following comment lines, with their leading "# " removed
    # %%                    a code cell
    # %% setup              the standard first code cell (finds the repository; imports reference as ref, checks)
    inside a code cell:     # BEGIN SOLUTION
                            ... the teacher's code ...
                            # END SOLUTION
                            # STUB raise NotImplementedError("exercise 1.2: a hint")
The students' build drops the solution lines and turns the STUB line into code at the same indentation; the
solutions' build drops the STUB line and the markers. Everything else is the same in both.
"""
import argparse
import glob
import os
import sys

import nbformat

HERE = os.path.dirname(os.path.abspath(__file__))
SRC, SOLUTIONS = os.path.join(HERE, "src"), os.path.join(HERE, "solutions")

SETUP = """\
# setup: make the repository and tutorials/exercises importable, wherever Jupyter was started inside the repository
import os, sys
root = os.path.abspath('')
while not os.path.exists(os.path.join(root, 'tutorials', 'exercises', 'reference.py')):
    if os.path.dirname(root) == root:
        raise RuntimeError('open this notebook from inside the repository (tutorials/exercises/)')
    root = os.path.dirname(root)
sys.path[:0] = [root, os.path.join(root, 'tutorials', 'exercises')]
import torch
import reference as ref  # the repository's functions, through one adapter module
import checks            # one check per exercise: prints PASS, or FAIL and what differs"""


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
            kind = {"[markdown]": "markdown", "": "code", "setup": "setup"}.get(tag)
            if kind is None:
                raise SourceError(f"{path}:{n}: unknown cell marker {line!r}")
            lines = []
        elif kind == "markdown":
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
    banner = (f"*Generated by `tutorials/exercises/build.py` from `src/{name}.py`: edit the source, not this notebook.*")
    if solutions:
        banner = "**Teacher's copy, with the solutions.** " + banner
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                   "language_info": {"name": "python"}}
    cells = [nbformat.v4.new_markdown_cell(banner)]
    for i, (kind, lines) in enumerate(parse(path)):
        if kind == "markdown":
            cells.append(nbformat.v4.new_markdown_cell("\n".join(lines)))
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


def main(argv=None):
    p = argparse.ArgumentParser(description="build the exercise notebooks from src/*.py")
    p.add_argument("--check", action="store_true", help="only report committed notebooks that differ from the build")
    p.add_argument("--no-execute", action="store_true", help="do not run the solutions' notebooks")
    a = p.parse_args(argv)
    try:
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
