"""Checkpoints written before the reader-first layout (tests/data/checkpoints_v1, made by commit 27bafe8 with
tiny models of every objective) still load to the same numbers, sample, and resume."""
import shutil
from pathlib import Path

import pytest
import torch

import objectives
import sample
import train
from runtime import load_checkpoint

V1 = Path(__file__).resolve().parent / "data" / "checkpoints_v1"
IDX = torch.arange(16).view(1, 16) * 7 % 256  # the input the expected outputs were computed on, by the old code


@pytest.mark.parametrize("name", ["ntp", "mtp", "dispersion", "autoencoder", "calm", "calm_flow", "calm_mse"])
def test_an_old_checkpoint_gives_the_old_outputs(name):
    model, objective, saved, _ = objectives.load_model(str(V1 / f"{name}.pt"))
    with torch.no_grad():
        if name == "autoencoder":
            out = model.decode(model.encode(IDX.view(1, 4, 4))[0])
        elif name.startswith("calm"):
            h = model.hidden_states(IDX[:, :12])["final"]
            out = torch.cat([h.flatten(), model.head(h[:, -1], 2, torch.Generator().manual_seed(0)).flatten()])
        else:
            out = model(IDX)[0]
    expected = torch.load(V1 / "expected.pt", weights_only=True)[name]
    torch.testing.assert_close(out.float(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["ntp", "calm"])
def test_an_old_checkpoint_resumes_and_samples(name, tmp_path, capsys):
    shutil.copy(V1 / f"{name}.pt", tmp_path / "ckpt.pt")
    at = load_checkpoint(str(tmp_path / "ckpt.pt"))["iter"]
    train.main(["--objective", name, "--out_dir", str(tmp_path), "--resume", "--max_iters", str(at + 2),
                "--eval_interval", "2", "--eval_iters", "1", "--device", "cpu"])
    assert load_checkpoint(str(tmp_path / "ckpt.pt"))["iter"] == at + 2
    capsys.readouterr()
    sample.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--prompt", "ROMEO:", "--max_new_tokens", "8", "--device", "cpu"])
    assert capsys.readouterr().out.startswith("ROMEO:")
