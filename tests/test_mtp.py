"""mtp.py and data.py's synthetic tasks: equivalence with NTP at n = 1, memory-efficient == naive gradients, the
per-head target shift, speculative == greedy decoding (also byte-level n = 8, float32 and bfloat16), task
generators checked by an independent evaluator, and bench/mtp_experiments.py's sweeps at smoke scale."""
import copy
import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import bench.__main__
import data
import sample
import train
import trainer
from bench import mtp_experiments as mx
from gpt import GPT, GPTConfig
from runtime import UserError
import objectives
from bench.mtp_bench import speculative_benchmark
from mtp import MTP, head_loss, speculative_generate
from util import one_line_error

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tutorials"))
from keyfigs import mtp as figs  # noqa: E402  (the summaries the tutorial's figures draw)

CFG = GPTConfig(block_size=24, vocab_size=37, n_layer=4, n_head=2, n_embd=16)


def args(naive=False):
    return SimpleNamespace(mtp_naive=naive)


def mtp_forward_backward(model, x, y, a, scale=1.0):
    """train.py's step for --objective mtp: memory-efficient, or naive with --mtp_naive."""
    return objectives.mtp_forward_backward(model, x, y, a, scale)


def grads(model):
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def test_n1_is_exactly_next_token_prediction():
    torch.manual_seed(0)
    gpt = GPT(CFG).double()
    torch.manual_seed(0)
    mtp = MTP(CFG, 1).double()
    assert all(torch.equal(v, mtp.state_dict()["trunk." + k]) for k, v in gpt.state_dict().items())  # same init
    x, y = torch.randint(37, (3, 24)), torch.randint(37, (3, 24))
    _, ntp = gpt(x, y)
    ntp.backward()
    loss, logs = mtp_forward_backward(mtp, x, y, args())
    assert torch.equal(loss, ntp.detach()) and logs["loss_h1"] == ntp.item()
    g = grads(mtp)
    for k, v in grads(gpt).items():
        assert torch.allclose(g["trunk." + k], v, rtol=0, atol=1e-13), k


@pytest.mark.parametrize("n", [2, 4])
def test_memory_efficient_gradients_equal_naive(n):
    torch.manual_seed(n)
    model = MTP(CFG, n).double()
    x, y = torch.randint(37, (3, 24)), torch.randint(37, (3, 24))
    y[0, 5:9] = -1  # ignored targets (padding) too
    naive_loss, naive_logs = mtp_forward_backward(model, x, y, args(naive=True), scale=0.5)
    naive = grads(model)
    model.zero_grad(set_to_none=True)
    loss, logs = mtp_forward_backward(model, x, y, args(), scale=0.5)
    assert torch.allclose(loss, naive_loss) and logs.keys() == naive_logs.keys() == {f"loss_h{i + 1}" for i in range(n)}
    eff = grads(model)
    assert eff.keys() == naive.keys() and len(eff) == len(list(model.parameters()))  # every head got a gradient
    for k in naive:
        assert torch.allclose(eff[k], naive[k], rtol=1e-10, atol=1e-13), k
    # the summed loss of eq. 2 == the (B, n, T, V) forward's loss
    assert torch.allclose(model(x, y)[1], naive_loss)


def test_head_i_is_scored_against_token_t_plus_i():
    x = torch.randint(37, (2, 20))
    seq = torch.cat([x, torch.randint(37, (2, 1))], dim=1)
    y = seq[:, 1:]
    for i in range(4):  # logits that put all mass on x_{t+1+i}: zero loss only with the right shift
        for guess in range(4):
            future = torch.full_like(x, 0)
            future[:, :20 - guess] = seq[:, 1 + guess:21]
            logits = 50.0 * torch.nn.functional.one_hot(future, 37).double()
            loss = head_loss(logits, y, i).item()
            assert (loss < 1e-6) == (guess == i), (i, guess, loss)


def test_heads_learn_their_own_shift_on_a_counting_sequence():
    """x_t = (s + t) mod V: head i must learn token -> token + i; after training its argmax is exactly that."""
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=16, vocab_size=11, n_layer=3, n_head=2, n_embd=32)
    model = MTP(cfg, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(120):
        seq = (torch.randint(11, (16, 1)) + torch.arange(17)) % 11
        mtp_forward_backward(model, seq[:, :-1], seq[:, 1:], args())
        opt.step()
        opt.zero_grad()
    x = (torch.randint(11, (4, 1)) + torch.arange(16)) % 11
    z = model.trunk_hidden(x)
    for i in range(3):
        assert torch.equal(model.head_logits(i, z).argmax(-1), (x + i + 1) % 11), i


@pytest.mark.parametrize("n", [2, 3, 4])
def test_speculative_greedy_is_identical_to_greedy(n):
    torch.manual_seed(10 + n)
    model = MTP(CFG, n).double().eval()
    copy = MTP(CFG, n).double().eval()  # extra heads = head 1's block: drafts are often accepted
    for h in copy.heads:
        h.load_state_dict(copy.trunk.blocks[-1].state_dict())
    accepted = 0
    for m in (model, copy):
        for prompt_len, new in [(1, 30), (5, 19), (20, 4), (21, 3), (23, 10), (30, 8), (3, 60)]:  # 24 = window
            idx = torch.randint(37, (1, prompt_len))
            out, stats = speculative_generate(m, idx, new)
            assert torch.equal(out, m.generate(idx, new, temperature=0.0)), (prompt_len, new)
            assert stats["tokens"] == new and 1 <= stats["tokens_per_forward"] <= n
            accepted += stats["tokens"] - stats["forwards"]
    assert accepted > 0  # the verification / rollback path really ran


def copy_heads(model):
    """Extra heads = head 1's block: each drafts head 1's next token again, so runs of one token are accepted."""
    for h in model.heads:
        h.load_state_dict(model.trunk.blocks[-1].state_dict())
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_byte_level_n8_speculative_greedy_is_identical_to_greedy(dtype):
    """The paper's byte-level setting, n = 8: up to 8 tokens per forward, through and past the 64-byte window.
    (In bfloat16 two logits can round to a tie that the cached and the verify forward break differently: see the
    speed-up sweep's `mismatches` in bench/mtp_experiments.py.)"""
    torch.manual_seed(8)
    cfg = GPTConfig(block_size=64, vocab_size=256, n_layer=10, n_head=2, n_embd=32)
    longest = 0
    for model in (MTP(cfg, 8).to(dtype).eval(), copy_heads(MTP(cfg, 8)).to(dtype).eval()):
        for prompt_len, new in [(1, 70), (10, 40), (50, 30), (60, 4)]:
            idx = torch.randint(256, (1, prompt_len))
            out, stats = speculative_generate(model, idx, new)
            assert torch.equal(out, model.generate(idx, new, temperature=0.0)), (dtype, prompt_len, new)
            assert stats["tokens"] == new and 1 <= stats["tokens_per_forward"] <= 8
            longest = max(longest, stats["tokens_per_forward"])
    assert longest > 4  # long runs of drafts were accepted, so the n = 8 verification really ran


def test_speculative_edge_cases():
    torch.manual_seed(0)
    model = MTP(CFG, 2).eval()
    idx = torch.randint(37, (1, 5))
    out, stats = speculative_generate(model, idx, 0)  # like GPT.generate: the prompt, no forward
    assert torch.equal(out, idx) and torch.equal(out, model.generate(idx, 0)) and stats["tokens"] == 0
    with pytest.raises(UserError, match="n_future = 1"):
        speculative_generate(MTP(CFG, 1), idx, 5)
    with pytest.raises(UserError, match="batch size 1"):
        speculative_generate(model, idx.expand(2, 5), 5)


def test_speculative_benchmark_reports_every_prompt_and_matches_greedy():
    torch.manual_seed(3)
    model = MTP(CFG, 3).eval()
    for h in model.heads:  # extra heads = head 1's block: some drafts are accepted
        h.load_state_dict(model.trunk.blocks[-1].state_dict())
    fake = SimpleNamespace(get_batch=lambda split, b, t, gen, device: (torch.randint(37, (b, t), generator=gen), None))
    r = speculative_benchmark(model, fake, n_prompts=3, prompt_len=5, new_tokens=12)
    assert r["identical"] and len(r["per_prompt"]) == 3
    assert all(1 <= x <= 3 for x in r["per_prompt"])
    assert min(r["per_prompt"]) <= r["tokens_per_forward"] <= max(r["per_prompt"])
    assert r["speedup"] == pytest.approx(r["greedy_s"] / r["speculative_s"])
    r = speculative_benchmark(model, fake, n_prompts=3, prompt_len=5, new_tokens=12, temperature=1.0)
    assert r["identical"] is None and all(1 <= x <= 3 for x in r["per_prompt"])  # sampling: no greedy reference


def test_speculative_sampling_draws_from_head_1s_distribution():
    """temperature > 0: the (x1, x2) pair from speculative sampling (x2 = an accepted draft or a residual draw)
    follows head 1's exact joint p(x1) p(x2 | x1), computed by enumeration; drafts taken as-is would not."""
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=8, vocab_size=4, n_layer=3, n_head=2, n_embd=16)
    model = MTP(cfg, 3).eval()
    with torch.no_grad():
        model.trunk.wte.weight.mul_(6)  # peaked, different distributions for head 1 and the draft heads
    prompt = torch.tensor([[1, 2]])
    with torch.no_grad():
        p1 = torch.softmax(model.trunk(prompt)[0][0, -1], -1)
        pairs = torch.tensor([[a, b] for a in range(4) for b in range(4)])
        p2 = torch.softmax(model.trunk(torch.cat([prompt.expand(16, 2), pairs[:, :1]], 1))[0][:, -1], -1)
        exact = p1[pairs[:, 0]] * p2[torch.arange(16), pairs[:, 1]]
        q2 = torch.softmax(model.head_logits(1, model.trunk_hidden(prompt))[0, -1], -1)
        drafts_as_is = p1[pairs[:, 0]] * q2[pairs[:, 1]]
    gen, counts, N = torch.Generator().manual_seed(0), torch.zeros(16), 3000
    for _ in range(N):
        out, _ = speculative_generate(model, prompt, 3, temperature=1.0, generator=gen)
        counts[out[0, 2] * 4 + out[0, 3]] += 1
    tv = lambda a, b: 0.5 * (a - b).abs().sum().item()  # noqa: E731
    assert tv(exact, drafts_as_is) > 0.15 and exact.max() < 0.5  # the check below can tell a wrong sampler apart
    assert tv(counts / N, exact) < 0.06, (counts / N, exact)
    out, stats = speculative_generate(model, prompt, 20, 0.8, 3, gen)  # past the window end, with top-k
    assert out.shape == (1, 22) and stats["tokens"] == 20


def parse_poly(s):
    """Independent evaluator of a polynomial-task expression with numpy (recursive descent)."""
    pos = 0

    def trunc(p):
        return np.pad(np.asarray(p, dtype=np.int64) % 7, (0, 5))[:5]

    def operand():
        nonlocal pos
        if s[pos] == "-":
            pos += 1
            return trunc(-operand())
        if s[pos] == "(":
            pos += 1
            a = operand()
            op = s[pos]
            pos += 1
            b = operand()
            assert s[pos] == ")"
            pos += 1
            if op == "+":
                return trunc(a + b)
            if op == "*":
                return trunc(np.convolve(a, b))
            out = np.zeros(5, dtype=np.int64)  # a(b(X)) = sum_k a_k b^k
            power = trunc([1])
            for c in a:
                out, power = trunc(out + c * power), trunc(np.convolve(power, b))
            return out
        p = np.array([int(c) for c in s[pos:pos + 5]])
        pos += 5
        return p

    value = operand()
    assert pos == len(s)
    return value


def test_task_generators_are_deterministic_and_correct():
    a, b = data.make_task_split.__wrapped__("polynomial", "train", 300, 5), data.make_task_split.__wrapped__(
        "polynomial", "train", 300, 5)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], data.make_task_split.__wrapped__("polynomial", "train", 300, 6)[0])
    tok = data.POLYNOMIAL_TOKENIZER
    for split, (lo, hi) in [("train", (1, 5)), ("val:ood", (6, 8))]:
        tokens, scored = data.make_task_split.__wrapped__("polynomial", split, 300, 7)
        for ep, sc in zip(tokens, scored):
            text = tok.decode(ep)
            m = re.fullmatch(r"\n([^=]+)=([0-6]{5});_*", text)
            assert m, text
            assert lo <= len(re.findall(r"[-+*o]", m.group(1))) <= hi
            assert "".join(map(str, parse_poly(m.group(1)))) == m.group(2)
            assert tok.decode(ep[sc]) == m.group(2)
    tokens, scored = data.make_task_split.__wrapped__("induction", "val", 200, 3)
    assert np.array_equal(tokens, data.make_task_split.__wrapped__("induction", "val", 200, 3)[0])
    tok = data.INDUCTION_TOKENIZER
    for ep, sc in zip(tokens, scored):
        text = tok.decode(ep)
        seen, expect = {}, []
        for j, c in enumerate(text):
            if c.isupper():
                assert text[j + 1].isdigit() and seen.get(c, text[j + 1]) == text[j + 1]  # a name keeps its 2nd part
                if c in seen:
                    expect.append(j + 1)
                seen[c] = text[j + 1]
        assert expect == list(np.nonzero(sc)[0]) and len(expect) >= 3


def test_task_accuracy_metric_against_an_oracle():
    ds = data.load_data("polynomial")
    oracle = lambda x: torch.nn.functional.one_hot(  # noqa: E731: the true next token everywhere
        torch.from_numpy(ds.episodes["val"][:len(x), 1:x.size(1) + 1].astype(np.int64)), ds.vocab_size).float()
    assert ds.accuracy(oracle, "val", 100, batch_size=100) == 1.0

    def one_wrong_digit(x):
        logits = oracle(x)
        last = torch.from_numpy(ds.scored["val"][:len(x), 1:x.size(1) + 1]).cumsum(1) == 5  # 5th answer digit
        return logits.masked_fill(last.unsqueeze(-1) & (logits == 1), -1.0)
    assert ds.accuracy(one_wrong_digit, "val", 100, batch_size=100) == 0.0
    x, y = ds.get_batch("train", 4, 80, torch.Generator().manual_seed(0))
    assert (x[:, 0] == ds.tokenizer.bos).all() and ((y == -1)[:, :-1] == (x[:, 1:] == ds.tokenizer.pad)).all()


TINY = ["--objective", "mtp", "--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--batch_size", "4",
        "--eval_iters", "2", "--brier_positions", "0", "--sample_tokens", "5", "--warmup_iters", "2"]


def test_train_sample_speculative_and_bad_inputs(tmp_path, capsys):
    out = tmp_path / "poly"
    train.main(TINY + ["--dataset", "polynomial", "--block_size", "80", "--n_future", "2", "--max_iters", "4",
                       "--eval_interval", "4", "--out_dir", str(out), "--brier_positions", "4", "--log_interval", "2"])
    log = capsys.readouterr().out
    assert "| loss_h1" in log and "| loss_h2" in log and "val_loss_h2" in log and "acc_val_ood" in log
    greedy = ["--ckpt", str(out / "ckpt.pt"), "--temperature", "0", "--max_new_tokens", "30",
              "--prompt", "(01234*56012)="]
    sample.main(greedy + ["--speculative"])
    cap = capsys.readouterr()
    assert cap.out.startswith("(01234*56012)=") and "tokens/forward" in cap.err
    sample.main(greedy)  # plain greedy decoding with head 1: the same text
    assert capsys.readouterr().out == cap.out
    sample.main(["--ckpt", str(out / "ckpt.pt"), "--speculative", "--max_new_tokens", "20"])  # temperature 0.8
    assert "each token distributed as head 1's" in capsys.readouterr().err
    common = TINY + ["--dataset", "shakespeare", "--tokenizer", "bytes", "--block_size", "16", "--max_iters", "1"]
    err = lambda *extra: one_line_error(capsys, train.main, common + list(extra))  # noqa: E731
    assert "at least 1" in err("--n_future", "0", "--out_dir", str(tmp_path / "a"))
    assert "--n_layer >= 3" in err("--n_future", "3", "--out_dir", str(tmp_path / "b"))
    assert "block_size" in one_line_error(capsys, train.main, common + ["--n_future", "2", "--block_size", "1",
                                                                        "--out_dir", str(tmp_path / "c")])
    assert "block_size" in one_line_error(capsys, train.main, TINY + ["--dataset", "induction", "--block_size", "128",
                                                                       "--out_dir", str(tmp_path / "d")])
    train.main(common + ["--n_future", "1", "--out_dir", str(tmp_path / "n1")])
    capsys.readouterr()
    assert "--n_future 1" in one_line_error(capsys, sample.main, ["--ckpt", str(tmp_path / "n1" / "ckpt.pt"),
                                                                  "--speculative", "--temperature", "0"])

    n1 = str(tmp_path / "n1" / "ckpt.pt")
    assert "n_future = 1" in one_line_error(capsys, bench.__main__.main, ["mtp", "speculative", "--ckpt", n1])
    assert "2 <= n <= --layers 4" in one_line_error(capsys, bench.__main__.main, ["mtp", "costs", "--n", "5",
                                                                                   "--layers", "4"])
    assert "1..8" in one_line_error(capsys, bench.__main__.main, ["mtp", "memory", "--n", "9"])
    assert "unknown sweep" in one_line_error(capsys, bench.__main__.main, ["mtp", "sweep", "sizes", "--scale",
                                                                           "smoke", "--out", str(tmp_path)])


# ----------------------------------------------------------------------------- bench/mtp_experiments.py

def test_interleaved_speedup_times_the_same_outputs(monkeypatch):
    torch.manual_seed(1)
    model = copy_heads(MTP(CFG, 3)).eval()
    prompts = [torch.randint(37, (1, 4)) for _ in range(3)]
    r = mx.interleaved_speedup(model, prompts, 10, rounds=2, reference=copy.deepcopy(model).double())
    assert r["identical"] and r["reference_identical"] and r["identical_prompts"] == 3 and not r["mismatches"]
    assert len(r["rounds"]) == 2 and 1 <= r["tokens_per_forward"] <= 3
    for row in r["rounds"]:
        assert row["speedup"] == pytest.approx(row["speculative_tok_s"] / row["greedy_tok_s"])
        assert row["speedup_vs_reference"] == pytest.approx(row["speculative_tok_s"] / row["reference_greedy_tok_s"])
    assert r["speedup"] == pytest.approx(np.mean([row["speedup"] for row in r["rounds"]]))

    def last_token_changed(net, x, n):  # a decoder that differs from greedy at the last position
        out, stats = speculative_generate(net, x, n)
        out[0, -1] = (out[0, -1] + 1) % 37
        return out, stats
    monkeypatch.setattr(mx, "speculative_generate", last_token_changed)
    r = mx.interleaved_speedup(model, prompts, 10, rounds=1)
    assert not r["identical"] and r["identical_prompts"] == 0 and [m["position"] for m in r["mismatches"]] == [13] * 3
    for m, p in zip(r["mismatches"], prompts):
        logits = model.trunk(model.generate(p, 9, temperature=0.0))[0][0, -1]
        assert m["logit_gap"] == pytest.approx((logits.max() - logits[(logits.argmax() + 1) % 37]).item(), abs=1e-5)


def test_task_accuracy_agrees_with_the_dataset_metric():
    torch.manual_seed(0)
    for task, block in (("polynomial", 80), ("induction", 64)):
        ds = data.load_data(task)
        model = MTP(GPTConfig(block_size=block, vocab_size=ds.vocab_size, n_layer=2, n_head=2, n_embd=16), 2).eval()
        with torch.no_grad():  # an untrained model that predicts the answer digits often enough to score
            model.trunk.wte.weight.mul_(30)
        acc = mx.task_accuracy(model, ds, "val", block)
        assert acc["acc"] == pytest.approx(ds.accuracy(lambda x: model.trunk(x)[0], "val", block_size=block))
        if task == "polynomial":  # exact match per number of operations, weighted back, is the overall figure
            tok = ds.tokenizer
            ops = [sum(tok.decode(e).split("=")[0].count(c) for c in "+*o-") for e in ds.episodes["val"]]
            assert sum(acc[f"acc_ops{m}"] * ops.count(m) for m in set(ops)) / len(ops) == pytest.approx(acc["acc"])
        else:
            assert acc["acc"] == acc["token_acc"]


def test_size_summary_pairs_seeds_against_n1():
    def run(n, seed, loss):
        return dict(n_layer=2, n_embd=8, n=n, seed=seed, params_non_embedding=100, val_loss_h1=loss, brier1=-loss,
                    brierlm=10 * loss)
    runs = {"2x8_n1_s0": run(1, 0, 1.0), "2x8_n1_s1": run(1, 1, 2.0), "2x8_n4_s0": run(4, 0, 1.5),
            "2x8_n4_s1": run(4, 1, 2.1), "2x8_n4_s2": run(4, 2, 9.0)}  # seed 2 has no n = 1 partner: left out
    rows = {r["n"]: r for r in figs.size_summary({"runs": runs})}
    assert rows[1]["d_val_loss_h1"] == 0 and rows[4]["seeds"] == 2
    assert rows[4]["d_val_loss_h1"] == pytest.approx(0.3)
    assert rows[4]["d_val_loss_h1_se"] == pytest.approx(np.std([0.5, 0.1], ddof=1) / np.sqrt(2))
    assert rows[4]["d_brierlm"] == pytest.approx(3.0) and rows[4]["val_loss_h1"] == pytest.approx(1.8)


def test_sweeps_at_smoke_scale_write_results_and_resume(tmp_path, monkeypatch):
    out, work = tmp_path / "results", tmp_path / "work"
    reports = mx.run("all", "smoke", str(out), str(work), log=lambda *a: None)
    assert set(reports) == set(mx.SWEEPS) and all((out / f"mtp_{s}.json").exists() for s in mx.SWEEPS)
    size = reports["size"]["runs"]
    assert len(size) == 9 and all(r["brier1"] <= 1 and r["val_loss_h1"] > 0 for r in size.values())
    assert {(r["n"], r["seeds"]) for r in figs.size_summary(reports["size"]) if r["n_embd"] == 16} == {(1, 2), (2, 2),
                                                                                                      (4, 2)}
    assert {r["n"] for r in figs.task_summary(reports["induction"])} == {1, 2}
    assert set(reports["bytes"]["runs"]) == {"pystdlib_n2", "pystdlib_n8", "shakespeare_n2", "shakespeare_n8"}
    assert all(r["identical"] for r in reports["bytes"]["runs"].values())
    speed = reports["speedup"]["runs"]
    assert set(speed) == {"code", "counting"} and all(r["identical"] and len(r["per_prompt"]) == 2 for r in speed.values())
    # a cut sweep: one finished run lost from the JSON is evaluated again from its checkpoint, nothing retrains
    report = json.loads((out / "mtp_size.json").read_text())
    del report["runs"]["4x16_n2_s1"]
    (out / "mtp_size.json").write_text(json.dumps(report))
    monkeypatch.setattr(trainer, "run_quietly", lambda argv: pytest.fail("retrained " + " ".join(argv)))
    again = mx.run("size", "smoke", str(out), str(work), log=lambda *a: None)["size"]["runs"]
    assert again.keys() == size.keys() and again["4x16_n2_s1"]["val_loss_h1"] == size["4x16_n2_s1"]["val_loss_h1"]
    # a checkpoint of another recipe (here another learning rate) is trained afresh, not resumed
    monkeypatch.setattr(trainer, "run_quietly", lambda argv: calls.append(argv))
    calls = []
    recipe = mx.SCALES["smoke"]["size"]["recipe"]
    mx.train_model(str(work / "size" / "4x16_n2_s1"), (4, 16, 2), 2, dict(recipe, lr=1e-4), 1338, log=print)
    mx.train_model(str(work / "size" / "4x16_n2_s1"), (4, 16, 2), 2, dict(recipe, iters=5), 1338, log=print)
    assert [argv[-1] for argv in calls] == ["--overwrite", "--resume"]  # same recipe, longer: resumed
