"""What made every measured number: provenance for each run in results/*.json, reuse only of what the current code
and configuration would produce again, and `python -m bench verify` to re-check any run in one command.

A results file is one experiment: {"experiment": name, "description": ..., "runs": {run_id: record}}, where a
record is {"config": the full configuration (flags, seed), "metrics": ..., "provenance": {...}[, "verified": [..]]}.
(A file that is one measurement, e.g. a benchmark table, carries "provenance" at its top level instead.)

  provenance(config, modules)  commit and whether the tree's code was dirty, a hash of the repository source the
                               run executes (the modules it imports, transitively), the configuration and seed,
                               torch version, threads, device, the machine's hardware string, start time. Commit and
                               source are read once, when this module is imported (the process's start), so a file
                               edited while a sweep runs does not change what its records claim; finish() names
                               any module whose file changed on disk meanwhile ("changed_on_disk")
  Results                      one results file: .reusable(run_id, config, code) gives a finished record only when
                               its code hash and configuration match (a record of other code is trained afresh;
                               reuse_stale=True keeps it but marks it "stale"); .add(run_id, record) writes it
  current_codes(data, code)    which code hashes count as today's: `code`, and any code one of whose runs
                               `bench verify --record` re-ran at `code` bit for bit (so a change elsewhere in the
                               repository costs one re-check per experiment, not a re-run of every sweep)
  checkpoint_matches           the same rule for a run's checkpoint folder (its provenance.json)
  verify(path, run_id)         re-run one run in a temporary folder at the current code and compare: exactly when
                               the run is deterministic (same CPU model, thread count and torch), else within its
                               stated noise; points=N re-trains only up to a run's N-th scored point (a long
                               run's re-check in minutes: the schedule is the full run's, so its first points are
                               the same computation)

Numbers that depend on the thread count: float sums in matrix products are split across threads, so a run on 2
threads is not bit-identical to the same run on 1 thread (training curves drift apart within the seeds' noise);
with the thread count of the record, CPU training here is deterministic and verify expects exact agreement.
Timings (tokens/s, speed-ups) are never exact: verify compares them within the stated noise, if at all.
The noise each experiment allows is never zero-width: an estimate at its bound (an accuracy of exactly 0, a
Brier score of exactly -1) has a standard error of 0, so each compared() floors it at one count of its sample;
an undefined (NaN) standard error falls back to a defined one, and two equal numbers always agree.
"""
import ast
import fcntl
import hashlib
import importlib
import inspect
import json
import os
import platform
import re
import subprocess
import tempfile
import time

import torch

from runtime import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "results")
FIELDS = ("commit", "dirty", "code", "config", "torch", "threads", "device", "hardware", "started", "wall_seconds")


# ----------------------------------------------------------------------------- what made a run

def git(*argv):
    try:
        return subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def read_commit():
    """(HEAD commit, whether any tracked or new .py file differs from it): the code, not results/ or notebooks."""
    head = git("rev-parse", "HEAD") or "unknown (not a git checkout)"
    dirty = bool(git("status", "--porcelain", "--", "*.py"))
    return head, dirty


def snapshot(root=ROOT):
    """{path: bytes} of every .py file of the repository (not out/, not hidden folders), read now."""
    files = {}
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith((".", "__")) and not (folder == root and d == "out")]
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path, "rb") as f:
                    files[path] = f.read()
    return files


# What this process runs: the source and commit as they were when it started (this module is imported with the rest
# of the code it runs), not as they are on disk when a record is written hours later.
SOURCE, COMMIT = snapshot(), read_commit()


def commit():
    """(commit, dirty) when this process started."""
    return COMMIT


def source(path):
    """The content of a repository file as this process loaded it (read now if it was not there at the start)."""
    if path not in SOURCE:
        with open(path, "rb") as f:
            SOURCE[path] = f.read()
    return SOURCE[path]


def module_file(name):
    """The repository file of a module name ('bench.table', 'calm'), or None for anything else."""
    path = os.path.join(ROOT, *name.split(".")) + ".py"
    if os.path.isfile(path):
        return path
    package = os.path.join(ROOT, *name.split("."), "__init__.py")
    return package if os.path.isfile(package) else None


def imported_modules(names):
    """The repository modules `names` import, transitively, themselves included (read from the source: every
    import statement, at the top or inside a function)."""
    seen, todo = set(), list(names)
    while todo:
        name = todo.pop()
        path = module_file(name)
        if name in seen or path is None:
            continue
        seen.add(name)
        for node in ast.walk(ast.parse(source(path))):
            if isinstance(node, ast.Import):
                todo += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                todo += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        if "." in name:
            todo.append(name.rsplit(".", 1)[0])  # a submodule runs its package's __init__ too
    return sorted(seen)


def code_hash(modules):
    """sha256 of the source (path and content) of every repository module the given ones import, transitively, as
    this process loaded it: the code a run executes. Two runs with equal hashes ran the same code."""
    h = hashlib.sha256()
    for name in imported_modules(modules):
        path = module_file(name)
        h.update(os.path.relpath(path, ROOT).encode() + b"\0")
        h.update(source(path) + b"\0")
    return "sha256:" + h.hexdigest()[:16]


def hardware(device="cpu"):
    """Read from the machine: architecture, CPU model (with its family and model numbers and the vector
    instructions torch's kernels use: one "AMD EPYC" name covers CPUs that run other kernels), cores, memory, and
    the GPU when one is used."""
    model, info = platform.processor() or platform.machine(), {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if not key.strip() and info:
                    break  # the first processor is enough
                info.setdefault(key.strip(), value.strip())
        model = info.get("model name", model)
    except OSError:
        pass
    family = f"family {info['cpu family']} model {info['model']}; " if "cpu family" in info and "model" in info else ""
    model = f"{model} [{family}{torch.backends.cpu.get_cpu_capability()}]"
    memory = ""
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal"))
        memory = f", {kib / 2 ** 20:.0f} GiB"
    except (OSError, StopIteration):
        pass
    gpu = f"; GPU {torch.cuda.get_device_name(device)}" if str(device).startswith("cuda") else "; no GPU used"
    return f"{platform.machine()} {model}, {os.cpu_count()} cores{memory}{gpu}"


def cpu_model(hardware_string):
    """The machine part of a hardware() string ("x86_64 AMD EPYC [family 25 model 1; AVX2]"): what decides which
    kernels run."""
    return (hardware_string or "?").split(",")[0]


def provenance(config, modules, device="cpu"):
    """What is about to make a run (call it before training; finish() adds the wall time)."""
    head, dirty = commit()
    return dict(commit=head, dirty=dirty, code=code_hash(modules), modules=imported_modules(modules),
                config=config, seed=config.get("seed") if isinstance(config, dict) else None,
                torch=torch.__version__, threads=torch.get_num_threads(), device=str(device),
                hardware=hardware(device), started=time.strftime("%Y-%m-%d %H:%M:%S"), t0=time.time())


def changed_on_disk(modules):
    """The repository modules among `modules` whose file on disk is no longer the source this process loaded."""
    changed = []
    for name in modules:
        path = module_file(name)
        if path is None:  # removed from disk since
            changed.append(name)
            continue
        with open(path, "rb") as f:
            if f.read() != source(path):
                changed.append(name)
    return changed


def finish(prov):
    """The provenance with the run's wall time, ready to store (and the modules edited on disk while it ran)."""
    prov = dict(prov)
    prov["wall_seconds"] = round(time.time() - prov.pop("t0", time.time()), 1)
    changed = changed_on_disk(prov.get("modules", []))
    if changed:
        prov["changed_on_disk"] = changed
    return prov


# ----------------------------------------------------------------------------- results files

def write_json(path, obj):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def read_json(path):
    if not os.path.isfile(path):
        raise UserError(f"no results file at {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not a readable results file ({type(e).__name__})") from None


class Locked:
    """An exclusive OS lock (flock) tied to a results file, for the time of a read-modify-write: two shards of one
    sweep write the same file. The lock files live in out/locks/."""

    def __init__(self, path):
        lock = os.path.join(ROOT, "out", "locks", os.path.abspath(path).strip(os.sep).replace(os.sep, "_") + ".lock")
        os.makedirs(os.path.dirname(lock), exist_ok=True)
        self.f = open(lock, "w")

    def __enter__(self):
        fcntl.flock(self.f, fcntl.LOCK_EX)

    def __exit__(self, *a):
        fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()


def shard(text):
    """--shard I/N -> (I, N): a sweep's runs I, I + N, I + 2N, .. (N processes split one sweep)."""
    m = re.fullmatch(r"(\d+)/(\d+)", text)
    if not m or not int(m[1]) < int(m[2]):
        raise UserError(f"--shard must be I/N with 0 <= I < N, got {text!r}")
    return int(m[1]), int(m[2])


def current_codes(data, code):
    """The code hashes whose runs in this results file count as made by today's code `code`: `code` itself, and the
    code of every run that `bench verify --record` re-ran at `code` and found bit for bit equal. A change that leaves
    one run of some code exactly as it was did not touch what that code's runs compute (CPU training on the
    record's thread count is deterministic), so its sibling runs of the same code stand too."""
    codes = {code}
    for rec in data.get("runs", {}).values():
        if any(v.get("code") == code and v.get("agree") and v.get("exact") for v in rec.get("verified", [])):
            codes.add(rec.get("provenance", {}).get("code"))
    return codes - {None}


def same_config(a, b):
    return json.loads(json.dumps(a)) == json.loads(json.dumps(b))


class Results:
    """One experiment's results file: {"experiment", "description", "module", "runs": {run_id: record}}, rewritten
    atomically after every run, so a cut sweep keeps what it finished."""

    def __init__(self, path, experiment, module, description=""):
        self.path = path
        self.data = dict(experiment=experiment, module=module, description=description, runs={})
        if os.path.exists(path):
            old = read_json(path)
            self.data["runs"] = old.get("runs", {})

    def reusable(self, run_id, config, code, reuse_stale=False):
        """The finished record of run_id if the current code (hash) and this configuration would make it again;
        else None (train it afresh). reuse_stale: keep a record of other code, marked "stale": true."""
        rec = self.data["runs"].get(run_id)
        if rec is None or not same_config(rec.get("config"), config):
            return None
        if rec.get("provenance", {}).get("code") in current_codes(self.data, code):
            return rec
        if reuse_stale:
            rec["stale"] = True
            self.save()
            return rec
        return None

    def add(self, run_id, record):
        missing = [k for k in ("config", "provenance") if k not in record]
        if missing:
            raise ValueError(f"a run record needs {missing}")
        self.data["runs"][run_id] = record
        self.save()

    def save(self):
        write_json(self.path, self.data)


def checkpoint_matches(out_dir, config, code):
    """Whether the checkpoint in out_dir may be resumed: its provenance.json says the same code and configuration
    made it. Call mark_checkpoint(out_dir, ...) before training into a folder."""
    path = os.path.join(out_dir, "provenance.json")
    if not os.path.isfile(path) or not os.path.isfile(os.path.join(out_dir, "ckpt.pt")):
        return False
    with open(path) as f:
        made = json.load(f)
    return made.get("code") == code and same_config(made.get("config"), config)


def mark_checkpoint(out_dir, config, code):
    write_json(os.path.join(out_dir, "provenance.json"), dict(config=config, code=code))


# ----------------------------------------------------------------------------- re-checking a run

def agrees(old, got, noise):
    """Whether a re-checked number is within `noise` of the committed one: equal numbers always are (also two NaN),
    and an undefined noise (NaN, None) allows no difference."""
    if old == got or (old != old and got != got):
        return True
    return noise == noise and noise is not None and abs(got - old) <= noise


def verify(path, run_id, work=None, record=False, log=print, points=None):
    """Re-run one run of a results file at the current code (its experiment's module does the work) and compare
    every number it names with the committed one. Returns True when they agree. points=N: only up to the run's N-th
    scored point, for the experiments whose rerun() takes `points` (CALM's runs), comparing those points."""
    data = read_json(path)
    if "module" not in data:
        raise UserError(f"{path} names no experiment module: it predates provenance (regenerate it)")
    module = importlib.import_module(data["module"])
    runs = module.runs_of(data) if hasattr(module, "runs_of") else data.get("runs", {})
    if run_id not in runs:
        known = ", ".join(list(runs)[:8]) + (" ..." if len(runs) > 8 else "")
        raise UserError(f"{path} has no run {run_id!r} (it has {known})")
    rec = runs[run_id]
    if "provenance" not in rec:
        raise UserError(f"run {run_id!r} of {path} has no provenance: regenerate it")
    if points is not None:
        if "points" not in inspect.signature(module.rerun).parameters:
            raise UserError(f"--points applies to runs scored at several points (CALM's), not to {data['module']}")
        if not 1 <= points <= len(rec.get("points", [])):
            raise UserError(f"--points must be between 1 and the run's {len(rec.get('points', []))} points, got {points}")
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        new = module.rerun(data["experiment"], run_id, rec, tmp, **({} if points is None else dict(points=points)))
    made, here = rec["provenance"], hardware()
    # Bit for bit only on the same CPU model, thread count and torch: another CPU takes other kernel code paths.
    exact = made.get("threads") == torch.get_num_threads() and made.get("device", "cpu") == "cpu" and \
        made.get("torch") == torch.__version__ and cpu_model(made.get("hardware")) == cpu_model(here)
    rows, agree, within_noise = [], True, True
    now = module.compared(new)
    for key, (old, noise) in module.compared(rec).items():
        if points is not None and key not in now:
            continue  # a later point than the prefix re-trained
        got = now[key][0]
        close = agrees(old, got, noise)
        ok = (got == old or (got != got and old != old)) if exact else close
        agree, within_noise = agree and ok, within_noise and close
        rows.append((key, old, got, noise, ok))
    log(f"{path} :: {run_id} (made at {made['commit'][:10]} on {cpu_model(made.get('hardware'))}, "
        f"{made.get('threads')} thread(s); now on {cpu_model(here)}, {torch.get_num_threads()} thread(s): "
        f"{'exact' if exact else 'within the noise'})"
        + (f" -- its first {points} of {len(rec['points'])} points" if points is not None else ""))
    for key, old, got, noise, ok in rows:
        log(f"  {key}: committed {old:.6g} | now {got:.6g} | noise {noise:.3g} | {'agree' if ok else 'DIFFER'}")
    log("agree" if agree else "differ" + (" (but within the noise)" if within_noise else ""))
    if record:  # read again under the lock: a sweep may have added runs while this one re-ran
        head, dirty = commit()
        outcome = dict(commit=head, dirty=dirty, code=code_hash([data["module"]]), threads=torch.get_num_threads(),
                       hardware=here, agree=agree, exact=exact, within_noise=within_noise,
                       date=time.strftime("%Y-%m-%d %H:%M:%S"))
        if points is not None:
            outcome["points"] = f"first {points} of {len(rec['points'])}"
        with Locked(path):
            data = read_json(path)
            runs = module.runs_of(data) if hasattr(module, "runs_of") else data["runs"]
            runs[run_id].setdefault("verified", []).append(outcome)
            write_json(path, data)
    return agree


def main(argv=None):
    """python -m bench verify results/<file>.json <run-id> [--record] [--points N]"""
    from runtime import OneLineParser
    p = OneLineParser(prog="python -m bench verify", description=__doc__.splitlines()[0])
    p.add_argument("path")
    p.add_argument("run_id")
    p.add_argument("--record", action="store_true", help="add the outcome to the run's 'verified' list")
    p.add_argument("--points", type=int, default=None,
                   help="CALM's runs: re-train only up to the N-th scored point and compare those (minutes, not hours)")
    a = p.parse_args(argv)
    if not verify(a.path, a.run_id, record=a.record, points=a.points):
        raise SystemExit(1)
