"""The reliability promises, attacked: bad input is one line (exit 2) before any work, and leaves every directory as
it was (one table of command lines); non-finite weights or metrics are never saved, and a divergence, an overflow,
running out of memory or a full disk stops with a message that says truly what is kept; under torchrun only rank 0
speaks; an interrupted CALM quickstart never builds on its unfinished autoencoder; loading a checkpoint runs no
code; --resume sees what was typed; one training per out_dir, no .lock left behind; file: datasets that are not
text; caches that heal; sampling at T -> 0 returns; progress lines; and imports that flow one way (core <- runtime
<- paper files <- train.py / sample.py)."""
import ast
import dataclasses
import errno
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import calm
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
V1 = ROOT / "tests" / "data" / "checkpoints_v1"  # tiny checkpoints of every objective (test_old_checkpoints.py)
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
    """(tool, argv, words the one-line error must contain): every input the issues listed, and their kin."""
    ckpt = str(good_dir / "ckpt.pt")
    fresh = ["--out_dir", str(tmp / "fresh")]
    (tmp / "empty.txt").write_bytes(b"")
    (tmp / "one_byte.txt").write_bytes(b"a")
    (tmp / "binary.bin").write_bytes(bytes(range(256)) * 64)
    (tmp / "latin1.txt").write_bytes("café naïve ".encode("latin-1") * 500)
    (tmp / "a_file").write_text("not a directory")
    for name in ("ckpt.pt", "ckpt.pt.tmp", ".lock"):  # a directory where the run writes a file
        (tmp / f"dir_{name}" / name).mkdir(parents=True)
    weights = torch.load(ckpt, weights_only=True)
    no_objective = hand_made(tmp, "no_objective", model=weights["model"], args=weights["args"])
    bad_args = hand_made(tmp, "bad_args", model=weights["model"], objective="ntp",
                         args={**weights["args"], "n_layer": "two"})
    nan = {**weights, "model": {**weights["model"], "wte.weight": weights["model"]["wte.weight"] * float("nan")}}
    (tmp / "nan").mkdir()
    torch.save(nan, tmp / "nan" / "ckpt.pt")
    w = weights["model"]["wte.weight"]  # finite, but so large that the logits overflow
    huge = hand_made(tmp, "huge", **{**weights, "model": {**weights["model"], "wte.weight": w * 3e38 / w.abs().max(),
                                                          "lm_head.weight": w * 3e38 / w.abs().max()}})
    calm_ckpt, ae_ckpt = str(V1 / "calm.pt"), str(V1 / "autoencoder.pt")
    cuda = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
    calm = TINY + fresh + ["--objective", "calm"]
    autoencoder = ["--objective", "autoencoder", "--dataset", "shakespeare", "--block_size", "32", "--device", "cpu"]
    cases = [
        (train.main, TINY + fresh + ["--eval_interval", "0"], "--eval_interval must be at least 1"),
        (train.main, TINY + fresh + ["--log_interval", "0"], "--log_interval must be at least 1"),
        (train.main, TINY + fresh + ["--n_head", "0"], "--n_head must be at least 1"),
        (train.main, TINY + fresh + ["--n_embd", "0"], "--n_embd must be at least 1"),
        (train.main, TINY + fresh + ["--learning_rate", "-1"], "--learning_rate must be >= 0"),
        (train.main, TINY + fresh + ["--learning_rate", "-1e-3"], "--learning_rate must be >= 0, got -0.001"),
        (train.main, TINY + fresh + ["--weight_decay", "-inf"], "--weight_decay must be a finite number >= 0"),
        (train.main, TINY + fresh + ["--dropout", "1.5"], "--dropout must be in [0, 1)"),
        (train.main, TINY + fresh + ["--min_lr", "nan"], "--min_lr must be a finite number"),
        (train.main, TINY + fresh + ["--learning_rate", "inf"], "--learning_rate must be a finite number"),
        (train.main, TINY + fresh + ["--seed", "-1"], "--seed must be in 0 .. 2**32 - 1"),
        (train.main, TINY + fresh + ["--compile", "maybe"], "expected true or false"),
        (train.main, TINY + fresh + ["--device", cuda], f"--device {cuda}"),
        (train.main, TINY + fresh + ["--device", "gpu"], "unknown --device 'gpu'"),
        (train.main, TINY + fresh + ["--dataset", f"file:{tmp / 'empty.txt'}"], "dataset file is empty"),
        (train.main, TINY + fresh + ["--dataset", f"file:{tmp / 'one_byte.txt'}"], "larger than the 'train' split"),
        (train.main, TINY + fresh + ["--dataset", f"file:{tmp / 'binary.bin'}"], "is binary, not text"),
        (train.main, TINY + fresh + ["--dataset", f"file:{tmp / 'latin1.txt'}"], "not UTF-8 text (1,000 invalid"),
        (train.main, TINY + fresh + ["--dataset", f"file:{tmp}"], "is a directory; give a text file"),
        (train.main, TINY + fresh + ["--dataset", f"file:{tmp / 'missing.txt'}"], "dataset file not found"),
        (train.main, TINY + fresh + ["--dataset", f"file:{os.devnull}"], "is not a regular file"),
        (train.main, TINY + fresh + ["--dataset", "shakespeare+polynomial"], "'polynomial' cannot be part of a mix"),
        (train.main, TINY + fresh + ["--tokenizer", "induction"], "--tokenizer induction is the tokenizer of"),
        (train.main, TINY + fresh + ["--tokenizer", "sentencepiece"], "unknown tokenizer 'sentencepiece'"),
        (train.main, TINY + fresh + ["--block_size", "100000000"], "is larger than the 'train' split"),
        (train.main, TINY + fresh + ["--brier_positions", "100000000"], "GiB of windows"),
        (train.main, TINY + fresh + ["--brier_positions", "8", "--block_size", "4"], "BrierLM needs block_size >= 5"),
        (train.main, TINY + fresh + ["--resume", "--overwrite"], "pass one of them"),
        (train.main, TINY + fresh + ["--min_lr", "0.5"], "--min_lr 0.5 is above --learning_rate"),
        (train.main, TINY + fresh + ["--temp_sampler", "exact"], "unrecognized arguments: --temp_sampler"),
        (train.main, TINY + fresh + ["--objective", "mtp", "--n_future", "3"], "--n_future 3 needs --n_layer >= 3"),
        (train.main, TINY + ["--out_dir", str(tmp / "a_file")], "exists and is not a directory"),
        (train.main, TINY + ["--out_dir", os.devnull], "exists and is not a directory"),
        (train.main, TINY + ["--out_dir", str(tmp / "a_file" / "sub")], "which exists and is not a directory"),
        (train.main, TINY + ["--out_dir", str(tmp / "dir_ckpt.pt"), "--overwrite"], "ckpt.pt is not a file"),
        (train.main, TINY + ["--out_dir", str(tmp / "dir_ckpt.pt.tmp")], "ckpt.pt.tmp is not a file"),
        (train.main, TINY + ["--out_dir", str(tmp / "dir_.lock")], ".lock is not a file"),
        (train.main, TINY + ["--out_dir", str(good_dir), "--max_iters", "4"], "exists: pass --resume"),
        (train.main, TINY + ["--out_dir", str(good_dir), "--resume", "--max_iters", "1"], "past --max_iters 1"),
        # typed flags that equal the defaults (4 x 128) but not the checkpoint (2 x 32)
        (train.main, TINY[:4] + ["--out_dir", str(good_dir), "--resume", "--max_iters", "4", "--n_layer", "4",
                                 "--n_embd", "128"], "checkpoint has n_layer=2 but --n_layer 4 was given"),
        (train.main, TINY + ["--out_dir", str(good_dir), "--resume", "--objective", "mtp"], "--objective ntp"),
        (train.main, TINY + ["--out_dir", str(tmp / "nan"), "--resume", "--max_iters", "4"],
         "wte.weight is not finite; start again with --overwrite"),
        (train.main, calm + ["--head", "foo"], "--head must be one of energy, flow, diffusion, mse"),
        (train.main, calm + ["--flow_steps", "5"], "--flow_steps is a flag of --head flow, not of --head energy"),
        (train.main, calm + ["--num_samples", "1"], "--num_samples must be at least 2 for the energy head"),
        (train.main, calm + ["--temp_sampler", "foo"], "--temp_sampler must be 'batch' or 'exact'"),
        (train.main, calm + ["--chunk_size", "3"], "must be >= 1 and divide block_size=32"),
        (train.main, calm + ["--autoencoder", str(tmp)], "is a directory, not a checkpoint"),
        (train.main, calm + ["--autoencoder", calm_ckpt], "is a 'calm' checkpoint, not an autoencoder"),
        (train.main, calm + ["--autoencoder", ae_ckpt, "--ae_iters", "5"], "with --autoencoder PATH none is trained"),
        (train.main, calm + ["--eval_noise", "0.1"], "--eval_noise is a flag of --objective autoencoder"),
        (train.main, autoencoder + fresh + ["--n_layer", "4"], "--n_layer shapes a Transformer"),
        (train.main, autoencoder + fresh + ["--dropout", "0.1"], "--dropout shapes a Transformer"),
        (sample.main, ["--ckpt", ckpt, "--top_k", "0"], "--top_k must be at least 1, got 0"),
        (sample.main, ["--ckpt", ckpt, "--top_k", "-3"], "--top_k must be at least 1, got -3"),
        (sample.main, ["--ckpt", ckpt, "--temperature", "nan"], "--temperature must be a finite number"),
        (sample.main, ["--ckpt", ckpt, "--temperature", "-1"], "--temperature must be >= 0"),
        (sample.main, ["--ckpt", ckpt, "--temperature", "-1e-30"], "--temperature must be >= 0"),
        (sample.main, ["--ckpt", ckpt, "--max_new_tokens", "0"], "--max_new_tokens must be at least 1"),
        (sample.main, ["--ckpt", ckpt, "--device", cuda], f"--device {cuda}"),
        (sample.main, ["--ckpt", no_objective], "it lacks objective"),
        (sample.main, ["--ckpt", bad_args], "n_layer='two', which is not of type int"),
        (sample.main, ["--ckpt", str(tmp / "missing.pt")], "no checkpoint at"),
        (sample.main, ["--ckpt", str(tmp)], "is a directory, not a checkpoint"),
        (sample.main, ["--ckpt", str(tmp / "nan" / "ckpt.pt")], "wte.weight is not finite"),
        (sample.main, ["--ckpt", huge], "the model's probabilities are not finite"),
        (sample.main, ["--ckpt", ckpt, "--temp_sampler", "exact"], "--temp_sampler is for calm checkpoints"),
        (sample.main, ["--ckpt", calm_ckpt, "--speculative"], "--speculative needs a multi-token (mtp) checkpoint"),
        (sample.main, ["--ckpt", calm_ckpt, "--top_k", "5"], "--top_k does not apply to a calm checkpoint"),
        (sample.main, ["--ckpt", calm_ckpt, "--temperature", "1.5"], "CALM temperature must be in (0, 1]"),
        (sample.main, ["--ckpt", ae_ckpt, "--speculative"], "this one is autoencoder"),
        (score.main, ["--ckpt", ckpt, "--positions", "1"], "--positions must be at least 2"),
        (score.main, ["--ckpt", ckpt, "--positions", "100000000"], "GiB of windows"),
        (score.main, ["--ckpt", no_objective], "it lacks objective"),
        (score.main, ["--ckpt", str(tmp / "nan" / "ckpt.pt")], "wte.weight is not finite"),
        (score.main, ["--ckpt", huge, "--positions", "8"], "the model's probabilities are not finite"),
        (score.main, ["--ckpt", ckpt, "--split", "test"], "has no split 'test'"),
    ]
    if runtime.available_memory("cpu") is not None:  # sizes that cannot fit: refused before any allocation
        cases += [(train.main, TINY + fresh + flags, "GiB free") for flags in (
            ["--n_embd", "1000000000"], ["--n_layer", "100000000"], ["--batch_size", "100000000"],
            ["--objective", "calm", "--head_dim", "10000000"])]
        cases.append((train.main, autoencoder + fresh + ["--ae_dim", "1000000000"], "GiB free"))
    return cases


def files_under(*roots):
    """{path: its bytes (None for a directory)} of everything under roots: what a refused command must not change."""
    return {p: None if p.is_dir() else p.read_bytes() for root in roots for p in sorted(Path(root).rglob("*"))}


def test_every_bad_input_is_one_line_and_leaves_every_out_dir_as_it_was(good, tmp_path, capsys):
    """Each bad input: exit 2, exactly one line on stderr, 'error: ...', and no file, directory or .lock written
    or changed anywhere (the good checkpoint included)."""
    good_dir, before = good
    for tool, argv, words in bad_inputs(good_dir, tmp_path):
        files = files_under(good_dir, tmp_path)
        err = one_line_error(capsys, tool, argv)
        assert words in err, (argv, err)
        assert files_under(good_dir, tmp_path) == files, argv
    assert (good_dir / "ckpt.pt").read_bytes() == before and not (tmp_path / "fresh").exists()


def test_the_real_command_lines_print_one_line_without_traceback(good):
    for script, argv in (("train.py", TINY + ["--n_head", "0"]), ("sample.py", ["--ckpt", str(good[0] / "ckpt.pt"),
                                                                               "--top_k", "0"])):
        proc = subprocess.run([sys.executable, str(ROOT / script), *argv], cwd=ROOT, capture_output=True, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=120)
        assert proc.returncode == 2 and proc.stdout == "", proc.stderr
        assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


def test_under_torchrun_rank_0_alone_prints_the_line_even_when_it_is_the_slowest(tmp_path):
    """No rank prints a traceback or a second copy of the line (torchrun then reports the failed ranks in its own
    words, which no worker can silence). torchrun stops every rank as soon as one exits, so a rank 0 that reaches the
    check last must still print: here rank 0 starts 3 s late (as on a busy machine)."""
    late = tmp_path / "late_rank0.py"
    late.write_text("import os, runpy, sys, time\n"
                    "if os.environ.get('RANK') == '0':\n    time.sleep(3)\n"
                    f"sys.argv[0] = {str(ROOT / 'train.py')!r}\nsys.path.insert(0, {str(ROOT)!r})\n"
                    "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29547",
           str(late), *TINY, "--n_head", "0", "--out_dir", str(tmp_path / "o")]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0 and proc.stdout == ""
    assert [line for line in proc.stderr.splitlines() if "error:" in line] == ["error: --n_head must be at least 1, "
                                                                               "got 0"]
    assert re.search(r"exitcode\s*:\s*2", proc.stderr) and f'File "{ROOT}' not in proc.stderr
    assert not (tmp_path / "o").exists()


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


def test_an_update_that_overflows_is_the_divergence_message_and_leaves_no_lock(tmp_path, capsys):
    err = one_line_error(capsys, run, tmp_path, "--max_iters", "3", "--eval_interval", "3", "--learning_rate", "1e39",
                         "--warmup_iters", "0", "--grad_clip", "0")
    assert "training diverged: the update of iteration 0 overflows; lower --learning_rate" in err
    assert kept_iteration(err) == 0 == runtime.load_checkpoint(str(tmp_path / "ckpt.pt"))["iter"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]  # no .lock, no ckpt.pt.tmp


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs POSIX file size limits")
def test_a_full_disk_during_a_save_is_one_line_naming_the_kept_checkpoint(good, tmp_path):
    """A real failed write: the run resumes the good checkpoint under a file size limit smaller than a checkpoint
    (RLIMIT_FSIZE; Python ignores SIGXFSZ), so its first save fails inside torch.save as on a full disk."""
    work = tmp_path / "full"
    work.mkdir()
    (work / "ckpt.pt").write_bytes(good[1])
    code = ("import resource, sys, trainer; hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]; "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, hard)); trainer.main(sys.argv[1:])")
    proc = subprocess.run([sys.executable, "-c", code, *TINY, "--out_dir", str(work), "--resume", "--max_iters", "4",
                           "--eval_interval", "2"], cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr[-3000:]
    assert proc.stderr.startswith(f"error: could not write {work / 'ckpt.pt'} (the write failed: is the disk full?)")
    assert kept_iteration(proc.stderr) == 2 and "inline_container" not in proc.stderr
    assert (work / "ckpt.pt").read_bytes() == good[1] and sorted(p.name for p in work.iterdir()) == ["ckpt.pt"]


def test_a_read_only_out_dir_is_one_line_and_nothing_is_written(tmp_path, monkeypatch, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)  # read-only for a normal user; root writes anyway, so tell os.access what a read-only mount says
    real_access, real_open = os.access, os.open
    if os.geteuid() == 0:
        monkeypatch.setattr(os, "access", lambda path, mode, **k: Path(path) != ro and real_access(path, mode, **k))
    try:
        err = one_line_error(capsys, run, ro / "run", "--max_iters", "1")
        assert f"{ro} is not writable" in err
        monkeypatch.undo()
        ro.chmod(0o755)

        def erofs(path, *a, **k):  # the file system turns read-only between the checks and the lock
            if str(path).endswith(".lock"):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
            return real_open(path, *a, **k)
        monkeypatch.setattr(os, "open", erofs)
        err = one_line_error(capsys, run, ro, "--max_iters", "2")
        assert f"cannot write in --out_dir {ro} ({os.strerror(errno.EROFS)})" in err
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


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


# ----------------------------------------------------------------------------- an interrupted quickstart

# python train.py --objective calm, in miniature: an autoencoder of 20 iterations (saved every 2), then CALM
QUICKSTART = ["--objective", "calm", "--dataset", "shakespeare", "--block_size", "32", "--batch_size", "4",
              "--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--ae_iters", "20", "--max_iters", "1",
              "--eval_interval", "1", "--eval_iters", "1", "--brier_positions", "0", "--sample_tokens", "0",
              "--device", "cpu"]
# train.py, killed (SIGKILL: no clean-up at all) right after the autoencoder saved its checkpoint at iteration N
KILLED_AFTER_SAVE = """import os, signal, sys, trainer
save, at = trainer.Saver.save, int(sys.argv.pop(1))
def save_then_die(self, it, *a):
    save(self, it, *a)
    if self.args.objective == "autoencoder" and it == at:
        os.kill(os.getpid(), signal.SIGKILL)
trainer.Saver.save = save_then_die
trainer.main(sys.argv[1:])
"""


def test_an_interrupted_quickstart_never_builds_on_its_unfinished_autoencoder(tmp_path, capsys):
    """Killed during the autoencoder: a changed command is refused before any work, and the same command resumes
    the autoencoder to its end (exactly: the same weights and metrics as an uninterrupted run), and only then
    trains CALM on it."""
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    proc = subprocess.run([sys.executable, "-c", KILLED_AFTER_SAVE, "10", *QUICKSTART, "--out_dir", str(killed)],
                          cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    ae_path = killed / "autoencoder" / "ckpt.pt"
    unfinished = ae_path.read_bytes()
    ae = runtime.load_checkpoint(str(ae_path))
    assert ae["iter"] == 10 and not ae["finished"] and not (killed / "ckpt.pt").exists()
    other_text = tmp_path / "other.txt"
    other_text.write_text("Another text, another autoencoder. " * 100)
    for flags, words in ((["--dataset", f"file:{other_text}"], "dataset='shakespeare'"),
                         (["--tokenizer", "gpt2"], "tokenizer='bytes'"), (["--seed", "7"], "seed=1337"),
                         (["--ae_iters", "30"], "20 iterations")):
        err = one_line_error(capsys, train.main, QUICKSTART + ["--out_dir", str(killed)] + flags)
        assert words in err and "pass --overwrite to retrain it there" in err, err
    assert ae_path.read_bytes() == unfinished and not (killed / "ckpt.pt").exists()
    train.main(QUICKSTART + ["--out_dir", str(killed)])
    assert "calm: resuming the unfinished autoencoder" in capsys.readouterr().out
    train.main(QUICKSTART + ["--out_dir", str(whole)])
    done, reference = (runtime.load_checkpoint(str(d / "autoencoder" / "ckpt.pt")) for d in (killed, whole))
    assert done["finished"] and done["iter"] == 20 and done["metrics"] == reference["metrics"]
    assert all(torch.equal(done["model"][k], reference["model"][k]) for k in reference["model"])
    calm_run, calm_reference = (runtime.load_checkpoint(str(d / "ckpt.pt")) for d in (killed, whole))
    assert all(torch.equal(calm_run["model"]["ae." + k], v) for k, v in done["model"].items())  # the finished one
    assert calm_run["metrics"] == calm_reference["metrics"]
    # the kill left both .lock files (harmless: the OS dropped the locks); the rerun removed them when it ended
    assert not (killed / ".lock").exists() and not (killed / "autoencoder" / ".lock").exists()


# ----------------------------------------------------------------------------- caches heal

def test_a_bad_cached_text_is_one_line_and_a_replaced_or_cut_cache_is_built_again(tmp_path, monkeypatch, capsys):
    real = (data.cache_dir() / "shakespeare" / "input.txt").read_bytes()
    monkeypatch.setenv("LMPAPERS_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "cache" / "shakespeare" / "input.txt"
    text.parent.mkdir(parents=True)
    for bad, words in ((b"", "is empty"), (b"\0\1\2 binary " * 100, "is binary")):
        text.write_bytes(bad)
        err = one_line_error(capsys, run, tmp_path / "o", "--max_iters", "1")
        assert words in err and err.endswith("delete it and it is downloaded again")
    assert not (tmp_path / "o").exists()
    text.write_text("Not Shakespeare at all, but text. " * 100)  # a wrong text, tokenized and cached
    wrong = data.load_data("shakespeare", "bytes")
    text.write_bytes(real)  # replaced by the real one: its cache is not the wrong text's
    right = data.load_data("shakespeare", "bytes")
    assert right.built == ["shakespeare:train", "shakespeare:val"] and len(right.split("val")) > len(wrong.split("val"))
    assert bytes(np.asarray(right.split("val"), dtype=np.uint8)) == real[len(real) - len(right.split("val")):]
    cache = tmp_path / "cache" / "tokens" / f"{data.dataset_key('shakespeare')}.bytes.train.bin"
    with open(cache, "r+b") as f:  # cut short mid-token
        f.truncate(cache.stat().st_size - 1)
    assert data.load_data("shakespeare", "bytes").built == ["shakespeare:train", "shakespeare:val"]


def test_offline_runs_are_one_line_and_leave_no_out_dir(tmp_path, monkeypatch, capsys):
    gpt2_ckpt = runtime.load_checkpoint(str(V1 / "ntp.pt"))
    gpt2_ckpt["args"]["tokenizer"] = "gpt2"
    torch.save(gpt2_ckpt, tmp_path / "gpt2.pt")
    monkeypatch.setenv("LMPAPERS_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(data, "SHAKESPEARE_URL", "http://127.0.0.1:9/input.txt")  # connection refused

    def no_bpe(self):
        raise data.DownloadError("could not load the GPT-2 BPE (tiktoken r50k_base): ConnectionError")
    monkeypatch.setattr(data.GPT2Tokenizer, "__init__", no_bpe)
    err = one_line_error(capsys, run, tmp_path / "o", "--max_iters", "1")
    assert "offline, use --dataset pystdlib" in err
    err = one_line_error(capsys, train.main, ["--dataset", "pystdlib", "--tokenizer", "gpt2", "--out_dir",
                                              str(tmp_path / "o")])
    assert "offline, use --tokenizer bytes" in err and not (tmp_path / "o").exists()
    err = one_line_error(capsys, sample.main, ["--ckpt", str(tmp_path / "gpt2.pt")])
    assert "needs the gpt2 tokenizer: could not load the GPT-2 BPE" in err


# ----------------------------------------------------------------------------- nothing loops without a bound

def test_sampling_as_t_goes_to_0_returns_in_bounded_time(capsys):
    """CALM's samplers at T -> 0 (down to the smallest float), both kinds, and token models (greedy below 1e-30)."""
    def too_slow(*_):
        raise TimeoutError("sampling did not return within 120 s")
    previous = signal.signal(signal.SIGALRM, too_slow) if hasattr(signal, "SIGALRM") else None
    if previous is not None:
        signal.alarm(120)
    try:
        t0 = time.time()
        never_twice = lambda m: torch.randint(1 << 30, (m, 4))  # noqa: E731 (a sampler whose values never repeat)
        for T in (1e-3, 1e-30, 1e-320, 5e-324):
            assert calm.sample_batch(never_twice, T).shape == (4,) and calm.sample_exact(never_twice, T) is None
        for T in ("1e-30", "1e-320", "5e-324"):
            for argv in (["--ckpt", str(V1 / "calm.pt"), "--temp_sampler", "batch"],
                         ["--ckpt", str(V1 / "calm.pt"), "--temp_sampler", "exact"],
                         ["--ckpt", str(V1 / "ntp.pt")], ["--ckpt", str(V1 / "mtp.pt"), "--speculative"]):
                sample.main(argv + ["--temperature", T, "--max_new_tokens", "8", "--device", "cpu", "--prompt", "ab"])
                assert capsys.readouterr().out.startswith("ab")
        assert time.time() - t0 < 120
    finally:
        if previous is not None:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)


def test_a_long_evaluation_shows_its_progress_and_odd_schedules_warn(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runtime, "PROGRESS_SECONDS", 0.0)
    run(tmp_path, "--max_iters", "1", "--eval_interval", "1", "--warmup_iters", "5")
    err = capsys.readouterr().err
    assert "WARNING: ntp: the warm-up (--warmup_iters 5) is not shorter than the run (--max_iters 1)" in err
    assert re.search(r"evaluating: 4/4 batches \| .* ETA", err)  # --eval_iters 1000000000 would show its ETA
    trainer.plan(*trainer.parse_args(TINY + ["--out_dir", str(tmp_path / "o"), "--max_iters", "9",
                                              "--lr_decay_iters", "2", "--warmup_iters", "3"]))  # checks only
    assert "WARNING: ntp: the decay ends (--lr_decay_iters 2) before the warm-up" in capsys.readouterr().err
    args, _ = trainer.parse_args(TINY + ["--grad_accum", "100000000"])
    warning = trainer.cost_warnings(args, 10 ** 6, 256)[0]
    assert re.match(r"one iteration is ~.* FLOPs \(\d+h\d\dm at 0.1 TFLOP/s\)", warning)


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
