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
from bench import mtp_experiments as mx, records
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
    full = "polynomial:ops=+*o-,m=1-5,ood=6-8"  # the paper's mix; the default is + * - with 1 operation, ood 2
    a, b = data.make_task_split.__wrapped__(full, "train", 300, 5), data.make_task_split.__wrapped__(full, "train", 300, 5)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], data.make_task_split.__wrapped__(full, "train", 300, 6)[0])
    tok = data.POLYNOMIAL_TOKENIZER
    for name, split, (lo, hi), ops in [(full, "train", (1, 5), "+*o-"), (full, "val:ood", (6, 8), "+*o-"),
                                       ("polynomial", "train", (1, 1), "+*-"), ("polynomial", "val:ood", (2, 2), "+*-")]:
        tokens, scored = data.make_task_split.__wrapped__(name, split, 300, 7)
        counts = set()
        for ep, sc in zip(tokens, scored):
            text = tok.decode(ep)
            m = re.fullmatch(r"\n([^=]+)=([0-6]{5});_*", text)
            assert m, text
            counts.add(len(re.findall(r"[-+*o]", m.group(1))))
            assert set(re.findall(r"[-+*o]", m.group(1))) <= set(ops)
            assert "".join(map(str, parse_poly(m.group(1)))) == m.group(2)
            assert tok.decode(ep[sc]) == m.group(2)
        assert counts == set(range(lo, hi + 1))
    tokens, scored = data.make_task_split.__wrapped__("induction", "val", 200, 3)
    assert np.array_equal(tokens, data.make_task_split.__wrapped__("induction", "val", 200, 3)[0])
    tok = data.INDUCTION_TOKENIZER
    for ep, sc in zip(tokens, scored):
        text = tok.decode(ep)[1:]  # without BOS: 48 symbols, a 12-symbol name in each half
        again = int(np.nonzero(sc)[0][0]) - 2  # the recurrence's cue (text index; + 1 for BOS, the cue not scored)
        name = text[again:again + 12]
        first = text.index(name)
        assert len(set(name)) == 12 and first + 12 <= 24 <= again
        assert all(text.count(c) == 2 for c in name)  # a name's symbols appear nowhere in the filler
        assert list(np.nonzero(sc)[0]) == list(range(again + 2, again + 13))


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
    every = data.load_data("polynomial:loss=all")  # the loss on every token: only padding is ignored
    x, y = every.get_batch("train", 4, every.E - 1, torch.Generator().manual_seed(0))
    assert (x[:, 0] == every.tokenizer.bos).all() and ((y == -1)[:, :-1] == (x[:, 1:] == every.tokenizer.pad)).all()


def hand_built_polynomial_batch(ds):
    """Two episodes written by hand, their answers' target positions counted by hand: (x, y, {row: positions})."""
    episodes = [("(01234+56012)=50246;", 13), ("-(10000*02000)=05000;", 14)]  # (text, index of its '=')
    tokens, scored = data.encode_episodes(ds.tokenizer, ds.E, [(t, list(range(e + 1, e + 6))) for t, e in episodes])
    x, y = ds.windows(tokens, scored, ds.E - 1)
    # y[t] is the token after x[t]; x[0] is BOS, so the answer digit at text index j is the target at t = j
    return x, y, {0: [15, 16, 17, 18, 19], 1: [16, 17, 18, 19, 20]}, [t for t, _ in episodes]


def test_polynomial_answer_mask_covers_exactly_the_answer_tokens_for_every_head():
    ds = data.load_data("polynomial:m=1,ood=2")  # E = 29 tokens: the hand-built episodes fit
    x, y, answer, texts = hand_built_polynomial_batch(ds)
    for row, positions in answer.items():
        assert (y[row] != -1).nonzero().flatten().tolist() == [p - 1 for p in positions]
        assert ds.tokenizer.decode(y[row][y[row] != -1]) == texts[row].split("=")[1][:5]
    torch.manual_seed(0)
    model = MTP(GPTConfig(block_size=ds.E - 1, vocab_size=ds.vocab_size, n_layer=4, n_head=2, n_embd=16), 4)
    z = model.trunk_hidden(x)
    for i in range(4):  # head i (0-based) predicts x_t+i+1 = y[t + i]: trained at t = answer target - i, only
        logits = model.head_logits(i, z)
        rows = [(r, p - 1 - i) for r, ps in answer.items() for p in ps]
        expected = torch.stack([torch.nn.functional.cross_entropy(logits[r, t], y[r, t + i]) for r, t in rows]).mean()
        torch.testing.assert_close(head_loss(logits, y, i), expected)
        trained = (y[:, i:] != -1).nonzero().tolist()  # (row, t) where head i has a target
        assert sorted(map(tuple, trained)) == sorted(rows)
    xs, ys = ds.get_batch("train", 64, ds.E - 1, torch.Generator().manual_seed(1))  # fresh episodes: the same rule
    for xr, yr in zip(xs, ys):
        text = ds.tokenizer.decode(xr)
        eq = text.index("=")
        assert (yr != -1).nonzero().flatten().tolist() == list(range(eq, eq + 5))


def test_fresh_training_episodes_every_batch_deterministic_given_the_generator():
    ds = data.load_data("polynomial")
    a = ds.get_batch("train", 32, ds.E - 1, torch.Generator().manual_seed(3))[0]
    b = ds.get_batch("train", 32, ds.E - 1, torch.Generator().manual_seed(3))[0]
    gen = torch.Generator().manual_seed(3)
    c, d = (ds.get_batch("train", 32, ds.E - 1, gen)[0] for _ in range(2))
    assert torch.equal(a, b) and torch.equal(a, c) and not torch.equal(c, d)
    pool = {ds.tokenizer.decode(e) for e in ds.episodes["train"]}  # the fixed pool is not what training draws from
    assert sum(ds.tokenizer.decode(e) in pool for e in torch.cat([c, d])) < 8


def test_two_operation_polynomial_run_trains_on_answer_tokens_only(tmp_path, monkeypatch):
    """train.py at smoke scale on two-operation expressions: every head's loss sees only answer digits."""
    seen = []

    def recording_head_loss(logits, y, i):
        seen.append((y.clone(), i))
        return head_loss(logits, y, i)
    monkeypatch.setattr("mtp.head_loss", recording_head_loss)
    metrics = train.main(TINY + ["--dataset", "polynomial:m=2,ood=3", "--block_size", "36", "--n_future", "2",
                                 "--max_iters", "3", "--eval_interval", "3", "--out_dir", str(tmp_path)])
    assert {i for _, i in seen} == {0, 1} and metrics["iter"] == 3
    tok = data.POLYNOMIAL_TOKENIZER
    for y, _ in seen:
        for row in y:
            kept = row[row != -1]
            assert len(kept) == 5 and set(tok.decode(kept)) <= set("0123456")
            start = (row != -1).nonzero()[0].item()
            assert (row != -1).nonzero().flatten().tolist() == list(range(start, start + 5))
    ds = data.load_data("polynomial:m=2,ood=3")
    x, _ = ds.get_batch("train", 16, ds.E - 1, torch.Generator().manual_seed(0))
    assert all(len(re.findall(r"[-+*]", tok.decode(e).split("=")[0])) == 2 for e in x)


@pytest.mark.parametrize("name, message", [
    ("polynomial:ops=", "non-empty set of distinct operations"),
    ("polynomial:ops=+/", "non-empty set of distinct operations"),
    ("polynomial:m=1-3,ood=2-4", "more operations than training"),
    ("polynomial:m=2,ood=2", "more operations than training"),
    ("induction:names=0", "at least 1 name"),
    ("induction:name_len=1", "at least 1 name of at least 2 symbols"),
    ("induction:names=6,name_len=12", "fewer distinct names than the configuration needs"),
    ("induction:names=2,name_len=12,length=64", "length >= 96"),
    ("polynomial:steps=3", "not an option of polynomial"),
])
def test_bad_task_configurations_are_one_line_errors(name, message, tmp_path, capsys):
    with pytest.raises(UserError, match=message):
        data.load_data(name)
    err = one_line_error(capsys, train.main, TINY + ["--dataset", name, "--out_dir", str(tmp_path)])
    assert message in err and not (tmp_path / "ckpt.pt").exists()


TINY = ["--objective", "mtp", "--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--batch_size", "4",
        "--eval_iters", "2", "--brier_positions", "0", "--sample_tokens", "5", "--warmup_iters", "2"]


def test_train_sample_speculative_and_bad_inputs(tmp_path, capsys):
    out = tmp_path / "poly"
    train.main(TINY + ["--dataset", "polynomial", "--block_size", "28", "--n_future", "2", "--max_iters", "4",
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
    for task in ("polynomial", "induction"):
        ds = data.load_data(task)
        block = ds.E - 1
        model = MTP(GPTConfig(block_size=block, vocab_size=ds.vocab_size, n_layer=2, n_head=2, n_embd=16), 2).eval()
        with torch.no_grad():  # an untrained model that predicts the answer digits often enough to score
            model.trunk.wte.weight.mul_(30)
        acc = mx.task_accuracy(model, ds, "val", block)
        assert acc["acc"] == pytest.approx(ds.accuracy(lambda x: model.trunk(x)[0], "val", block_size=block))
        if task == "polynomial":  # exact match per number of operations, weighted back, is the overall figure
            tok = ds.tokenizer
            ops = [len(mx.operations(tok.decode(e))) for e in ds.episodes["val"]]
            assert sum(acc[f"acc_m{m}"] * ops.count(m) for m in set(ops)) / len(ops) == pytest.approx(acc["acc"])
            assert acc["n_scored"] == len(ops) and {"acc_m1_add", "acc_m1_mul", "acc_m1_neg"} <= set(acc)
        else:
            assert acc["acc"] == acc["token_acc"] and acc["n_scored"] == 11 * len(ds.episodes["val"])


def record(n, seed, loss, L=2, d=8):
    """A size-sweep run in bench/records.py's format."""
    return dict(config=dict(sweep="size", model=[L, d, 2], n=n, seed=seed),
                metrics=dict(params_non_embedding=100, val_loss_h1=loss, brier1=-loss, brierlm=10 * loss, tokens=200),
                provenance=dict(commit="x", code="y", threads=1, seed=seed))


def test_size_summary_pairs_seeds_against_n1():
    runs = {"2x8_n1_s0": record(1, 0, 1.0), "2x8_n1_s1": record(1, 1, 2.0), "2x8_n4_s0": record(4, 0, 1.5),
            "2x8_n4_s1": record(4, 1, 2.1), "2x8_n4_s2": record(4, 2, 9.0)}  # seed 2 has no n = 1 partner: left out
    rows = {r["n"]: r for r in figs.size_summary({"runs": runs})}
    assert rows[1]["d_val_loss_h1"] == 0 and rows[4]["seeds"] == 2
    assert rows[4]["d_val_loss_h1"] == pytest.approx(0.3)
    assert rows[4]["d_val_loss_h1_se"] == pytest.approx(np.std([0.5, 0.1], ddof=1) / np.sqrt(2))
    assert rows[4]["d_brierlm"] == pytest.approx(3.0) and rows[4]["val_loss_h1"] == pytest.approx(1.8)


def test_sweeps_at_smoke_scale_write_results_with_provenance_resume_and_verify(tmp_path, monkeypatch, capsys):
    out, work = tmp_path / "results", tmp_path / "work"
    reports = mx.run("all", "smoke", str(out), str(work), log=lambda *a: None)
    assert set(reports) == set(mx.SWEEPS) and all((out / f"mtp_{s}.json").exists() for s in mx.SWEEPS)
    for s, report in reports.items():
        assert report["experiment"] == f"mtp_{s}" and report["module"] == "bench.mtp_experiments"
        for rec in report["runs"].values():
            prov = rec["provenance"]
            assert rec["config"]["sweep"] == s and prov["config"] == rec["config"] and prov["seed"] == rec["config"]["seed"]
            assert prov["code"] == records.code_hash(["bench.mtp_experiments"]) and prov["wall_seconds"] >= 0
    size = reports["size"]["runs"]
    assert len(size) == 12 and all(r["metrics"]["brier1"] <= 1 and r["metrics"]["val_loss_h1"] > 0 for r in size.values())
    tokens = {(tuple(r["config"]["model"]), r["metrics"]["tokens"]) for r in size.values()}
    assert len(tokens) == 2  # more parameters, more tokens: one count per size
    assert {(r["n"], r["seeds"]) for r in figs.size_summary(reports["size"]) if r["n_embd"] == 16} == {
        (1, 2), (2, 2), (4, 2)}
    ind = reports["induction"]["runs"]["4x16_n2_s1"]["metrics"]
    assert [p["iter"] for p in ind["curve"]] == [2, 4] and 1 / 62 < ind["no_skill"]["val"]["guess_seen"] < 0.2
    poly = reports["polynomial"]["runs"]["4x16_n1_s0"]["metrics"]
    assert {"acc_val", "acc_val_ood", "acc_m3_val_ood", "acc_m1_val"} <= set(poly)
    assert poly["no_skill"]["val_ood"]["chance"] == 7 ** -5
    assert set(reports["bytes"]["runs"]) == {"pystdlib_n2", "pystdlib_n4", "shakespeare_n2", "shakespeare_n4"}
    assert all(r["metrics"]["identical"] for r in reports["bytes"]["runs"].values())
    speed = reports["speedup"]["runs"]
    assert set(speed) == {"code", "counting"} and all(r["metrics"]["identical"] for r in speed.values())
    # finished runs are reused: nothing retrains; a run lost from the JSON is measured again from its checkpoint
    report = json.loads((out / "mtp_induction.json").read_text())
    lost = report["runs"].pop("4x16_n2_s1")
    (out / "mtp_induction.json").write_text(json.dumps(report))
    monkeypatch.setattr(trainer, "run_quietly", lambda argv: pytest.fail("retrained " + " ".join(argv)))
    again = mx.run("induction", "smoke", str(out), str(work), log=lambda *a: None)["induction"]["runs"]
    assert again["4x16_n2_s1"]["metrics"]["acc_val"] == lost["metrics"]["acc_val"]
    # a checkpoint made with another configuration (or by other code) is trained afresh, not resumed
    monkeypatch.setattr(trainer, "run_quietly", lambda argv: calls.append(argv))
    calls = []
    cfg = dict(again["4x16_n2_s1"]["config"])
    folder = str(work / "induction" / "4x16_n2_s1")
    with pytest.raises(UserError):  # the old checkpoint is removed; the fake trainer writes none
        mx.train_in_stages(dict(cfg, lr=1e-4), folder, str(work), records.code_hash(["bench.mtp_experiments"]))
    assert calls[0][-1] == "--overwrite" and "--resume" not in calls[0]
    # bench verify: the run again from nothing at the current code, the same thread count: exact agreement
    monkeypatch.undo()
    path = str(out / "mtp_polynomial.json")
    assert records.verify(path, "4x16_n1_s0", work=str(tmp_path), record=True, log=print)
    assert "agree" in capsys.readouterr().out
    assert json.loads(open(path).read())["runs"]["4x16_n1_s0"]["verified"][0]["agree"]
