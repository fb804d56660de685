"""The machinery behind every check cell: call the student's function, compare its output (type, shape, dtype,
value, gradient) with an expected one, and print ONE line: `PASS <exercise> ...` or `FAIL <exercise> ...: what
differs`. A check never raises: a stub (NotImplementedError), an exception inside the student's code or a wrong
answer all become a FAIL line, so "Run all" goes through every cell. Results are kept in RESULTS for summary()."""
import contextlib
import numbers
import os
import traceback
import weakref

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

RESULTS = {}  # exercise id -> (passed, message); the latest run of each check


class Mismatch(Exception):
    """What differs between the student's answer and the expected one (becomes the FAIL line)."""


class NotWritten(Mismatch):
    """The student's function is still the stub (its NotImplementedError message is the hint)."""


def run(exercise, name, body):
    """Run one check: body() returns a short PASS detail or raises Mismatch. Prints one line, returns passed."""
    try:
        passed, message = True, f"PASS {exercise} {name}: {body()}"
    except Mismatch as e:
        passed, message = False, f"FAIL {exercise} {name}: {e}"
    except Exception as e:  # noqa: BLE001 -- a bug in the check itself (e.g. the repository API moved)
        where = traceback.extract_tb(e.__traceback__)[-1]
        passed, message = False, (f"FAIL {exercise} {name}: the check itself crashed ({type(e).__name__}: {e}, "
                                   f"{os.path.basename(where.filename)}:{where.lineno}); this is a bug in "
                                   f"checks.py or reference.py, not in your code: tell your teacher")
    RESULTS[exercise] = (passed, message)
    print(message)
    return passed


def summary():
    """One line per exercise checked so far in this session, then the count."""
    for _, message in sorted(RESULTS.values(), key=lambda r: r[1].split()[1]):
        print(message.split(":")[0])
    done = sum(p for p, _ in RESULTS.values())
    print(f"{done} of {len(RESULTS)} exercises pass")


@contextlib.contextmanager
def case(label):
    """Prefix any Mismatch raised inside with the case it happened in."""
    try:
        yield
    except NotWritten:
        raise
    except Mismatch as e:
        raise Mismatch(f"[case: {label}] {e}") from None


OUR_FILES = ("compare.py", "checks.py", "reference.py")


def call(fn, *args, **kwargs):
    """Call the student's function; a stub or an exception inside it becomes a Mismatch that says where."""
    try:
        return fn(*args, **kwargs)
    except NotImplementedError as e:
        frame = traceback.extract_tb(e.__traceback__)[-1]
        raise NotWritten(f"not written yet ({frame.name} raises NotImplementedError: {e})") from None
    except Mismatch:
        raise
    except Exception as e:  # noqa: BLE001 -- report the student's bug, do not crash the notebook
        frames = [f for f in traceback.extract_tb(e.__traceback__)
                  if os.path.basename(f.filename) not in OUR_FILES and "site-packages" not in f.filename]
        at = f" in {frames[-1].name}, line {frames[-1].lineno}: `{(frames[-1].line or '').strip()}`" if frames else ""
        raise Mismatch(f"your code raised {type(e).__name__}{at}: {e}") from None


def as_tensor(x, what):
    if torch.is_tensor(x):
        return x
    if isinstance(x, numbers.Real) and not isinstance(x, bool):
        return torch.tensor(float(x), dtype=torch.float64)
    raise Mismatch(f"{what}: expected a tensor or a number, got {type(x).__name__}")


def same(got, want, what, atol=1e-5, rtol=1e-4, dtype="exact"):
    """Mismatch unless got equals want: a tensor of the same shape (and dtype: 'exact', 'float' = any floating
    type, None = not checked), no NaN or inf where want has none, values within atol + rtol |want|."""
    if not torch.is_tensor(want):
        dtype = None  # a plain number is expected: a number or a tensor of any dtype will do
    if dtype is None:
        got = as_tensor(got, what)
    elif not torch.is_tensor(got):
        raise Mismatch(f"{what}: expected a tensor, got {type(got).__name__}")
    want = as_tensor(want, what)
    if tuple(got.shape) != tuple(want.shape):
        raise Mismatch(f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    if dtype == "exact" and got.dtype != want.dtype:
        raise Mismatch(f"{what}: dtype {got.dtype}, expected {want.dtype}")
    if dtype == "float" and not got.is_floating_point():
        raise Mismatch(f"{what}: dtype {got.dtype}, expected a floating-point tensor")
    g, w = got.detach().double().cpu(), want.detach().double().cpu()
    bad = ~torch.isfinite(g) & torch.isfinite(w)
    if bad.any():
        i = index_of(bad.nonzero()[0])
        raise Mismatch(f"{what}: {g[i].item()} at index {i}, expected {w[i].item():.6g} "
                       f"({int(bad.sum())} of {g.numel()} entries are NaN or inf)")
    err = (g - w).abs().nan_to_num(0.0)
    off = err > atol + rtol * w.abs().nan_to_num(0.0)
    if off.any():
        i = index_of((err * off).flatten().argmax(), g.shape)
        raise Mismatch(f"{what}: value differs, max |difference| {err.max().item():.3g} at index {i}: yours "
                       f"{g[i].item():.6g}, expected {w[i].item():.6g} ({int(off.sum())} of {g.numel()} entries off)")


def index_of(flat_or_nd, shape=None):
    if shape is not None:
        flat, out = int(flat_or_nd), []
        for s in reversed(shape):
            out.append(flat % s)
            flat //= s
        return tuple(reversed(out))
    return tuple(int(v) for v in flat_or_nd)


def gradients(out, inputs, weights):
    """d sum(weights * out) / d input for each named input; Mismatch when out is not differentiable."""
    if not torch.is_tensor(out) or not out.requires_grad:
        raise Mismatch("gradient: your result is not differentiable (was it built with .item(), .detach(), "
                       "numpy, python floats or torch.no_grad()?)")
    grads = torch.autograd.grad((out * weights).sum(), list(inputs.values()), allow_unused=True)
    return dict(zip(inputs, grads))


def same_function(student, expected, args, what, grad=(), **tolerances):
    """Compare student(*args.values()) with expected(*args.values()) in value and, for the arguments named in
    grad, in the gradient of a random weighting of the output. Each side gets its own copies of the inputs."""
    def fresh():
        return [a.detach().clone().requires_grad_(name in grad) if torch.is_tensor(a) else a
                for name, a in args.items()]
    mine, theirs = fresh(), fresh()
    got = call(student, *mine)
    want = expected(*theirs)
    same(got, want, what, **tolerances)
    if not grad:
        return
    w = torch.randn(want.shape, dtype=want.dtype, generator=torch.Generator().manual_seed(1))
    position = {name: i for i, name in enumerate(args)}
    g_want = torch.autograd.grad((want * w).sum(), [theirs[position[n]] for n in grad], allow_unused=True)
    g_got = gradients(got, {n: mine[position[n]] for n in grad}, w.to(got.dtype))
    for (name, g), gw in zip(g_got.items(), g_want):
        if gw is None:
            continue
        if g is None:
            raise Mismatch(f"gradient with respect to {name}: none reaches it (is the output cut off from {name}?)")
        same(g, gw, f"gradient with respect to {name}", **tolerances)


class TooMuchWork(Mismatch):
    """Raised from inside the student's code by a Tensors watch whose budget of element operations ran out."""


class Tensors(TorchDispatchMode):
    """Watches every tensor operation while it is active (below autograd, so it also sees what torch functions,
    modules and backward passes do inside), and counts, independently of the machine's speed:
      work     entries read and written by every operation that computes (views are free): an operation count
               that grows like N^2 for anything that touches all N^2 pairs, a loop over rows or chunks included;
      live     entries of the tensors created while watching whose memory is still in use (weak references to
               their storages, which live as long as any tensor, view or autograd record uses them: the watch
               itself keeps nothing alive); peak is its maximum, largest the largest single tensor;
      ops      the names of the aten operations that ran.
    budget (entries): over it, the next operation raises TooMuchWork(on_budget(work)) inside the student's code,
    so that an O(N^2) loop stops at once. created(tensor, storage) is called for every tensor created."""

    def __init__(self, budget=None, on_budget=None, created=None):
        super().__init__()
        self.work = self.live = self.peak = self.largest = 0
        self.ops = set()
        self.budget, self.on_budget, self.created = budget, on_budget, created

    def freed(self, n):
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.add(func.__name__)
        if func.is_view:
            return out
        inputs = [a for a in tree_leaves((args, kwargs)) if torch.is_tensor(a)]
        storages = {a.untyped_storage().data_ptr() for a in inputs}
        self.work += sum(a.numel() for a in inputs)
        for t in tree_leaves(out):
            if not torch.is_tensor(t):
                continue
            self.work += t.numel()
            if t.untyped_storage().data_ptr() in storages:  # in place, or out=: no new memory
                continue
            self.live += t.numel()
            self.peak, self.largest = max(self.peak, self.live), max(self.largest, t.numel())
            storage = t.untyped_storage()  # lives as long as any tensor, view or autograd record that uses it
            weakref.finalize(storage, self.freed, t.numel()).atexit = False
            if self.created is not None:
                self.created(t, storage)
        if self.budget is not None and self.work > self.budget:
            self.budget = None  # raise once
            raise TooMuchWork(self.on_budget(self.work) if self.on_budget else f"more than {self.work:,} operations")
        return out


class Calls(TorchFunctionMode):
    """Records the name of every torch function called while it is active (F.scaled_dot_product_attention,
    torch.pdist, ...), however the student imported it."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.add(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def describe(x):
    """What a value is, for a FAIL line: 'a tensor of shape (3,) and dtype torch.float32', 'a list', ..."""
    if torch.is_tensor(x):
        return f"a tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return f"{'an' if type(x).__name__[0] in 'aeiou' else 'a'} {type(x).__name__}"


def python_float(got, what):
    """Mismatch unless got is a Python float (a numpy float64 is one; a tensor, an int or a bool is not)."""
    if isinstance(got, bool) or not isinstance(got, float):
        tip = ": turn a one-element tensor into a float with .item()" if torch.is_tensor(got) else ""
        raise Mismatch(f"{what}: expected a Python float, got {describe(got)}{tip}")
    return got


def token_list(got, what):
    """Mismatch unless got is a list of Python ints (token ids); returns it."""
    def is_int(t):
        return isinstance(t, int) and not isinstance(t, bool)
    if isinstance(got, list) and all(map(is_int, got)):
        return got
    odd = f" holding {describe(next(t for t in got if not is_int(t)))}" if isinstance(got, list) else ""
    tip = " (.tolist() turns a tensor into one)" if torch.is_tensor(got) or odd else ""
    raise Mismatch(f"{what}: expected a list of Python ints, got {describe(got)}{odd}{tip}")
