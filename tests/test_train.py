"""train.py and sample.py end to end on CPU: training, exact resume, DDP, and every bad input as one line."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import runtime
import sample
import train
from util import one_line_error

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--dataset", "shakespeare", "--tokenizer", "bytes", "--n_layer", "2", "--n_head", "2", "--n_embd", "32",
        "--block_size", "32", "--batch_size", "4", "--eval_iters", "2", "--brier_positions", "0",
        "--sample_tokens", "5", "--log_interval", "2", "--warmup_iters", "2"]


def run(out_dir, *extra):
    return train.main(TINY + ["--out_dir", str(out_dir), *extra])


def test_train_end_to_end_then_sample(tmp_path, capsys):
    run(tmp_path, "--max_iters", "6", "--eval_interval", "3")
    out = capsys.readouterr().out
    assert "iter 6/6 | loss" in out and "tok/s" in out and "ETA" in out and "val_loss" in out and "sample:" in out
    ckpt = runtime.load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert ckpt["iter"] == 6 and ckpt["objective"] == "ntp"
    assert ckpt["args"]["dataset"] == "shakespeare" and ckpt["args"]["tokenizer"] == "bytes"
    assert {"train_loss", "val_loss", "train_loss_last"} <= set(ckpt["metrics"])
    sample.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--prompt", "ROMEO:", "--max_new_tokens", "20",
                 "--temperature", "0"])
    assert capsys.readouterr().out.startswith("ROMEO:")


def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path):
    common = ["--lr_decay_iters", "8", "--eval_interval", "4", "--dropout", "0.1"]  # dropout: RNG state matters
    full = run(tmp_path / "full", "--max_iters", "8", *common)
    run(tmp_path / "half", "--max_iters", "4", *common)
    resumed = run(tmp_path / "half", "--max_iters", "8", "--resume", *common)
    assert resumed["train_loss_last"] == full["train_loss_last"]
    assert resumed["val_loss"] == full["val_loss"]


def test_torchrun_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = TINY + ["--max_iters", "4", "--eval_interval", "4", "--sample_tokens", "0"]
    single = run(tmp_path / "one", "--max_iters", "4", "--eval_interval", "4", "--batch_size", "2",
                 "--grad_accum", "2", "--sample_tokens", "0")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           str(ROOT / "train.py"), *args, "--batch_size", "2", "--out_dir", str(tmp_path / "two")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2 process(es)" in proc.stdout
    two = runtime.load_checkpoint(str(tmp_path / "two" / "ckpt.pt"))["metrics"]
    # same global batch of 4 (2 per process vs 2 micro-batches of 2): equal up to float summation order
    assert abs(two["val_loss"] - single["val_loss"]) < 1e-4


def test_bad_inputs_are_one_line_errors_and_keep_good_checkpoints(tmp_path, capsys):
    assert "unknown objective" in one_line_error(capsys, train.main, ["--objective", "diffusion"])
    assert "unrecognized arguments" in one_line_error(capsys, train.main, TINY + ["--n_layers", "3"])
    assert "unknown preset" in one_line_error(capsys, train.main, ["--preset", "tpu"])
    err = one_line_error(capsys, run, tmp_path / "big", "--block_size", "4096", "--dataset", "file:" + __file__)
    assert "larger than" in err
    assert "nothing to resume" in one_line_error(capsys, run, tmp_path / "none", "--resume")

    good = tmp_path / "good"
    run(good, "--max_iters", "2", "--eval_interval", "2")
    capsys.readouterr()
    before = (good / "ckpt.pt").read_bytes()
    assert "exists" in one_line_error(capsys, run, good, "--max_iters", "2")
    assert "n_layer" in one_line_error(capsys, run, good, "--resume", "--max_iters", "4", "--n_layer", "3")
    err = one_line_error(capsys, run, good, "--resume", "--max_iters", "40", "--learning_rate", "1e12",
                         "--warmup_iters", "0", "--grad_clip", "0")
    assert "at iteration" in err and "kept" in err
    assert (good / "ckpt.pt").read_bytes() == before  # NaN never overwrote the good checkpoint

    ckpt = runtime.load_checkpoint(str(good / "ckpt.pt"))
    ckpt["objective"] = "mtp"
    torch.save(ckpt, tmp_path / "other.pt")
    (tmp_path / "other").mkdir()
    shutil.copy(tmp_path / "other.pt", tmp_path / "other" / "ckpt.pt")
    assert "--objective mtp" in one_line_error(capsys, run, tmp_path / "other", "--resume")

    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    assert "not a readable checkpoint" in one_line_error(capsys, sample.main, ["--ckpt", str(tmp_path / "corrupt.pt")])
    assert "no checkpoint" in one_line_error(capsys, sample.main, ["--ckpt", str(tmp_path / "missing.pt")])
    err = one_line_error(capsys, sample.main, ["--ckpt", str(good / "ckpt.pt"), "--prompt", "\ud800"])
    assert "cannot encode" in err
    assert "--speculative" in one_line_error(capsys, sample.main, ["--ckpt", str(good / "ckpt.pt"), "--speculative"])
    assert "temperature" in one_line_error(capsys, sample.main, ["--ckpt", str(good / "ckpt.pt"), "--temperature", "-1"])
