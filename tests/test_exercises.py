"""The exercise notebooks of tutorials/exercises/: with the solutions every check passes; with the stubs every check
fails with its own message (never a traceback); the committed notebooks are exactly what build.py makes of the
sources; the checks pass correct solutions written differently from ours and catch typical wrong answers, saying
what differs, including how the answer was computed (memory, operation counts, forbidden calls, return types); the
hints come in two tiers and the questions' answers reach the teachers only; the students' handout holds no
solution or answer and runs inside a clone; grade.py records PASS/FAIL per exercise and rejects bad input in one
line. The notebooks' cells are executed in this process (seconds); one handout notebook runs in a real Jupyter
kernel and grade.py in subprocesses."""
import ast
import contextlib
import csv
import io
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
EX = ROOT / "tutorials" / "exercises"
sys.path.insert(0, str(EX))
import build  # noqa: E402
import checks  # noqa: E402
import compare  # noqa: E402
import grade  # noqa: E402
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


def pdist_dispersion(h):  # O(N^2): the N(N-1)/2 distances of every set (|u_i - u_j|^2 = 2 - 2 cos)
    u = F.normalize(h, dim=-1)
    N = h.size(-2)
    per_set = torch.stack([torch.pdist(s).pow(2).sum() for s in u.reshape(-1, N, h.size(-1))])
    return (per_set / (N * (N - 1))).reshape(h.shape[:-2])


def row_by_row_dispersion(h):  # O(N^2 d) time in O(N) memory: one row of cosines at a time
    u = h / h.norm(dim=-1, keepdim=True)
    N = h.size(-2)
    total = torch.zeros(h.shape[:-2], dtype=h.dtype)
    for i in range(N):
        total = total + (u @ u[..., i, :, None]).sum((-2, -1))
    return 1 - (total - N) / (N * (N - 1))


def chunked_dispersion(h, rows=8):  # O(N^2 d) time, blocks of 8 x N cosines: small tensors, quadratic work
    u = h / h.norm(dim=-1, keepdim=True)
    N = h.size(-2)
    total = 0
    for start in range(0, N, rows):
        total = total + (u[..., start:start + rows, :] @ u.transpose(-1, -2)).sum((-2, -1))
    return 1 - (total - N) / (N * (N - 1))


def list_of_logits_backward(model, x, y):  # right gradients, one trunk pass, but every head's logits kept: O(n V)
    z = ref.trunk_hidden(model, x)
    z_leaf = z.detach().requires_grad_()
    logits = [ref.head_logits(model, i, z_leaf) for i in range(ref.n_heads(model))]
    total = 0.0
    for i, head in enumerate(logits):
        loss = ref.head_loss(head, y, i)
        loss.backward()
        total += loss.item()
    z.backward(z_leaf.grad)
    return total


def tensor_loss_backward(model, x, y):  # returns the loss as a tensor where the statement asks for a float
    z = ref.trunk_hidden(model, x)
    z_leaf = z.detach().requires_grad_()
    total = 0
    for i in range(ref.n_heads(model)):
        loss = ref.head_loss(ref.head_logits(model, i, z_leaf), y, i)
        loss.backward()
        total = total + loss.detach()
    z.backward(z_leaf.grad)
    return total


def brier_first_four(x1, x2, y, max_n=4):  # ignores max_n: always the first 4 tokens
    agree = lambda a, b: (a[:, :4] == b[:, :4]).int().cumprod(1)  # noqa: E731
    return (agree(x1, y) + agree(x2, y) - agree(x1, x2)).float()


def float64_rope_tables(head_dim, max_len, base=10000.0):
    theta = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(max_len, dtype=torch.float64)[:, None] * theta
    return angles.cos(), angles.sin()


def sdpa_attention(q, k, v):  # right values, through the fused kernel the statement forbids
    T, Tk = q.size(-2), k.size(-2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(T, Tk, dtype=torch.bool).tril(Tk - T))


def energy_clamped_at_1e6(x, y, alpha=1.0):  # the clamp of the statement, but too large
    N = x.size(0)
    d = lambda a, b: ((a[:, None] - b[None]) ** 2).sum(-1).clamp_min(1e-6) ** (alpha / 2)  # noqa: E731
    return 2 * d(x, y).mean((0, 1)) - (d(x, x) * (1 - torch.eye(N))[:, :, None]).sum((0, 1)) / (N * (N - 1))


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
     "dtype torch.int64, expected torch.float32"),
    ("two_sample_brier", lambda x1, x2, y, n=4: ((x1 == y).float() + (x2 == y).float() - (x1 == x2).float())[:, :n],
     "value differs"),
    ("exact_brier1", lambda logits, y: 2 * logits.softmax(-1)[torch.arange(len(y)), y], "value differs"),
    ("brierlm", lambda b: 100 * max(float(torch.tensor(b).prod()), 0) ** (1 / len(b)),
     "[case: two negative Brier-n (the product is positive: clamp each one)]"),
    ("head_by_head_backward", naive_mtp, "logits-sized tensors of 3 earlier heads were still alive"),
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
    ("dispersion", quadratic_dispersion, "memory: "),
    ("dispersion", quadratic_dispersion, "(the largest tensor 65,536 entries; N d = 1,024)"),
    ("dispersion", lambda h: 1 - torch.nn.functional.cosine_similarity(h[..., :1, :], h, dim=-1).mean(-1),
     "value differs"),
    ("dispersion_loss", lambda lg, y, h, w: torch.nn.functional.cross_entropy(lg.flatten(0, 1), y.flatten(),
                                                                             ignore_index=-1)
     - w * checks.dispersion_definition(h).mean(), "[case: weight 0.1] gradient of wte.weight"),
    # wrong in how they compute, or in what they return: the properties the statements promise
    ("dispersion", pdist_dispersion, "[case: O(N d): N = 256 vectors of dimension 4] memory: "),
    ("dispersion", pdist_dispersion, "the largest tensor 32,640 entries"),
    ("dispersion", row_by_row_dispersion, "[case: O(N d): N = 256 vectors of dimension 4] time: your function did "
                                          "more than"),
    ("dispersion", chunked_dispersion, "time: your function did more than"),
    ("head_by_head_backward", list_of_logits_backward, "[case: n = 4 heads] memory: when your code computed logits "
                                                       "(call 4 of the shared unembedding), logits-sized tensors of 3 "
                                                       "earlier heads were still alive"),
    ("head_by_head_backward", tensor_loss_backward, "returned: expected a Python float, got a tensor of shape ()"),
    ("two_sample_brier", brier_first_four, "[case: max_n = 2 on rows of 5 tokens] vs brierlm.two_sample_estimates "
                                           "(float32): shape (40, 4), expected (40, 2)"),
    ("brierlm", lambda b: 100 * torch.tensor(b).clamp(min=0).prod() ** (1 / len(b)),
     "returned: expected a Python float, got a tensor of shape () and dtype torch.float32"),
    ("brierlm", lambda b: 0 if min(b) <= 0 else 100 * math.prod(b) ** (1 / len(b)),
     "[case: one Brier-n below 0] returned: expected a Python float, got an int"),
    ("rope_tables", float64_rope_tables, "cos vs gpt.rope_tables (float32 tables, as the statement asks): dtype "
                                         "torch.float64, expected torch.float32"),
    ("cached_attention", sdpa_attention, "your function calls scaled_dot_product_attention"),
    ("verify_greedy", lambda d, g: tuple(g[:1 + next((j for j, t in enumerate(d) if t != g[j]), len(d))]),
     "returned: expected a list of Python ints, got a tuple"),
    ("energy_loss", energy_clamped_at_1e6, "clamp the SQUARED distance at 1e-12"),
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


# ----------------------------------------------------------------------------- correct, but not our way: PASS

class Alternatives:
    """One correct solution per exercise, each written differently from the repository's and from the teachers'."""

    @staticmethod
    def rope_tables(head_dim, max_len, base=10000.0):  # a list instead of a tuple, torch.outer, 1 / base^x
        inv = 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))
        angles = torch.outer(torch.arange(max_len).float(), inv)
        return [angles.cos(), angles.sin()]

    @staticmethod
    def apply_rope(x, cos, sin):  # the "rotate half" form with full-width tables
        x1, x2 = x.chunk(2, dim=-1)
        c, s = torch.cat([cos, cos], -1).to(x.dtype), torch.cat([sin, sin], -1).to(x.dtype)
        return x * c + torch.cat([-x2, x1], -1) * s

    @staticmethod
    def cached_attention(q, k, v):  # an additive -inf bias from triu, einsum instead of @
        T, Tk = q.size(-2), k.size(-2)
        bias = torch.full((T, Tk), float("-inf"), dtype=q.dtype).triu(diagonal=Tk - T + 1)
        weights = torch.softmax(torch.einsum("bhtd,bhsd->bhts", q, k) * q.size(-1) ** -0.5 + bias, dim=-1)
        return torch.einsum("bhts,bhsd->bhtd", weights, v)

    @staticmethod
    @torch.no_grad()
    def generate_cached(model, idx, max_new_tokens):  # tokens collected in a list, joined at the end
        if max_new_tokens == 0:
            return idx
        cache = ref.new_cache(model)
        tokens = [ref.logits_with_cache(model, idx, cache)[:, -1].argmax(-1)]
        while len(tokens) < max_new_tokens:
            tokens.append(ref.logits_with_cache(model, tokens[-1][:, None], cache)[:, -1].argmax(-1))
        return torch.cat([idx, torch.stack(tokens, dim=1)], dim=1)

    @staticmethod
    def two_sample_brier(x1, x2, y, max_n=4):  # one column per n with .all() instead of a cumulative product
        def agree(a, b, n):
            return (a[:, :n] == b[:, :n]).all(dim=1).to(torch.float32)
        return torch.stack([agree(x1, y, n) + agree(x2, y, n) - agree(x1, x2, n) for n in range(1, max_n + 1)], 1)

    @staticmethod
    def exact_brier1(logits, y):  # 1 - the squared error against the one-hot outcome
        p = logits.float().softmax(-1)
        return 1 - ((p - F.one_hot(y, p.size(-1)).float()) ** 2).sum(-1)

    @staticmethod
    def brierlm(briers):  # exp of the mean log, 0.0 when a factor is <= 0
        if min(briers) <= 0:
            return 0.0
        return 100 * math.exp(sum(math.log(b) for b in briers) / len(briers))

    @staticmethod
    def head_by_head_backward(model, x, y):  # torch.autograd.backward; the previous logits stay named a while
        z = ref.trunk_hidden(model, x)
        z_in = z.detach()
        z_in.requires_grad = True
        losses = []
        for i in range(ref.n_heads(model)):
            logits = ref.head_logits(model, i, z_in)
            loss = ref.head_loss(logits, y, i)
            torch.autograd.backward(loss)
            losses.append(loss.item())
        torch.autograd.backward(z, grad_tensors=z_in.grad)
        return float(sum(losses))

    @staticmethod
    def verify_greedy(drafts, greedy):  # an index that walks, slices at the end
        k = 0
        while k < len(drafts) and drafts[k] == greedy[k]:
            k += 1
        return list(drafts[:k]) + [greedy[k]]

    @staticmethod
    def energy_loss(x, y, alpha=1.0):  # vector_norm of the off-diagonal pairs only: no clamp needed
        off = ~torch.eye(x.size(0), dtype=torch.bool)
        fit = torch.linalg.vector_norm(x.unsqueeze(1) - y.unsqueeze(0), dim=-1).pow(alpha).mean(dim=(0, 1))
        spread = torch.linalg.vector_norm((x.unsqueeze(1) - x.unsqueeze(0))[off], dim=-1).pow(alpha).mean(0)
        return 2 * fit - spread

    @staticmethod
    def clipped_kl(mu, log_sigma, clip=0.5):  # torch.maximum against a full tensor of the floor
        kl = 0.5 * (mu ** 2 + torch.exp(log_sigma) ** 2) - 0.5 - log_sigma
        return torch.maximum(kl, torch.full_like(kl, clip)).sum(-1).mean()

    @staticmethod
    def autoencoder_loss(logits, chunks, mu, log_sigma, kl_weight=1e-3, kl_clip=0.5):  # classes moved to dim 1
        ce = F.cross_entropy(logits.permute(0, 3, 1, 2), chunks)
        return chunks.shape[-1] * ce + kl_weight * Alternatives.clipped_kl(mu, log_sigma, kl_clip)

    @staticmethod
    def dispersion(h):  # through the mean unit vector: D = N / (N - 1) (1 - |mean u|^2)
        N = h.size(-2)
        m = F.normalize(h, dim=-1).mean(dim=-2)
        return N / (N - 1) * (1 - (m * m).sum(-1))

    @staticmethod
    def dispersion_loss(logits, y, h, weight):  # nll of log_softmax with the classes in dim 1
        ce = F.nll_loss(F.log_softmax(logits, -1).transpose(1, 2), y, ignore_index=-1)
        return ce - weight * Alternatives.dispersion(h.flatten(0, 1))


def einsum_dispersion(h):  # torch.einsum sums each side first: O(N d), so it must pass
    u = F.normalize(h, dim=-1)
    N = h.size(-2)
    return 1 - (torch.einsum("...nd,...md->...", u, u) - N) / (N * (N - 1))


def loop_dispersion(h):  # a Python loop over the vectors, O(N d) work: must pass
    N = h.size(-2)
    S = torch.zeros(h.shape[:-2] + h.shape[-1:], dtype=h.dtype)
    for i in range(N):
        S = S + h[..., i, :] / h[..., i, :].norm(dim=-1, keepdim=True)
    return 1 - ((S * S).sum(-1) - N) / (N * (N - 1))


ALTERNATIVES = [(name, getattr(Alternatives, name)) for _, exercises in grade.NOTEBOOKS.items()
                for _, name in exercises] + [("dispersion", einsum_dispersion), ("dispersion", loop_dispersion)]


@pytest.mark.parametrize("check, solution", ALTERNATIVES, ids=[f"{c}-{i}" for i, (c, _) in enumerate(ALTERNATIVES)])
def test_a_correct_solution_written_differently_passes(check, solution, capsys):
    passed = getattr(checks, check)(solution)
    line = capsys.readouterr().out.strip()
    assert passed is True and line.startswith("PASS "), line


def test_the_watch_counts_what_it_claims():
    """Tensors: views are free, work counts entries read and written, live entries follow the storages (a view
    keeps its base alive), and the budget stops the student's code from inside."""
    with compare.Tensors() as watch:
        a = torch.ones(10, 10)           # 100 entries created
        b = a[:5]                        # a view: nothing new
        del a
        c = b * 2                        # reads 50, writes 50
    assert watch.largest == 100 and watch.live == 150 and watch.peak == 150
    assert watch.work == 100 + 50 + 50
    del b, c
    assert watch.live == 0
    steps = []
    with pytest.raises(compare.TooMuchWork, match="stopped at 300"):
        with compare.Tensors(budget=250, on_budget=lambda w: f"stopped at {w}"):
            x = torch.zeros(100)     # work 100
            for _ in range(10):
                x = x + 1            # 100 read, 100 written: 300 > 250 after the first step
                steps.append(x)
    assert steps == []           # raised inside the operation, before its result came back


# ----------------------------------------------------------------------------- hints, questions

def stub_hints(source):
    pattern = r"# STUB raise NotImplementedError\(\"exercise (\d+\.\d+): ([^\"]*)\"\)"
    return dict(re.findall(pattern, source.read_text()))


def solution_lines(source, shortest=20):
    """The code of every line between BEGIN and END SOLUTION that is at least `shortest` characters long (shorter
    ones, like `return idx` or `k += 1`, say nothing on their own)."""
    lines, inside = [], False
    for line in source.read_text().splitlines():
        if line.strip() in ("# BEGIN SOLUTION", "# END SOLUTION"):
            inside = line.strip() == "# BEGIN SOLUTION"
        elif inside and len(line.split("#")[0].strip()) >= shortest:
            lines.append(line.split("#")[0].strip())
    return lines


def answers(source):
    """The text of every answer cell of a source, one string per cell."""
    return [a for _, a in [(k, "\n".join(v)) for k, v in build.parse(str(source)) if k == "answer"]]


@pytest.mark.parametrize("name", NAMES)
def test_hints_come_in_two_tiers_and_the_first_gives_nothing_away(name):
    source = EX / "src" / f"{name}.py"
    hints = stub_hints(source)
    cells = [("\n".join(v)) for k, v in build.parse(str(source)) if k == "markdown"]
    second = [c for c in cells if c.startswith("<details><summary>Hint 2")]
    assert len(second) == len(hints) == len(exercises_in(source)) and all(c.endswith("</details>") for c in second)
    for ex, hint in hints.items():
        assert len(hint) <= 110, (ex, hint)   # a nudge, not a recipe
        assert not [line for line in solution_lines(source, shortest=8) if line in hint], (ex, hint)


@pytest.mark.parametrize("name", NAMES)
def test_questions_have_answers_for_teachers_and_empty_cells_for_students(name):
    source = EX / "src" / f"{name}.py"
    model_answers = answers(source)
    assert len(model_answers) >= 3 and all(len(a) > 200 for a in model_answers)
    student = nbformat.read(EX / f"{name}.ipynb", as_version=4).cells
    teacher = nbformat.read(EX / "solutions" / f"{name}.ipynb", as_version=4).cells
    assert sum(c.source == build.STUDENT_ANSWER for c in student) == len(model_answers)
    assert [c.source for c in teacher if c.source.startswith("**Answer.** ")] == \
        ["**Answer.** " + a for a in model_answers]
    for i, c in enumerate(student):  # each empty answer cell follows its question
        if c.source == build.STUDENT_ANSWER:
            assert re.search(r"\*\*Q\d\.\*\*", student[i - 1].source), student[i - 1].source


# ----------------------------------------------------------------------------- the students' handout

@pytest.fixture(scope="module")
def handout(tmp_path_factory):
    """A clone of the repository without its exercises (the top level linked, tutorials/ left out) and the
    handout written into a folder inside it, as a student would receive it."""
    clone = tmp_path_factory.mktemp("clone")
    for entry in ROOT.iterdir():
        if entry.name not in ("tutorials", "tests", ".git", "out", "__pycache__", ".pytest_cache"):
            (clone / entry.name).symlink_to(entry)
    folder = clone / "exercises"
    assert build.main(["--handout", str(folder)]) == 0
    return folder


def test_the_handout_has_the_notebooks_and_their_modules_and_no_solution_or_answer(handout):
    assert sorted(p.name for p in handout.iterdir()) == sorted(
        [f"{n}.ipynb" for n in NAMES] + list(build.HANDOUT_FILES) + ["README.md"])
    for name in NAMES:  # the notebooks are the students' ones
        assert (handout / f"{name}.ipynb").read_text() == (EX / f"{name}.ipynb").read_text()
    text = "\n".join(plain_text(p) for p in handout.iterdir())
    assert not [line for source in SOURCES for line in solution_lines(source) if line in text]
    for source in SOURCES:
        for answer in answers(source):
            sentences = [s.strip() for s in re.split(r"(?<=[.:])\s", answer.replace("\n", " ")) if len(s) > 30]
            assert sentences and not [s for s in sentences if s in text.replace("\n", " ")]
    assert "# BEGIN SOLUTION" not in text and "**Answer.**" not in text


def plain_text(path):
    """A file's text as a reader sees it: a notebook's cell sources (not its JSON, which escapes quotes and
    backslashes and splits lines), anything else as it is."""
    if path.suffix == ".ipynb":
        return "\n".join(c.source for c in nbformat.read(path, as_version=4).cells)
    return path.read_text()


def test_the_leak_search_finds_solutions_and_answers():
    """The search the handout test relies on, pointed at the teachers' notebooks: it finds what it looks for."""
    for source in SOURCES:
        text = plain_text(EX / "solutions" / f"{source.stem}.ipynb")
        assert all(line in text for line in solution_lines(source))
        assert all(a.replace("\n", " ") in text.replace("\n", " ") for a in answers(source))


def test_the_handout_runs_inside_a_clone_in_a_jupyter_kernel(handout, monkeypatch):
    from nbclient import NotebookClient
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(handout / "2_brierlm.ipynb", as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(
        "print('kit', os.path.realpath(checks.__file__), 'repository', os.path.realpath(ref.ROOT))"))
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(handout)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert not [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert text.count("not written yet") == 3 and "0 of 3 exercises pass" in text
    assert f"kit {os.path.realpath(handout / 'checks.py')} repository {os.path.realpath(handout.parent)}" in text


def test_a_handout_outside_a_clone_is_written_with_a_note(tmp_path, capsys):
    assert build.main(["--handout", str(tmp_path / "h")]) == 0
    out = capsys.readouterr().out
    assert "is not inside a clone of the repository" in out and (tmp_path / "h" / "1_core.ipynb").exists()
    (tmp_path / "file").write_text("x")
    assert build.main(["--handout", str(tmp_path / "file")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "not a folder" in err


# ----------------------------------------------------------------------------- grades

def test_the_grading_table_matches_the_sources():
    assert list(grade.NOTEBOOKS) == NAMES
    for name, exercises in grade.NOTEBOOKS.items():
        source = (EX / "src" / f"{name}.py").read_text()
        called = re.findall(r"^checks\.(\w+)\((\w+)\)$", source, re.M)
        assert [ex for ex, _ in exercises] == exercises_in(EX / "src" / f"{name}.py")
        assert [(fn, fn) for _, fn in exercises] == called


def student_notebook(name, replace):
    """The students' notebook with some stubs replaced: {function name: source of the cell that defines it}."""
    nb = nbformat.read(EX / f"{name}.ipynb", as_version=4)
    for cell in nb.cells:
        for fn, code in replace.items():
            if cell.cell_type == "code" and re.search(rf"^def {fn}\(", cell.source, re.M):
                cell.source = code
    return nb


def run_grade(*args, cwd=None):
    return subprocess.run([sys.executable, str(EX / "grade.py"), *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_grading_records_exactly_what_passes_and_fails(tmp_path):
    """2.1 correct (not our way), 2.2 still the stub, 2.3 returns a tensor; the file renamed, a cell that raises and
    one that does not parse on the way: grade.py's record is exactly that, as CSV and as JSON."""
    nb = student_notebook("2_brierlm", {
        "two_sample_brier": "def two_sample_brier(x1, x2, y, max_n=4):\n"
                            "    def agree(a, b, n):\n"
                            "        return (a[:, :n] == b[:, :n]).all(dim=1).to(torch.float32)\n"
                            "    return torch.stack([agree(x1, y, n) + agree(x2, y, n) - agree(x1, x2, n)\n"
                            "                        for n in range(1, max_n + 1)], 1)\n",
        "brierlm": "def brierlm(briers):\n    return torch.tensor(100.0)\n"})
    nb.cells.insert(3, nbformat.v4.new_code_cell("raise ValueError('a student cell that fails')"))
    nb.cells.insert(4, nbformat.v4.new_code_cell("this is not python"))
    path = tmp_path / "alice.ipynb"
    nbformat.write(nb, path)
    done = run_grade(path, "--out", tmp_path / "grades.csv", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    with open(tmp_path / "grades.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["notebook"], r["exercise"], r["function"], r["result"]) for r in rows] == [
        (str(path), "2.1", "two_sample_brier", "PASS"), (str(path), "2.2", "exact_brier1", "FAIL"),
        (str(path), "2.3", "brierlm", "FAIL")]
    assert "not written yet" in rows[1]["detail"] and "expected a Python float" in rows[2]["detail"]
    assert "1 of 3 exercises pass" in done.stdout
    done = run_grade(path, EX / "solutions" / "5_dispersion.ipynb", "--out", tmp_path / "grades.json")
    assert done.returncode == 0, done.stderr
    records = json.loads((tmp_path / "grades.json").read_text())
    assert [(r["exercise"], r["result"]) for r in records] == [
        ("2.1", "PASS"), ("2.2", "FAIL"), ("2.3", "FAIL"), ("5.1", "PASS"), ("5.2", "PASS")]
    assert set(records[0]) == set(grade.FIELDS)


def test_a_notebook_that_does_not_finish_fails_every_exercise(tmp_path):
    nb = student_notebook("3_mtp", {})
    nb.cells.insert(3, nbformat.v4.new_code_cell("while True:\n    pass"))
    nbformat.write(nb, tmp_path / "loops.ipynb")
    done = run_grade(tmp_path / "loops.ipynb", "--timeout", "3")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("not checked: the notebook did not finish in 3 s") == 2 and "0 of 2" in done.stdout


@pytest.mark.parametrize("make, says", [
    (lambda d: d.joinpath("notes.ipynb").write_text("these are my notes, not a notebook"), "not a Jupyter notebook"),
    (lambda d: None, "no such file"),
    (lambda d: nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# My notes"),
                                                              nbformat.v4.new_code_cell("import torch")]),
                              d / "notes.ipynb"), "is not one of the exercise notebooks"),
])
def test_grading_bad_input_is_one_line_and_exit_2(tmp_path, make, says):
    make(tmp_path)
    done = run_grade(tmp_path / "notes.ipynb", EX / "1_core.ipynb")
    assert done.returncode == 2 and done.stdout == ""
    err = done.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and says in err, err


def test_grading_to_an_unknown_format_is_one_line_and_exit_2(tmp_path):
    done = run_grade(EX / "1_core.ipynb", "--out", tmp_path / "grades.txt")
    assert done.returncode == 2 and done.stdout == "" and done.stderr.strip().count("\n") == 0
    assert done.stderr.startswith("error: --out") and ".csv or .json" in done.stderr
