"""The exercise notebooks of tutorials/exercises/: with the solutions every check passes; with the stubs every check
fails with its own message (never a traceback); the committed notebooks are exactly what build.py makes of the
sources; and the checks catch typical wrong answers, saying what differs. The notebooks' cells are executed in
this process (seconds); one student notebook also runs in a real Jupyter kernel."""
import ast
import contextlib
import io
import os
import re
import sys
from pathlib import Path

import nbformat
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
EX = ROOT / "tutorials" / "exercises"
sys.path.insert(0, str(EX))
import build  # noqa: E402
import checks  # noqa: E402
import compare  # noqa: E402
import reference as ref  # noqa: E402

SOURCES = sorted((EX / "src").glob("*.py"))
NAMES = [p.stem for p in SOURCES]


def exercises_in(source):
    """Exercise ids ('1.2', ...) of a source: one per STUB line, read from its hint."""
    return re.findall(r"# STUB raise NotImplementedError\(\"exercise (\d+\.\d+):", source.read_text())


def run_cells(path):
    """Execute a notebook's code cells in one namespace, in its own folder; (stdout, RESULTS)."""
    compare.RESULTS.clear()
    nb = nbformat.read(path, as_version=4)
    out, cwd = io.StringIO(), os.getcwd()
    os.chdir(path.parent)
    try:
        with contextlib.redirect_stdout(out):
            namespace = {}
            for i, cell in enumerate(nb.cells):
                if cell.cell_type == "code":
                    exec(compile(cell.source, f"{path.name} cell {i}", "exec"), namespace)
    finally:
        os.chdir(cwd)
    return out.getvalue(), dict(compare.RESULTS)


def test_every_source_has_exercises_with_distinct_ids():
    ids = [i for s in SOURCES for i in exercises_in(s)]
    assert len(SOURCES) == 5 and len(ids) == 14 and len(set(ids)) == len(ids)


@pytest.mark.parametrize("name", NAMES)
def test_solutions_pass_every_check(name):
    out, results = run_cells(EX / "solutions" / f"{name}.ipynb")
    expected = exercises_in(EX / "src" / f"{name}.py")
    assert sorted(results) == sorted(expected), out
    assert all(passed for passed, _ in results.values()), out
    assert f"{len(expected)} of {len(expected)} exercises pass" in out


@pytest.mark.parametrize("name", NAMES)
def test_stubs_fail_every_check_with_its_own_message(name):
    source = (EX / "src" / f"{name}.py").read_text()
    out, results = run_cells(EX / f"{name}.ipynb")  # raises if any cell crashes
    expected = exercises_in(EX / "src" / f"{name}.py")
    assert sorted(results) == sorted(expected), out
    for ex, (passed, message) in results.items():
        assert not passed
        assert message.startswith(f"FAIL {ex} ") and "not written yet" in message, message
        hint = re.search(rf"NotImplementedError\(\"(exercise {re.escape(ex)}:[^\"]*)\"\)", source).group(1)
        assert hint in message and "Traceback" not in out
    assert f"0 of {len(expected)} exercises pass" in out


def test_committed_notebooks_are_the_build_of_their_sources():
    assert build.drift() == []


def test_drift_is_detected(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    (src / "9_demo.py").write_text(SOURCES[0].read_text())
    monkeypatch.setattr(build, "HERE", str(tmp_path))
    monkeypatch.setattr(build, "SRC", str(src))
    monkeypatch.setattr(build, "SOLUTIONS", str(tmp_path / "solutions"))
    assert build.main(["--no-execute"]) == 0
    assert build.drift() == []
    (src / "9_demo.py").write_text(SOURCES[0].read_text().replace("## 1.1 The rotation angles", "## 1.1 Angles"))
    assert sorted(build.drift()) == ["9_demo.ipynb differs from the build of its source",
                                     "solutions/9_demo.ipynb differs from the build of its source"]
    assert build.main(["--check"]) == 1


def test_committed_solutions_were_executed_and_pass():
    for name in NAMES:
        nb = nbformat.read(EX / "solutions" / f"{name}.ipynb", as_version=4)
        text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
        assert not [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
        assert "FAIL" not in text
        for ex in exercises_in(EX / "src" / f"{name}.py"):
            assert f"PASS {ex} " in text, (name, ex)
    for name in NAMES:  # the students' notebooks are committed without outputs (nothing to spoil)
        nb = nbformat.read(EX / f"{name}.ipynb", as_version=4)
        assert all(not c.outputs for c in nb.cells if c.cell_type == "code")
        assert "# BEGIN SOLUTION" not in nbformat.writes(nb) and "# STUB" not in nbformat.writes(nb)


@pytest.mark.parametrize("bad, message", [
    ("# %%\nx = 1\n# BEGIN SOLUTION\ny = 2\n", "unterminated solution block"),
    ("# %%\n# BEGIN SOLUTION\ny = 2\n# END SOLUTION\nz = 3\n", "END SOLUTION must be followed by its STUB line"),
    ("# %% [markdown]\nnot a comment\n", "markdown lines must start with '# '"),
    ("# %% [code]\n", "unknown cell marker"),
])
def test_bad_sources_are_one_line_errors(tmp_path, monkeypatch, capsys, bad, message):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "bad.py").write_text(bad)
    monkeypatch.setattr(build, "HERE", str(tmp_path))
    monkeypatch.setattr(build, "SRC", str(tmp_path / "src"))
    monkeypatch.setattr(build, "SOLUTIONS", str(tmp_path / "solutions"))
    assert build.main(["--no-execute"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_checks_reach_the_repository_only_through_reference():
    """The one-adapter rule: nothing in tutorials/exercises but reference.py imports a repository module."""
    repo_modules = {p.stem for p in ROOT.glob("*.py")} | {"bench"}
    files = [p for p in EX.glob("*.py") if p.name != "reference.py"] + SOURCES
    cells = [c.source for p in EX.glob("**/*.ipynb") for c in nbformat.read(p, as_version=4).cells
             if c.cell_type == "code"]
    for text in [f.read_text() for f in files] + cells:
        tree = ast.parse(text)
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not imported & repo_modules, imported & repo_modules


# ----------------------------------------------------------------------------- wrong answers: what differs

def interleaved_rope(x, cos, sin):  # the paper's neighbour pairing: a different layout from gpt.py's halves
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)


def square_mask_attention(q, k, v):  # forgets that the new queries come after the cached keys
    T, Tk = q.size(-2), k.size(-2)
    scores = (q @ k.transpose(-2, -1) / q.size(-1) ** 0.5).masked_fill(
        torch.ones(T, Tk, dtype=torch.bool).tril().logical_not(), float("-inf"))
    return scores.softmax(-1) @ v


def uncached_generate(model, idx, n):  # right tokens, but the whole sequence is fed again at every step
    for _ in range(n):
        idx = torch.cat([idx, ref.logits_with_cache(model, idx, ref.new_cache(model))[:, -1:].argmax(-1)], 1)
    return idx


def energy_without_spread(x, y, alpha=1.0):
    return 2 * ((x[:, None] - y[None]) ** 2).sum(-1).clamp_min(1e-12).pow(alpha / 2).mean((0, 1))


def energy_sqrt_of_zero(x, y, alpha=1.0):  # subtracts the diagonal instead of leaving it out: NaN gradients at 0
    d = lambda a, b: ((a[:, None] - b[None]) ** 2).sum(-1).sqrt() ** alpha  # noqa: E731
    N = x.size(0)
    return 2 * d(x, y).mean((0, 1)) - d(x, x).sum((0, 1)) / (N * (N - 1))


def naive_mtp(model, x, y):  # all heads' logits alive, one backward
    z = ref.trunk_hidden(model, x)
    loss = sum(ref.head_loss(ref.head_logits(model, i, z), y, i) for i in range(ref.n_heads(model)))
    loss.backward()
    return loss.item()


def trunk_per_head(model, x, y):  # one head at a time, but through the whole trunk every time
    z, total = ref.trunk_hidden(model, x), 0.0
    for i in range(ref.n_heads(model)):
        loss = ref.head_loss(ref.head_logits(model, i, z), y, i)
        loss.backward(retain_graph=True)
        total += loss.item()
    return total


def quadratic_dispersion(h):
    u = h / h.norm(dim=-1, keepdim=True)
    N = h.size(-2)
    return 1 - ((u @ u.transpose(-1, -2)).sum((-1, -2)) - N) / (N * (N - 1))


def drifted_reference(*args):
    raise TypeError("apply_rope() missing 1 required positional argument: 'positions'")


WRONG = [
    ("rope_tables", lambda d, T, base=1e4: (torch.ones(T, d), torch.zeros(T, d)), "shape (16, 8), expected (16, 4)"),
    ("apply_rope", interleaved_rope, "value differs"),
    ("apply_rope", lambda x, c, s: torch.cat([x[..., :x.size(-1) // 2] * c - x[..., x.size(-1) // 2:] * s,
                                              x[..., :x.size(-1) // 2] * s + x[..., x.size(-1) // 2:] * c], -1),
     "[case: bfloat16: keep x's dtype] vs gpt.apply_rope: dtype torch.float32, expected torch.bfloat16"),
    ("apply_rope", lambda x, c, s: torch.from_numpy(checks.rope_definition(x.detach(), c, s).numpy()).to(x.dtype),
     "not differentiable"),
    ("cached_attention", square_mask_attention, "[case: one new query after 8 cached keys]"),
    ("generate_cached", uncached_generate, "your loop fed 95 positions"),
    ("generate_cached", lambda m, idx, n: idx, "shape (1, 5), expected (1, 15)"),
    ("two_sample_brier", lambda x1, x2, y, n=4: ((x1 == y).long() + (x2 == y).long() - (x1 == x2).long())[:, :n],
     "dtype torch.int64, expected a floating-point tensor"),
    ("two_sample_brier", lambda x1, x2, y, n=4: ((x1 == y).float() + (x2 == y).float() - (x1 == x2).float())[:, :n],
     "value differs"),
    ("exact_brier1", lambda logits, y: 2 * logits.softmax(-1)[torch.arange(len(y)), y], "value differs"),
    ("brierlm", lambda b: 100 * max(float(torch.tensor(b).prod()), 0) ** (1 / len(b)),
     "[case: two negative Brier-n (the product is positive: clamp each one)]"),
    ("head_by_head_backward", naive_mtp, "memory: autograd still held the logits of 3 earlier heads"),
    ("head_by_head_backward", trunk_per_head, "the trunk's backward ran 4 times"),
    ("verify_greedy", lambda d, g: [t for t, c in zip(d, g) if t == c], "returned [5, 6, 7], expected [5, 6, 7, 8]"),
    ("verify_greedy", lambda d, g: [t for t, c in zip(d, g) if t == c] + [g[len(d)]],
     "[case: the second draft rejected: drafts [5, 6, 7], head 1's tokens [5, 9, 7, 8]] returned [5, 7, 8], expected [5, 9]"),
    ("energy_loss", energy_without_spread, "value differs"),
    ("energy_loss", energy_sqrt_of_zero, "gradient with respect to x: nan"),
    ("clipped_kl", lambda mu, ls, c=0.5: (0.5 * (mu ** 2 + (2 * ls).exp() - 1 - 2 * ls)).sum(-1).clamp(min=c).mean(),
     "value differs"),
    ("autoencoder_loss", lambda lg, ch, mu, ls, w, c: torch.nn.functional.cross_entropy(
        lg.flatten(0, -2), ch.flatten()), "loss vs calm.ae_loss: value differs"),
    ("dispersion", quadratic_dispersion, "your function built a tensor of 1,048,576 entries"),
    ("dispersion", lambda h: 1 - torch.nn.functional.cosine_similarity(h[..., :1, :], h, dim=-1).mean(-1),
     "value differs"),
    ("dispersion_loss", lambda lg, y, h, w: torch.nn.functional.cross_entropy(lg.flatten(0, 1), y.flatten(),
                                                                             ignore_index=-1)
     - w * checks.dispersion_definition(h).mean(), "[case: weight 0.1] gradient of wte.weight"),
]


@pytest.mark.parametrize("check, wrong, says", WRONG, ids=[f"{c}-{i}" for i, (c, _, _) in enumerate(WRONG)])
def test_a_wrong_answer_fails_and_says_what_differs(check, wrong, says, capsys):
    assert getattr(checks, check)(wrong) is False
    line = capsys.readouterr().out.strip()
    assert line.startswith("FAIL ") and says in line, line


def test_a_student_exception_is_reported_with_its_line(capsys):
    def apply_rope(x, cos, sin):
        return x @ cos  # wrong shapes: raises inside torch
    assert checks.apply_rope(apply_rope) is False
    line = capsys.readouterr().out.strip()
    assert "your code raised RuntimeError in apply_rope" in line and "`return x @ cos" in line


def test_a_moved_repository_function_is_blamed_on_the_check_not_the_student(monkeypatch, capsys):
    monkeypatch.setattr(ref, "apply_rope", drifted_reference)
    assert checks.apply_rope(checks.rope_definition) is False
    line = capsys.readouterr().out.strip()
    assert "the check itself crashed (TypeError" in line and "bug in checks.py or reference.py" in line


def test_a_student_notebook_runs_in_a_jupyter_kernel(monkeypatch):
    from nbclient import NotebookClient
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(EX / "2_brierlm.ipynb", as_version=4)
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(EX)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert not [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert text.count("not written yet") == 3 and "0 of 3 exercises pass" in text
