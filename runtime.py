"""Helpers below everything else (imports: torch and numpy only). Nothing here knows a paper or a model.

  errors          UserError: bad input from the user; the command-line tools print it as one line and exit 2
  command line    OneLineParser: every error is one line; every int/float flag is checked against NUMBER_RULES
                  (a new flag is covered without writing anything); args.typed = the flags the user typed;
                  to_argv: a dict of flags back into a command line; pick_device: 'auto', or a device that exists
  checkpoints     save_checkpoint: atomic, never with a NaN or infinite number inside, and a failed write (a full
                  disk) is a one-line UserError; load_checkpoint: torch.load(weights_only=True), so a checkpoint
                  cannot run code
  out_dir lock    OutDirLock: an OS lock (flock) on <out_dir>/.lock, released by the OS when the holder dies
  memory          available_memory: what a device has free (MemAvailable on CPU, mem_get_info on CUDA)
  progress        Progress: 'what: done/total | rate | ETA' on stderr for long loops
  statistics      mean_se, pearson, spearman (the one implementation every experiment and figure uses)
"""
import argparse
import contextlib
import math
import os
import pickle
import re
import sys
import time

import numpy as np
import torch

try:
    import fcntl  # POSIX; on Windows there is no out_dir lock
except ImportError:
    fcntl = None


class UserError(Exception):
    """Bad input from the user: scripts print the message as one line and exit non-zero, with no traceback."""


# ----------------------------------------------------------------------------- numbers on the command line

AT_LEAST_1 = ("at least 1", lambda v: v >= 1)
# Every int or float flag of every OneLineParser must be a finite number that satisfies its rule here; a flag not
# named here must be >= 0. So a new flag is checked the moment it is added.
NUMBER_RULES = {
    **dict.fromkeys(["batch_size", "grad_accum", "max_iters", "eval_interval", "eval_iters", "log_interval",
                     "block_size", "n_layer", "n_head", "n_embd", "max_new_tokens", "top_k", "num_samples",
                     "n_future", "chunk_size", "latent_dim", "ae_dim", "ae_iters", "noise_size",
                     "num_target_samples", "temp_candidates", "flow_steps", "diffusion_steps",
                     "head_layers"], AT_LEAST_1),
    **dict.fromkeys(["dropout", "beta1", "beta2", "latent_dropout", "mask_prob"], ("in [0, 1)", lambda v: 0 <= v < 1)),
    "positions": ("at least 2 (a standard error needs two)", lambda v: v >= 2),
    "head_lr_scale": ("> 0", lambda v: v > 0),
    "seed": ("in 0 .. 2**32 - 1", lambda v: 0 <= v < 2 ** 32),
    "alpha": ("in (0, 2) (the energy score is strictly proper there)", lambda v: 0 < v < 2),
}
DEFAULT_RULE = (">= 0", lambda v: v >= 0)


def check_number(name, value):
    for v in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise UserError(f"--{name} must be a number, got {v!r}")
        text, ok = NUMBER_RULES.get(name, DEFAULT_RULE)
        if not math.isfinite(v) or not ok(v):
            raise UserError(f"--{name} must be {'a finite number ' if not math.isfinite(v) else ''}{text}, got {v}")


class Typed(argparse.Action):
    """Store the value, and remember in args.typed that the user typed this flag (what --resume needs: a typed
    flag counts even when it equals the default)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.typed = getattr(namespace, "typed", frozenset()) | {self.dest}


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one-line UserErrors, whose int/float flags are checked (check_number), and
    whose result carries args.typed, the flags given on the command line. A negative number in any notation
    (-1e-3, -inf) is a value, not a flag, so that its rule can say what is wrong with it."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$|^-(inf|infinity|nan)$",
                                                   re.IGNORECASE)

    def add_argument(self, *names, **kw):
        if "action" not in kw and names and names[0].startswith("-"):
            kw["action"] = Typed
        return super().add_argument(*names, **kw)

    def parse_args(self, args=None, namespace=None):
        ns = super().parse_args(args, namespace)
        ns.typed = getattr(ns, "typed", frozenset())
        for action in self._actions:
            value = getattr(ns, action.dest, None)
            if action.type in (int, float) and value is not None:
                check_number(action.dest, value)
        return ns

    def error(self, message):
        raise UserError(message)


def to_argv(flags):
    """{"max_iters": 10, ..} -> ["--max_iters", "10", ..]: flags for train.py's parser."""
    return [s for k, v in flags.items() for s in (f"--{k}", str(v))]


def parse_bool(text):
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def pick_device(name):
    """'auto' -> cuda, then mps, then cpu; any other name must be a device this machine really has."""
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"unknown --device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        build = "is built without CUDA" if torch.version.cuda is None else "sees no GPU"
        raise UserError(f"--device {name}: this PyTorch ({torch.__version__}) {build}; use --device cpu or auto")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: MPS is not available here; use --device cpu or auto")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {name}: only cpu, cuda and mps are supported")
    return name


# ----------------------------------------------------------------------------- checkpoints

# What torch.load may rebuild besides tensors and plain Python values: numpy arrays, which checkpoints written
# before RNG states were stored as lists hold (numpy's random state). Nothing here can run code.
NUMPY_GLOBALS = [getattr(np, "_core", getattr(np, "core", None)).multiarray._reconstruct, np.ndarray, np.dtype,
                 type(np.dtype(np.uint32))]


def load_checkpoint(path, map_location="cpu"):
    """A checkpoint dict, loaded with weights_only=True: a file that needs anything else is refused unread."""
    if os.path.isdir(path):
        raise UserError(f"{path} is a directory, not a checkpoint: give the path of its ckpt.pt")
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}")
    try:
        with torch.serialization.safe_globals(NUMPY_GLOBALS):
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"(?:GLOBAL|global) ([\w.]+)", str(e))
        if found:
            raise UserError(f"{path} was refused without being run: it needs the Python object {found.group(1)}, "
                            f"and a checkpoint of this project holds only tensors, numbers and text") from None
        raise UserError(f"{path} is not a readable checkpoint of this project (UnpicklingError)") from None
    except Exception as e:
        raise UserError(f"{path} is not a readable checkpoint of this project ({type(e).__name__})") from None
    missing = [k for k in ("model", "args", "objective") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing or not isinstance(ckpt["args"], dict) or not isinstance(ckpt["model"], dict):
        raise UserError(f"{path} is not a checkpoint of this project (it lacks {', '.join(missing) or 'a valid args'})")
    return ckpt


def first_non_finite(tree, name="checkpoint"):
    """The name of the first NaN or infinite float (tensor or number) inside nested dicts/lists, else None."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    elif torch.is_tensor(tree) and tree.is_floating_point():
        return None if bool(torch.isfinite(tree).all()) else name
    elif isinstance(tree, float):
        return None if math.isfinite(tree) else name
    else:
        return None
    for k, v in items:
        bad = first_non_finite(v, f"{name}.{k}" if name else str(k))
        if bad:
            return bad
    return None


def save_checkpoint(path, state):
    """Write atomically (a crash mid-write never leaves a broken file), and never a NaN or infinity. A write that
    fails (a full disk: torch reports it from its inline_container.cc) leaves the file at `path` as it was and
    raises a one-line UserError."""
    bad = first_non_finite(state, "")
    if bad:
        raise UserError(f"not saving {path}: {bad} is not finite")
    tmp = path + ".tmp"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        why = e.strerror if isinstance(e, OSError) and e.strerror else "the write failed: is the disk full?"
        raise UserError(f"could not write {path} ({why})") from None


# ----------------------------------------------------------------------------- one training per out_dir

class OutDirLock:
    """Hold an exclusive OS lock (fcntl.flock) on <out_dir>/.lock while a run writes there. The OS drops it when
    the holder exits or is killed, so there is no stale lock to clean; a second run gets a one-line error. The
    holder removes the file when it is done (while still holding it; a run that opened the old file sees that
    and locks the new one), so a finished run leaves no .lock behind."""

    def __init__(self, out_dir):
        try:
            os.makedirs(out_dir, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create --out_dir {out_dir} ({e.strerror}): choose another --out_dir") from None
        self.path, self.fd = os.path.join(out_dir, ".lock"), None
        if fcntl is None:
            return
        while self.fd is None:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise UserError(f"cannot write in --out_dir {out_dir} ({e.strerror}): choose another --out_dir") \
                    from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 64).decode(errors="replace").strip()
                os.close(fd)
                raise UserError(f"{out_dir} is in use by another training run{f' (pid {holder})' if holder else ''}: "
                                f"wait for it, stop it, or choose another --out_dir") from None
            try:
                current = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if not current:  # its holder removed it after we opened it: lock the file there now
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            self.fd = fd

    def release(self):
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.remove(self.path)  # still locked: nobody else holds this file
            os.close(self.fd)  # closing the descriptor releases the lock
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


# ----------------------------------------------------------------------------- memory

def available_memory(device):
    """(bytes free for a run on `device`, where that number comes from), or None where it cannot be known (MPS,
    or a CPU without /proc/meminfo)."""
    if device.startswith("cuda"):  # free on the GPU, and what this process's allocator holds unused (earlier runs)
        d = torch.device(device)
        cached = torch.cuda.memory_reserved(d) - torch.cuda.memory_allocated(d)
        return torch.cuda.mem_get_info(d)[0] + cached, f"{device} (torch.cuda.mem_get_info)"
    if device != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    return kb * 1024, "this machine (MemAvailable in /proc/meminfo)"


# ----------------------------------------------------------------------------- progress lines

PROGRESS_SECONDS = 5.0  # a Progress line at most this often (so short work prints nothing)


def duration(seconds):
    s = int(max(0, seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """progress(done) prints 'what: done/total unit | rate | ETA' to stderr, at most every PROGRESS_SECONDS."""

    def __init__(self, what, total, unit):
        self.what, self.total, self.unit = what, total, unit
        self.t0 = self.last = time.time()

    def __call__(self, done):
        now = time.time()
        if done <= 0 or now - self.last < PROGRESS_SECONDS:
            return
        self.last = now
        rate = done / max(now - self.t0, 1e-9)
        print(f"{self.what}: {done:,}/{self.total:,} {self.unit} | {rate:,.1f} {self.unit}/s | "
              f"ETA {duration((self.total - done) / rate)}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- statistics

def mean_se(values):
    """(mean, standard error of the mean); the standard error is nan for a single value."""
    x = np.asarray(values, dtype=np.float64)
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")


def pearson(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise UserError(f"a correlation needs two equally long sequences of at least 2 numbers, got {a.shape}, "
                        f"{b.shape}")
    a, b = a - a.mean(), b - b.mean()
    denom = math.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else float("nan")  # undefined for a constant series


def ranks(a):
    """Ranks 1..n, ties sharing their average rank (what Spearman's coefficient needs)."""
    a = np.asarray(a, dtype=np.float64)
    r = np.empty(len(a))
    r[np.argsort(a, kind="stable")] = np.arange(1, len(a) + 1)
    for v in np.unique(a):
        r[a == v] = r[a == v].mean()
    return r


def spearman(a, b):
    """Spearman's rank correlation: Pearson's of the ranks, ties at their average rank."""
    return pearson(ranks(a), ranks(b))


def correlation(xs, ys):
    """{'pearson', 'spearman'} of two equally long sequences of at least 3 numbers."""
    if len(xs) != len(ys) or len(xs) < 3:
        raise UserError("a correlation needs two equally long sequences of at least 3 numbers")
    return {"pearson": pearson(xs, ys), "spearman": spearman(xs, ys)}
