"""The README's promises, attacked: bad input is one line (exit 2) and never touches a good checkpoint; non-finite
weights or metrics are never saved and the message says truly what is kept; loading a checkpoint runs no code;
--resume sees what was typed; one training per out_dir; file: datasets that are not text; progress lines; and
imports that flow one way (core <- runtime <- paper files <- train.py / sample.py)."""
import ast
import dataclasses
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import objectives
import runtime
import sample
import score
import train
import trainer
from gpt import GPTConfig
from util import one_line_error

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--dataset", "shakespeare", "--tokenizer", "bytes", "--n_layer", "2", "--n_head", "2", "--n_embd", "32",
        "--block_size", "32", "--batch_size", "4", "--eval_iters", "2", "--brier_positions", "0",
        "--sample_tokens", "0", "--log_interval", "1", "--warmup_iters", "1", "--device", "cpu"]


def run(out_dir, *extra):
    return train.main(TINY + ["--out_dir", str(out_dir), *extra])


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A good 2-iteration checkpoint (learning rate 3e-3) and its bytes, which no bad input may change."""
    out = tmp_path_factory.mktemp("good")
    run(out, "--max_iters", "2", "--eval_interval", "2", "--learning_rate", "3e-3")
    return out, (out / "ckpt.pt").read_bytes()


class Payload:
    """A pickle that creates `marker` when unpickled (what a malicious checkpoint could do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def write_malicious(path, marker):
    torch.save({"model": {}, "args": {}, "objective": "ntp", "iter": 0, "extra": Payload(marker)}, path)


# ----------------------------------------------------------------------------- every bad input: one line

def hand_made(tmp, name, **state):
    path = tmp / f"{name}.pt"
    torch.save(state, path)
    return str(path)


def bad_inputs(good_dir, tmp):
    """(tool, argv, words the one-line error must contain): every input the issue listed, and a few more."""
    ckpt = str(good_dir / "ckpt.pt")
    fresh = ["--out_dir", str(tmp / "fresh")]
    (tmp / "empty.txt").write_bytes(b"")
    (tmp / "binary.bin").write_bytes(bytes(range(256)) * 64)
    (tmp / "latin1.txt").write_bytes("café naïve ".encode("latin-1") * 500)
    weights = torch.load(ckpt, weights_only=True)
    no_objective = hand_made(tmp, "no_objective", model=weights["model"], args=weights["args"])
    bad_args = hand_made(tmp, "bad_args", model=weights["model"], objective="ntp",
                         args={**weights["args"], "n_layer": "two"})
    cuda = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
    return [
        (train.main, TINY + fresh + ["--eval_interval", "0"], "--eval_interval must be at least 1"),
        (train.main, TINY + fresh + ["--log_interval", "0"], "--log_interval must be at least 1"),
        (train.main, TINY + fresh + ["--n_head", "0"], "--n_head must be at least 1"),
        (train.main, TINY + fresh + ["--n_embd", "0"], "--n_embd must be at least 1"),
        (train.main, TINY + fresh + ["--learning_rate", "-1"], "--learning_rate must be >= 0"),
        (train.main, TINY + fresh + ["--dropout", "1.5"], "--dropout must be in [0, 1)"),
        (train.main, TINY + fresh + ["--min_lr", "nan"], "--min_lr must be a finite number"),
        (train.main, TINY + fresh + ["--learning_rate", "inf"], "--learning_rate must be a finite number"),
        (train.main, TINY + fresh + ["--seed", "-1"], "--seed must be in 0 .. 2**32 - 1"),
        (train.main, TINY + fresh + ["--compile", "maybe"], "expected true or false"),
        (train.main, TINY + fresh + ["--device", cuda], f"--device {cuda}"),
        (train.main, TINY + fresh + ["--device", "gpu"], "unknown --device 'gpu'"),
        (train.main, TINY + fresh + ["--dataset", f"file:{tmp / 'empty.txt'}"], "dataset file is empty"),
        (train.main, TINY + fresh + ["--dataset", f"file:{tmp / 'binary.bin'}"], "is binary, not text"),
        (train.main, TINY + fresh + ["--dataset", f"file:{tmp / 'latin1.txt'}"], "not UTF-8 text (1,000 invalid"),
        (train.main, TINY + ["--out_dir", str(good_dir), "--max_iters", "4"], "exists: pass --resume"),
        (train.main, TINY + ["--out_dir", str(good_dir), "--resume", "--max_iters", "1"], "past --max_iters 1"),
        # typed flags that equal the defaults (4 x 128) but not the checkpoint (2 x 32)
        (train.main, TINY[:4] + ["--out_dir", str(good_dir), "--resume", "--max_iters", "4", "--n_layer", "4",
                                 "--n_embd", "128"], "checkpoint has n_layer=2 but --n_layer 4 was given"),
        (train.main, TINY + ["--out_dir", str(good_dir), "--resume", "--objective", "mtp"], "--objective ntp"),
        (sample.main, ["--ckpt", ckpt, "--top_k", "0"], "--top_k must be at least 1, got 0"),
        (sample.main, ["--ckpt", ckpt, "--top_k", "-3"], "--top_k must be at least 1, got -3"),
        (sample.main, ["--ckpt", ckpt, "--temperature", "nan"], "--temperature must be a finite number"),
        (sample.main, ["--ckpt", ckpt, "--temperature", "-1"], "--temperature must be >= 0"),
        (sample.main, ["--ckpt", ckpt, "--max_new_tokens", "0"], "--max_new_tokens must be at least 1"),
        (sample.main, ["--ckpt", ckpt, "--device", cuda], f"--device {cuda}"),
        (sample.main, ["--ckpt", no_objective], "it lacks objective"),
        (sample.main, ["--ckpt", bad_args], "n_layer='two', which is not of type int"),
        (sample.main, ["--ckpt", str(tmp / "missing.pt")], "no checkpoint at"),
        (score.main, ["--ckpt", ckpt, "--positions", "1"], "--positions must be at least 2"),
        (score.main, ["--ckpt", ckpt, "--positions", "100000000"], "GiB of windows"),
        (score.main, ["--ckpt", no_objective], "it lacks objective"),
    ]


def test_every_bad_input_is_one_line_and_leaves_the_good_checkpoint_alone(good, tmp_path, capsys):
    good_dir, before = good
    for tool, argv, words in bad_inputs(good_dir, tmp_path):
        err = one_line_error(capsys, tool, argv)
        assert words in err, (argv, err)
        assert (good_dir / "ckpt.pt").read_bytes() == before, argv
    assert not (tmp_path / "fresh" / "ckpt.pt").exists()


def test_the_real_command_lines_print_one_line_without_traceback(good):
    for script, argv in (("train.py", TINY + ["--n_head", "0"]), ("sample.py", ["--ckpt", str(good[0] / "ckpt.pt"),
                                                                               "--top_k", "0"])):
        proc = subprocess.run([sys.executable, str(ROOT / script), *argv], cwd=ROOT, capture_output=True, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=120)
        assert proc.returncode == 2 and proc.stdout == "", proc.stderr
        assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


def numeric_flags(parser):
    return [a.dest for a in parser._actions if a.type in (int, float)]


def train_parser_flags(objective):
    classes = [trainer.TrainConfig, GPTConfig, *objectives.get_objective(objective).configs]
    return [f.name for c in classes for f in dataclasses.fields(c) if f.type in (int, float) and f.name != "vocab_size"]


@pytest.mark.parametrize("objective", list(objectives.OBJECTIVES))
def test_every_numeric_flag_is_checked_by_construction(objective):
    """No list of flags here: whatever numeric field an objective adds is refused as NaN and as -1."""
    flags = train_parser_flags(objective)
    assert "learning_rate" in flags and "n_layer" in flags
    for name in flags:
        for value in ("nan", "-1"):
            with pytest.raises(runtime.UserError, match=f"--{name}"):
                trainer.parse_args(["--objective", objective, f"--{name}", value])
    for parser in (sample.make_parser(), score.make_parser()):
        for name in numeric_flags(parser):
            for value in ("nan", "-1"):
                with pytest.raises(runtime.UserError, match=f"--{name}"):
                    parser.parse_args([f"--{name}", value])


# ----------------------------------------------------------------------------- non-finite numbers are never saved

def kept_iteration(err):
    return int(re.search(r"last good checkpoint \(iteration (\d+)\) is kept", err).group(1))


def test_divergence_just_before_an_eval_never_overwrites_the_good_checkpoint(good, tmp_path, capsys):
    good_dir, before = good
    # eval after every update: the update that blows up is followed by an eval and a save, before any loss check
    err = one_line_error(capsys, run, good_dir, "--resume", "--max_iters", "40", "--eval_interval", "1",
                         "--learning_rate", "1e10", "--grad_clip", "0", "--warmup_iters", "0")
    assert "is not finite at iteration" in err and kept_iteration(err) == 2
    assert (good_dir / "ckpt.pt").read_bytes() == before
    # a fresh diverging run: the message names the checkpoint really on disk, and it is finite
    err = one_line_error(capsys, run, tmp_path / "fresh", "--max_iters", "40", "--eval_interval", "3",
                         "--learning_rate", "1e10", "--grad_clip", "0", "--warmup_iters", "0")
    on_disk = runtime.load_checkpoint(str(tmp_path / "fresh" / "ckpt.pt"))
    assert on_disk["iter"] == kept_iteration(err) and runtime.first_non_finite(on_disk) is None


def test_running_out_of_memory_is_one_line_naming_the_kept_checkpoint(good, monkeypatch, capsys):
    good_dir, before = good
    calls, real = [], trainer.forward_backward

    def oom_on_the_second_step(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(*a, **k)
    monkeypatch.setattr(trainer, "forward_backward", oom_on_the_second_step)
    err = one_line_error(capsys, run, good_dir, "--resume", "--max_iters", "6", "--eval_interval", "6")
    assert "out of memory at iteration 3" in err and kept_iteration(err) == 2
    assert (good_dir / "ckpt.pt").read_bytes() == before


def test_save_checkpoint_refuses_nan_weights_and_metrics(tmp_path):
    for state in ({"model": {"w": torch.tensor([1.0, float("nan")])}}, {"metrics": {"val_loss": float("inf")}}):
        with pytest.raises(runtime.UserError, match="not finite"):
            runtime.save_checkpoint(str(tmp_path / "x.pt"), state)
        assert not (tmp_path / "x.pt").exists() and not (tmp_path / "x.pt.tmp").exists()


# ----------------------------------------------------------------------------- loading runs no code

def test_a_malicious_checkpoint_is_refused_without_running_it(good, tmp_path, capsys):
    proof = tmp_path / "proof"
    write_malicious(tmp_path / "proof.pt", proof)
    torch.load(tmp_path / "proof.pt", weights_only=False)  # the payload works when pickle is trusted
    assert proof.exists()
    marker = tmp_path / "pwned"
    evil_dir = tmp_path / "evil"
    evil_dir.mkdir()
    write_malicious(evil_dir / "ckpt.pt", marker)
    path = str(evil_dir / "ckpt.pt")
    for tool, argv in ((sample.main, ["--ckpt", path]), (score.main, ["--ckpt", path]),
                       (train.main, TINY + ["--out_dir", str(evil_dir), "--resume", "--max_iters", "4"])):
        assert "refused without being run" in one_line_error(capsys, tool, argv)
    with pytest.raises(runtime.UserError, match="Python object io.open"):
        runtime.load_checkpoint(path)
    assert not marker.exists()
    # what the project really writes loads: tensors, plain values, and old checkpoints' numpy RNG state
    ckpt = runtime.load_checkpoint(str(good[0] / "ckpt.pt"))
    ckpt["rng"]["numpy"] = np.random.get_state()
    torch.save(ckpt, tmp_path / "old.pt")
    assert runtime.load_checkpoint(str(tmp_path / "old.pt"))["rng"]["numpy"][0] == "MT19937"


# ----------------------------------------------------------------------------- --resume

def test_resume_reports_schedule_changes_and_stops_at_max_iters(good, capsys):
    good_dir, before = good
    run(good_dir, "--resume", "--max_iters", "2")
    assert "nothing to train" in capsys.readouterr().out
    assert (good_dir / "ckpt.pt").read_bytes() == before
    work = good_dir.parent / "resumed"
    work.mkdir()
    (work / "ckpt.pt").write_bytes(before)
    run(work, "--resume", "--max_iters", "3", "--eval_interval", "3")  # learning rate not typed: the default
    out = capsys.readouterr().out
    assert "--learning_rate 0.001 (checkpoint: 0.003)" in out and "--lr_decay_iters 3 (checkpoint: 2)" in out
    assert runtime.load_checkpoint(str(work / "ckpt.pt"))["iter"] == 3


# ----------------------------------------------------------------------------- one training per out_dir

def test_a_second_run_on_a_locked_out_dir_fails_and_a_killed_holder_leaves_no_lock(good, tmp_path, capsys):
    out = tmp_path / "busy"
    holder = subprocess.Popen([sys.executable, "-c", "import runtime, sys, time; runtime.OutDirLock(sys.argv[1]); "
                               "print('locked', flush=True); time.sleep(120)", str(out)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        (out / "ckpt.pt").write_bytes(good[1])
        err = one_line_error(capsys, run, out, "--resume", "--max_iters", "3")
        assert f"in use by another training run (pid {holder.pid})" in err
        with pytest.raises(runtime.UserError, match="in use"):
            runtime.OutDirLock(str(out))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    (out / "ckpt.pt.tmp").write_bytes(b"half a checkpoint")  # what a run killed mid-save leaves
    run(out, "--resume", "--max_iters", "3")
    assert "removed" in capsys.readouterr().out and not (out / "ckpt.pt.tmp").exists()
    assert runtime.load_checkpoint(str(out / "ckpt.pt"))["iter"] == 3
    with runtime.OutDirLock(str(out)):  # released when the run ended
        pass


# ----------------------------------------------------------------------------- datasets that are not text

def test_a_few_invalid_utf8_bytes_are_counted_in_a_warning(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LMPAPERS_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "mostly.txt"
    text.write_bytes(b"plain text line\n" * 400 + b"\xff\xfe bad \xc3\n")  # 3: each lone byte, and a cut 2-byte one
    ds = data.load_data(f"file:{text}", "bytes")
    assert "has 3 invalid UTF-8 sequences" in capsys.readouterr().err
    data.load_data(f"file:{text}", "bytes")  # cached: still warned
    assert "has 3 invalid UTF-8 sequences" in capsys.readouterr().err
    assert len(ds.split("train")) > 5000


# ----------------------------------------------------------------------------- what long or odd runs print

def test_long_block_size_warns_with_its_cost(tmp_path, capsys):
    text = tmp_path / "long.txt"
    text.write_text("abcdefgh " * 6000)
    train.main(["--dataset", f"file:{text}", "--tokenizer", "bytes", "--n_layer", "1", "--n_head", "2",
                "--n_embd", "8", "--block_size", "4200", "--batch_size", "1", "--max_iters", "1", "--eval_iters", "1",
                "--brier_positions", "0", "--sample_tokens", "0", "--out_dir", str(tmp_path / "o")])
    captured = capsys.readouterr()
    assert re.search(r"WARNING: --block_size 4200: .* FLOPs \(\d+% attention", captured.err)
    assert "iter 1/1" in captured.out and "ETA" in captured.out


def test_progress_lines_and_an_explained_brierlm_uncertainty(good, monkeypatch, capsys):
    monkeypatch.setattr(runtime, "PROGRESS_SECONDS", 0.0)
    ckpt = str(good[0] / "ckpt.pt")
    score.main(["--ckpt", ckpt, "--positions", "16", "--device", "cpu"])
    captured = capsys.readouterr()
    assert re.search(r"BrierLM: 16/16 positions \| .* \| ETA 0m00s", captured.err)
    assert "BrierLM 0.000 (no ±: Brier-" in captured.out and "nan" not in captured.out  # an untrained model
    sample.main(["--ckpt", ckpt, "--max_new_tokens", "30", "--num_samples", "2", "--device", "cpu"])
    err = capsys.readouterr().err
    assert re.search(r"sampling: 60/60 tokens \| .* ETA", err) and "sampling: 1/60" in err


def test_brierlm_uncertainty_is_finite_or_explained():
    e = np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, -1.0]])
    assert score.uncertainty(e).startswith(" (no ±: Brier-3, Brier-4 <= 0")
    e = np.random.default_rng(0).uniform(0.2, 0.8, size=(50, 4))
    assert re.fullmatch(r"±\d+\.\d{3}", score.uncertainty(e))


def test_sample_on_an_autoencoder_shows_the_round_trip(tmp_path, capsys):
    train.main(["--objective", "autoencoder", "--dataset", "shakespeare", "--block_size", "16", "--max_iters", "2",
                "--eval_iters", "1", "--batch_size", "4", "--sample_tokens", "0", "--out_dir", str(tmp_path)])
    capsys.readouterr()
    sample.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--prompt", "ROMEO:"])
    captured = capsys.readouterr()
    assert "reconstructs text" in captured.err and "input:  'ROMEO:'" in captured.out
    assert re.search(r"\d/6 tokens reconstructed", captured.out)


# ----------------------------------------------------------------------------- imports flow one way

HELPER, CORE = {"runtime"}, {"gpt", "data"}
PAPERS = {"brierlm", "mtp", "calm", "dispersion"}
WIRING = {"calm_comparison_heads", "objectives", "trainer"}
TOOLS = {"train", "sample", "score"}  # the command lines: nothing imports them (the tests call their main())
# what each file at the root may import from the repository
ALLOWED = {"runtime": set(), **dict.fromkeys(CORE, HELPER), **dict.fromkeys(PAPERS, CORE | HELPER),
           "calm_comparison_heads": CORE | HELPER | {"calm"},  # the heads CALM is compared with plug into calm.CALM
           "objectives": CORE | HELPER | PAPERS | {"calm_comparison_heads"},
           "trainer": CORE | HELPER | PAPERS | {"objectives"},
           **dict.fromkeys(TOOLS, CORE | HELPER | PAPERS | {"objectives", "trainer"})}


def repository_modules():
    """{module name: path} of every Python file outside tests/: the root, bench/ and tutorials/ (and below)."""
    mods = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ("tests", "out", ".cache") or rel.parts[0].startswith("."):
            continue
        if rel.parts[0] == "tutorials":  # the tutorials put their own folders on sys.path
            name = path.stem if len(rel.parts) == 2 or rel.parts[1] != "keyfigs" else f"keyfigs.{path.stem}"
        else:
            name = ".".join(rel.with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = path
    return mods


def local_imports(path, names):
    """Repository modules that the file imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m in names} - {path.stem}


def test_imports_flow_one_way():
    mods = repository_modules()
    root = {n for n, p in mods.items() if p.parent == ROOT}
    assert root == set(ALLOWED), "a new file at the root: say in ALLOWED what it may import"
    graph = {n: local_imports(p, mods) for n, p in mods.items()}
    wrong = {(n, m) for n in root for m in graph[n] - ALLOWED[n]}
    assert wrong == set(), "root files import only what their layer may"
    importers_of_tools = {(n, m) for n, deps in graph.items() for m in deps & TOOLS}
    assert importers_of_tools == set(), "nothing imports a command-line tool"
    for n in mods:  # no cycles: depth-first search from every module
        stack, seen = [(n, [n])], set()
        while stack:
            node, trail = stack.pop()
            for m in graph.get(node, ()):
                assert m != n, f"import cycle: {' -> '.join(trail + [m])}"
                if m not in seen:
                    seen.add(m)
                    stack.append((m, trail + [m]))


def test_the_import_check_would_catch_a_violation(tmp_path):
    """The check above is not vacuous: a paper file importing the trainer, and a cycle, are both seen."""
    paper = tmp_path / "calm.py"
    paper.write_text("import trainer\nfrom runtime import UserError\n")
    assert local_imports(paper, {"trainer", "runtime"}) == {"trainer", "runtime"}
    mods = repository_modules()
    assert {"bench.table", "bench.calm_runs", "keyfigs.calm", "run", "objectives"} <= set(mods)
    assert "trainer" in local_imports(mods["bench.table"], mods)
