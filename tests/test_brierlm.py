"""BrierLM against independent references: closed forms, brute-force enumeration, hand-built sequences."""
import itertools
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import brierlm
import objectives
import score
import train
from bench.brierlm_experiments import temperature_sweep
from data import ByteTokenizer, Dataset
from gpt import GPT, GPTConfig
from runtime import UserError, load_checkpoint

Z = 4.5  # tolerance in standard errors (a false alarm about once in 150,000 checks)


def toy_data(val, train_tokens=None):
    val = np.asarray(val, dtype=np.uint16)
    return Dataset("toy", ByteTokenizer(), {"train": val if train_tokens is None else train_tokens, "val": val}, [])


def toy_args(**kw):
    return SimpleNamespace(**{**dict(block_size=16, seed=0, brier_positions=64), **kw})


def context_of(args):
    return brierlm.context_length(args.block_size, getattr(args, "chunk_size", 1))


def evaluate(draw, data, args, n=None, seed=None):
    """Brier-1..4 and BrierLM of a sampler draw(ctx, n_tokens, generator) at args.brier_positions positions."""
    per = brierlm.brier_eval(draw, data, n or args.brier_positions, context_of(args),
                             args.seed if seed is None else seed)["sampled"]
    return brierlm.summarize(per)


def peaked_gpt(vocab, block_size=16, scale=8.0, seed=0):
    torch.manual_seed(seed)
    m = GPT(GPTConfig(block_size=block_size, vocab_size=vocab, n_layer=1, n_head=2, n_embd=16)).eval()
    with torch.no_grad():
        m.wte.weight.mul_(scale)  # tied head: larger embeddings -> sharper, context-dependent distributions
    return m


# ----------------------------------------------------------------------------- the estimator itself

@pytest.mark.parametrize("V,kind", [(2, "flat"), (10, "peaked"), (10, "flat"), (1000, "peaked")])
def test_two_sample_mean_matches_exact_brier_on_known_categoricals(V, kind):
    g = torch.Generator().manual_seed(V)
    p = torch.full((V,), 1.0 / V) if kind == "flat" else torch.softmax(3 * torch.randn(V, generator=g), 0)
    M = 40_000
    for y in (int(p.argmax()), int(p.argmin())):
        x1 = torch.multinomial(p, M, replacement=True, generator=g).view(M, 1)
        x2 = torch.multinomial(p, M, replacement=True, generator=g).view(M, 1)
        est = brierlm.two_sample_estimates(x1, x2, torch.full((M, 1), y), max_n=1)[:, 0].double()
        exact = 2 * p[y].item() - (p.double() ** 2).sum().item()  # closed form
        se = est.std().item() / math.sqrt(M)
        assert abs(est.mean().item() - exact) <= Z * se + 1e-12, (V, kind, y, est.mean().item(), exact, se)


def test_exact_brier1_closed_form():
    p = torch.tensor([[0.5, 0.25, 0.25], [1.0, 0.0, 0.0]])
    got = brierlm.exact_brier1(p.clamp_min(1e-30).log(), torch.tensor([1, 0]))
    assert torch.allclose(got, torch.tensor([2 * 0.25 - 0.375, 1.0]), atol=1e-6)


def brute_force_brier(model, ctx, ref, V):
    """Exact Brier-n, n = 1..4, per context by enumerating every n-gram with the model's probabilities."""
    out = torch.zeros(len(ctx), 4, dtype=torch.float64)
    with torch.no_grad():
        grams = torch.tensor(list(itertools.product(range(V), repeat=4)))  # (V^4, 4)
        for i in range(len(ctx)):
            seqs = torch.cat([ctx[i].expand(len(grams), -1), grams[:, :3]], 1)
            logp = torch.log_softmax(model(seqs)[0][:, ctx.size(1) - 1:].double(), -1)     # (V^4, 4, V)
            lp = logp.gather(2, grams.unsqueeze(2)).squeeze(2).cumsum(1)                  # log P(g_1..g_n)
            for n in range(1, 5):
                # each n-gram appears V^(4-n) times among the 4-grams: keep one copy of each
                first = (grams[:, n:] == 0).all(1)
                p_n = lp[first, n - 1].exp()
                match = (grams[first, :n] == ref[i, :n]).all(1)
                out[i, n - 1] = 2 * p_n[match].sum() - (p_n ** 2).sum()
    return out


def test_both_estimators_match_brute_force_brier_n_on_a_tiny_gpt():
    V, R = 3, 3000
    model = peaked_gpt(V, scale=6.0)
    g = torch.Generator().manual_seed(1)
    ctx = torch.randint(V, (3, 8), generator=g)
    ref = torch.randint(V, (3, 4), generator=g)
    exact = brute_force_brier(model, ctx, ref, V)
    for i in range(len(ctx)):
        c, y = ctx[i:i + 1].expand(R, -1), ref[i:i + 1].expand(R, -1)
        x1 = model.generate(c, 4, temperature=1.0, generator=g)[:, -4:]
        x2 = model.generate(c, 4, temperature=1.0, generator=g)[:, -4:]
        for est in (brierlm.two_sample_estimates(x1, x2, y).double(),
                    brierlm.variance_reduced_estimates(lambda idx: model(idx)[0], c, y, x1, x2).double()):
            se = est.std(0) / math.sqrt(R)
            assert ((est.mean(0) - exact[i]).abs() <= Z * se + 1e-6).all(), (i, est.mean(0), exact[i], se)
        # variance-reduced Brier-1 has no sampling left in it: it IS the exact Brier-1
        vr1 = brierlm.variance_reduced_estimates(lambda idx: model(idx)[0], c[:1], y[:1], x1[:1], x2[:1])[0, 0]
        assert abs(vr1.item() - exact[i, 0].item()) < 1e-5


# ----------------------------------------------------------------------------- closed-form models

COUNT = np.arange(3000) % 256  # every byte follows its predecessor + 1: the true continuation is known


def oracle_draw(args, shift=1, wrong_from=None, chunk=1):
    def draw(ctx, n, generator):
        assert ctx.size(1) == context_of(args) and ctx.size(1) % chunk == 0
        out = (ctx[:, -1:] + shift + torch.arange(n)) % 256
        if wrong_from is not None:
            out[:, wrong_from] = (out[:, wrong_from] + 7) % 256
        return out
    return draw


def test_perfect_model_scores_100_and_ngram_alignment():
    data, args = toy_data(COUNT), toy_args()
    perfect = evaluate(oracle_draw(args), data, args)
    assert perfect == {"brier1": 1.0, "brier2": 1.0, "brier3": 1.0, "brier4": 1.0, "brierlm": 100.0}
    chunked = toy_args(block_size=17, chunk_size=3)  # a CALM-like model sees 12 = 4 chunks of context
    assert evaluate(oracle_draw(chunked, chunk=3), data, chunked)["brierlm"] == 100.0
    # one token too far ahead (what an off-by-one between context and reference would look like): a certain,
    # wrong model scores 2 * 0 - 1 = -1 on every n, and BrierLM 0 (not 100 = 100 * ((-1)^4)^(1/4))
    shifted = evaluate(oracle_draw(args, shift=2), data, args)
    assert [shifted[f"brier{n}"] for n in range(1, 5)] == [-1.0] * 4 and shifted["brierlm"] == 0.0
    # third token wrong: Brier-1, -2 stay 1; Brier-3 and Brier-4 need every token of the n-gram right
    third = evaluate(oracle_draw(args, wrong_from=2), data, args)
    assert [third[f"brier{n}"] for n in range(1, 5)] == [1.0, 1.0, -1.0, -1.0] and third["brierlm"] == 0.0


def test_windows_end_at_chunk_boundaries():
    for chunk, block, expect in [(1, 16, 12), (3, 16, 12), (3, 17, 12), (4, 20, 16), (8, 20, 16)]:
        assert brierlm.context_length(block, chunk) == expect
    ctx, ref = brierlm.eval_windows(toy_data(COUNT), "val", 32, 12, torch.Generator().manual_seed(0))
    assert torch.equal(ref, (ctx[:, -1:] + 1 + torch.arange(4)) % 256)  # the 4 tokens right after the context


def test_uniform_model_scores_closed_form():
    V, N = 2, 6000
    data, args = toy_data(np.random.default_rng(0).integers(0, V, 20_000)), toy_args(brier_positions=N)

    def uniform(ctx, n, generator):
        return torch.randint(V, (ctx.size(0), n), generator=generator)

    est = brierlm.brier_eval(uniform, data, N, context_of(args), seed=3)["sampled"]
    exact = np.array([V ** -n for n in range(1, 5)])  # 2/V^n - V^n/V^(2n)
    se = est.std(0, ddof=1) / math.sqrt(N)
    assert (np.abs(est.mean(0) - exact) <= Z * se).all(), (est.mean(0), exact, se)
    score, score_se = brierlm.brierlm_from_briers(est.mean(0)), brierlm.brierlm_stderr(est)
    assert abs(score - 100 * V ** -2.5) <= Z * score_se


# ----------------------------------------------------------------------------- determinism and RNG hygiene

def test_deterministic_given_seed_and_global_rng_untouched():
    model, data = peaked_gpt(256, scale=20.0), toy_data(np.random.default_rng(0).integers(0, 256, 5000))
    obj_global = objectives.Objective("global", None, None, None,  # a sampler that uses the global RNG
                                      draw=lambda m, ctx, n, g, a: objectives.default_draw(m, ctx, n, None, a))
    for objective in (objectives.NTP, obj_global):
        state = torch.get_rng_state()
        a = objectives.brier_scores(model, objective, data, toy_args(), 64, 5)["sampled"]
        assert torch.equal(state, torch.get_rng_state())
        b = objectives.brier_scores(model, objective, data, toy_args(), 64, 5)["sampled"]
        c = objectives.brier_scores(model, objective, data, toy_args(), 64, 6)["sampled"]
        assert np.array_equal(a, b) and not np.array_equal(a, c)
        assert np.abs(a).sum() > 0  # not a degenerate all-zero comparison


def tiny_train(tmp_path, name, brier_positions, text_file):
    out = tmp_path / name
    train.main(["--dataset", f"file:{text_file}", "--tokenizer", "bytes", "--n_layer", "1", "--n_head", "2",
                "--n_embd", "16", "--block_size", "16", "--batch_size", "4", "--max_iters", "6",
                "--eval_interval", "3", "--eval_iters", "2", "--warmup_iters", "1", "--dropout", "0.1",
                "--brier_positions", str(brier_positions), "--sample_tokens", "0", "--device", "cpu",
                "--out_dir", str(out)])
    return out / "ckpt.pt"


def test_training_stream_unchanged_checkpoint_and_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LMPAPERS_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    off, on = tiny_train(tmp_path, "off", 0, text), tiny_train(tmp_path, "on", 16, text)
    ck_off, ck_on = load_checkpoint(str(off)), load_checkpoint(str(on))
    # dropout draws from the global RNG: evaluating BrierLM in between must not shift it
    assert ck_off["metrics"]["train_loss_last"] == ck_on["metrics"]["train_loss_last"]
    assert all(torch.equal(ck_off["model"][k], ck_on["model"][k]) for k in ck_off["model"])
    assert "brierlm" not in ck_off["metrics"] and 0.0 <= ck_on["metrics"]["brierlm"] <= 100.0
    # the score stored at the last eval is reproduced from the checkpoint alone
    model, objective, saved, _ = objectives.load_model(str(on))
    per = objectives.brier_scores(model, objective, toy_data_from(saved), saved, saved.brier_positions, saved.seed)
    again = brierlm.summarize(per["sampled"])
    assert again["brierlm"] == ck_on["metrics"]["brierlm"]
    score.main(["--ckpt", str(on), "--positions", "16", "--seed", str(saved.seed), "--device", "cpu",
                  "--exact"])
    out = capsys.readouterr().out
    assert f"BrierLM {again['brierlm']:.3f}" in out and "exact Brier-1" in out


def toy_data_from(saved):
    from data import load_data
    return load_data(saved.dataset, saved.tokenizer)


# ----------------------------------------------------------------------------- bad input

def test_bad_input_is_a_one_line_user_error(capsys):
    x = torch.zeros(3, 4, dtype=torch.long)
    with pytest.raises(UserError, match="1..4"):
        brierlm.two_sample_estimates(x, x, x, max_n=5)
    with pytest.raises(UserError, match="need"):
        brierlm.two_sample_estimates(x, x, x[:, :2])
    with pytest.raises(UserError, match="not a language model"):
        objectives.brier_scores(None, objectives.AUTOENCODER, toy_data(COUNT), toy_args(), 8, 0)
    with pytest.raises(UserError, match="block_size"):
        evaluate(oracle_draw(toy_args()), toy_data(COUNT), toy_args(block_size=4))
    with pytest.raises(UserError, match="shorter"):
        evaluate(oracle_draw(toy_args()), toy_data(np.arange(10)), toy_args())
    with pytest.raises(UserError, match="must return"):
        evaluate(lambda c, n, g: c[:, :n - 1], toy_data(COUNT), toy_args())
    with pytest.raises(SystemExit) as e:
        score.main(["--ckpt", "/nonexistent/ckpt.pt"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err


# ----------------------------------------------------------------------------- correlation helpers

def test_pearson_and_spearman_against_numpy_and_by_hand():
    import runtime
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=50), rng.normal(size=50)
    assert abs(runtime.pearson(a, b) - np.corrcoef(a, b)[0, 1]) < 1e-12
    assert abs(runtime.spearman(a, np.exp(a)) - 1.0) < 1e-12   # any increasing map: rank correlation 1
    assert abs(runtime.spearman(a, -a ** 3) + 1.0) < 1e-12
    assert list(runtime.ranks([10, 20, 20, 5])) == [2.0, 3.5, 3.5, 1.0]
    # by hand: ranks x = 1,2,3,4, y = 1,3,2,4 -> 1 - 6 * (0+1+1+0) / (4 * 15) = 0.8
    assert abs(runtime.spearman([1, 2, 3, 4], [1, 3, 2, 4]) - 0.8) < 1e-12


def test_temperature_sweep_matches_the_models_own_loss_and_the_argmax_limit():
    model = peaked_gpt(256, scale=4.0)
    data = toy_data(np.random.default_rng(0).integers(0, 256, 4000))
    sweep = temperature_sweep(model, data, toy_args(), [0.002, 1.0], n_batches=2, batch_size=4, seed=0)
    gen = torch.Generator().manual_seed(0)
    batches = [data.get_batch("val", 4, 16, gen) for _ in range(2)]
    with torch.no_grad():
        ce = np.mean([model(x, y)[1].item() for x, y in batches])                        # GPT's own loss
        argmax_acc = np.mean([(model(x)[0].argmax(-1) == y).float().mean().item() for x, y in batches])
    assert abs(sweep[1.0]["cross_entropy"] - ce) < 1e-4
    assert abs(sweep[0.002]["sample_acc"] - argmax_acc) < 1e-3  # T -> 0: a sample is the argmax
