"""bench/ (python -m bench): FLOPs formulas against hand counts, the tiny protocol end to end, failures and bad input."""
import csv
import json
from types import SimpleNamespace

import pytest
import torch

import bench
from bench import table
from bench.flops import calm_flops_parts
import calm
import objectives
import trainer
from gpt import GPT, GPTConfig
from mtp import MTP
from util import one_line_error

# a tiny config counted by hand: L = 2 blocks, d = 16, V = 256, T = 8 tokens
CFG = GPTConfig(block_size=8, vocab_size=256, n_layer=2, n_head=2, n_embd=16)


def macs(*shapes):
    return sum(i * o for i, o in shapes)


# one Transformer block's matrices (in, out): c_attn, attention c_proj, c_fc, MLP c_proj
BLOCK = macs((16, 48), (16, 16), (16, 64), (64, 16))                # 3072 multiply-adds per token
UNEMBED = macs((16, 256))                                           # 4096
ATTN_FWD = 2 * 2 * 8 * 16                                           # per layer and token: q.k over T=8 keys + the
                                                                    # weighted sum of 8 values, 2 FLOPs per MAC


def test_block_count_is_the_model():
    assert BLOCK == sum(p.numel() for p in GPT(CFG).blocks[0].parameters() if p.dim() == 2)


def test_gpt_flops_hand_count():
    hand = 6 * (2 * BLOCK + UNEMBED) + 3 * 2 * ATTN_FWD            # = 61440 + 3072
    assert hand == 64512
    assert bench.train_flops_per_token(GPT(CFG), 8) == hand


def test_mtp_flops_hand_count():
    # n = 2 heads: 1 trunk block + 2 one-block heads = 2 blocks per token, the unembedding runs for both heads
    hand = 6 * (2 * BLOCK + 2 * UNEMBED) + 3 * 2 * ATTN_FWD
    assert hand == 89088
    assert bench.train_flops_per_token(MTP(CFG, 2), 8) == hand


def tiny_calm(head="energy", head_dim=16, num_samples=8):
    args, _ = trainer.parse_args(["--objective", "calm", "--chunk_size", "2", "--latent_dim", "4", "--ae_dim", "8",
                                  "--ae_layers", "1", "--noise_size", "4", "--head_layers", "1", "--head", head,
                                  "--head_dim", str(head_dim), "--num_samples", str(num_samples)])
    return objectives.calm_build(CFG, args)


def test_calm_flops_hand_count():
    # K = 2 tokens per chunk, 4 chunk positions; per chunk:
    backbone = 6 * 2 * BLOCK + 3 * 2 * (2 * 2 * 4 * 16)             # attention over C = 4 positions
    compress = 6 * macs((32, 32), (32, 16))
    cond = 6 * macs((16, 16))                                       # cond_in once per chunk
    per_sample = 6 * macs((4, 16),                                  # noise_in
                          (32, 16), (16, 16), (16, 32), (16, 16),   # one HeadBlock
                          (16, 16), (16, 4))                        # output MLP
    swiglu = macs((8, 40), (20, 8))                                 # autoencoder layer at a = 8
    encoder = 2 * (2 * swiglu + macs((16, 8)) + swiglu + macs((8, 8)))  # forward only (frozen)
    per_chunk = backbone + compress + cond + 2 * per_sample + encoder  # N = 2 samples
    assert per_chunk == 75456
    assert bench.train_flops_per_token(tiny_calm(), 8, num_samples=2) == per_chunk / 2
    # a head 8 wide (--head_dim 8) on the 16-wide backbone: cond_in 16 -> 8, the sample path at width 8
    narrow = 6 * macs((16, 8)) + 2 * 6 * macs((4, 8), (16, 8), (8, 8), (8, 16), (8, 8), (8, 8), (8, 4))
    assert bench.train_flops_per_token(tiny_calm(head_dim=8), 8, num_samples=2) == \
        (per_chunk - cond - 2 * per_sample + narrow) / 2
    assert bench.train_flops_per_token(tiny_calm(head_dim=0), 8, 2) == \
        bench.train_flops_per_token(tiny_calm(head_dim=8), 8, 2)  # --head_dim 0: half the backbone's width
    parts = calm_flops_parts(tiny_calm(head_dim=8), num_samples=2)
    assert parts["head"] == narrow and sum(parts.values()) == per_chunk - cond - 2 * per_sample + narrow
    # the autoencoder's own training: encoder + decoder + tied output projection, per chunk / K
    decoder = macs((4, 8)) + swiglu + macs((8, 16)) + 2 * swiglu + macs((8, 256)) * 2
    assert bench.ae_flops_per_token(tiny_calm().ae) == 6 * (encoder / 2 + decoder) / 2


@pytest.mark.parametrize("head", ["flow", "diffusion"])
def test_flow_and_diffusion_head_flops_hand_count(head):
    """Same network for both (AdaLNNet), 16 wide: c_in once per chunk; per sample x_in, the time MLP from 256
    sinusoidal features, one AdaLN block (modulation 16 -> 48, MLP 16 -> 16 -> 16), output modulation and layer."""
    per_sample = 6 * macs((4, 16), (256, 16), (16, 16), (16, 48), (16, 16), (16, 16), (16, 32), (16, 4))
    model = tiny_calm(head)
    parts = calm_flops_parts(model, num_samples=2)
    assert parts["head"] == 6 * macs((16, 16)) + 2 * per_sample == 76800
    assert bench.train_flops_per_token(model, 8, num_samples=2) == sum(parts.values()) / 2


def counted_training_flops(model, objective_name, argv, x):
    """FLOPs torch's FlopCounterMode sees in one training forward + backward, per token. It does not see inside
    the fused CPU attention kernel, so the formulas' attention terms are taken off before comparing."""
    import contextlib
    from torch.utils.flop_counter import FlopCounterMode
    args, objective = trainer.parse_args(["--objective", objective_name] + argv)
    with FlopCounterMode(display=False) as counter:
        trainer.forward_backward(model, objective, x, x, args, 1.0, contextlib.nullcontext())
    return counter.get_total_flops() / x.numel()


def test_flops_match_torch_flop_counter():
    """An independent count of the dense matrix products, through the same training step train.py takes."""
    torch.manual_seed(0)
    x = torch.randint(256, (3, 8))
    shape = ["--n_layer", "2", "--n_head", "2", "--n_embd", "16", "--block_size", "8"]
    assert counted_training_flops(GPT(CFG), "ntp", shape, x) == bench.train_flops_per_token(GPT(CFG), 8) - 3 * 2 * ATTN_FWD
    # MTP's memory-efficient schedule does the same products as the naive one: no recomputation
    for naive in ([], ["--mtp_naive"]):
        counted = counted_training_flops(MTP(CFG, 2), "mtp", shape + ["--n_future", "2"] + naive, x)
        assert counted == bench.train_flops_per_token(MTP(CFG, 2), 8) - 3 * 2 * ATTN_FWD
    # CALM, per token (K = 2, C = 4 chunk positions, N = 2 samples); the formula's 6 N T convention overcounts
    # two things the real step skips: position 0 is a learned start vector, so the compression MLP runs on C - 1
    # of C positions, and the noise fed to noise_in needs no gradient
    model = tiny_calm(num_samples=2)
    argv = shape + ["--chunk_size", "2", "--latent_dim", "4", "--ae_dim", "8", "--ae_layers", "1", "--noise_size", "4",
                    "--head_layers", "1", "--num_samples", "2"]
    attention = 3 * 2 * (2 * 2 * 4 * 16) / 2
    compress_at_start = 6 * macs((32, 32), (32, 16)) / 4 / 2
    noise_input_grad = 2 * 2 * macs((4, 16)) / 2
    assert (counted_training_flops(model, "calm", argv, x) ==
            bench.train_flops_per_token(model, 8, num_samples=2) - attention - compress_at_start - noise_input_grad)
    # flow / diffusion: the noisy latent fed to x_in and the time features fed to the time MLP need no gradient
    for head in ("flow", "diffusion"):
        model = tiny_calm(head, num_samples=2)
        input_grads = 2 * 2 * macs((4, 16), (256, 16)) / 2
        assert (counted_training_flops(model, "calm", argv + ["--head", head], x) ==
                bench.train_flops_per_token(model, 8, num_samples=2) - attention - compress_at_start - input_grads)


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    return table.run("tiny", out=str(out), device="cpu", log=lambda *a: None), out


def test_tiny_protocol_fills_every_column(tiny_report):
    report, out = tiny_report
    rows = {r["objective"]: r for r in report["rows"]}
    assert list(rows) == [label for label, _, _ in table.ROWS]
    for r in rows.values():
        assert r["status"] == "ok"
        for c in table.COLUMNS:
            assert r.get(c) not in (None, "") and "failed" not in str(r[c]), (r["objective"], c)
    budget = rows["ntp"]["train_flops"]
    for r in rows.values():  # same budget, up to rounding to whole iterations
        per_iter = r["train_flops"] / r["train_iters"]
        assert abs(r["train_flops"] - budget) <= per_iter / 2 + 1e-6 * budget
    # backbone passes per generated token: 1 for token models, exactly 1/K for CALM, between 1/n and 1 for MTP
    assert rows["ntp"]["fwd_per_tok"] == rows["dispersion l=0.1"]["fwd_per_tok"] == 1
    assert rows["calm K=2"]["fwd_per_tok"] == 0.5 and rows["calm K=4"]["fwd_per_tok"] == 0.25
    assert 1 / 4 <= rows["mtp n=4"]["fwd_per_tok"] <= 1 and 1 / 2 <= rows["mtp n=2"]["fwd_per_tok"] <= 1
    assert rows["calm K=4"]["val_ce"] == "n/a" and 0 < rows["ntp"]["val_ce"] < 6
    # the BrierLM-vs-FLOPs curve: one point per stage, FLOPs growing to the row's total, the last point is the row
    for r in rows.values():
        flops = [point["train_flops"] for point in r["curve"]]
        assert len(flops) == table.PRESETS["tiny"]["stages"] and flops == sorted(flops) and flops[-1] == r["train_flops"]
        assert r["curve"][-1]["brierlm"] == r["brierlm"] and r["curve"][-1]["iter"] == r["train_iters"]
    with open(out / "bench_tiny.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert [r["objective"] for r in csv_rows] == list(rows) and all(all(r.values()) for r in csv_rows)
    assert json.loads((out / "bench_tiny.json").read_text())["rows"][0]["objective"] == "ntp"


def test_failed_objective_gets_its_row_and_the_rest_runs(tmp_path):
    rows = [("calm K=3", "calm", {"chunk_size": 3}), ("ntp", "ntp", {})]   # 3 does not divide block_size 32
    report = table.run("tiny", out=None, device="cpu", rows=rows, log=lambda *a: None)
    bad, good = report["rows"]
    assert bad["status"].startswith("failed") and "chunk_size=3" in bad["status"]
    assert good["status"] == "ok" and good["brierlm"] >= 0


def test_core_throughput_positive():
    r = table.core_throughput(table.PRESETS["tiny"], "cpu", False, steps=1)
    assert r["tok_s"] > 0 and r["mfu"] == "n/a on CPU"


def test_bad_presets(capsys, monkeypatch):
    assert "unknown preset 'huge'" in one_line_error(capsys, table.main, ["--preset", "huge"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert "needs a CUDA GPU" in one_line_error(capsys, table.main, ["--preset", "gpu"])


def test_one_entry_point_dispatches_and_refuses_unknown_benchmarks(capsys):
    from bench.__main__ import main
    assert "choose a benchmark" in one_line_error(capsys, main, ["tables"])
    assert "choose a benchmark" in one_line_error(capsys, main, [])
    assert "unknown preset 'huge'" in one_line_error(capsys, main, ["table", "--preset", "huge"])
