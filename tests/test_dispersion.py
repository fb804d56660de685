"""Representation dispersion: the O(N d) metric against brute force and closed forms, the push-away objective
against NTP, and the kNN-LM against its two limits."""
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import dispersion as dp
import train
from gpt import GPT, GPTConfig
from runtime import UserError, correlation, load_checkpoint


def brute_force(h):
    """(1 / N(N-1)) sum_{i != j} (1 - cos(h_i, h_j)), the definition, with an explicit double loop."""
    N = len(h)
    total = sum(1 - F.cosine_similarity(h[i], h[j], dim=0) for i in range(N) for j in range(N) if i != j)
    return total / (N * (N - 1))


def tiny(vocab=50, **kw):
    torch.manual_seed(0)
    cfg = dict(block_size=16, vocab_size=vocab, n_layer=2, n_head=2, n_embd=32)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg))




# ----------------------------------------------------------------------------- the metric

def test_fast_dispersion_equals_brute_force_pairwise_cosine_distance():
    torch.manual_seed(0)
    for N, d in [(2, 3), (7, 5), (40, 16)]:
        h = torch.randn(N, d, dtype=torch.float64) + 0.5  # off-centre: not ~orthogonal, D clearly below 1
        torch.testing.assert_close(dp.dispersion(h), brute_force(h), rtol=1e-12, atol=1e-12)
    batch = torch.randn(3, 4, 9, 6, dtype=torch.float64)  # sets along dim -2, any leading shape
    out = dp.dispersion(batch)
    assert out.shape == (3, 4)
    torch.testing.assert_close(out[2, 1], brute_force(batch[2, 1]), rtol=1e-12, atol=1e-12)


def test_fast_dispersion_gradient_equals_brute_force_gradient():
    torch.manual_seed(1)
    h = torch.randn(12, 5, dtype=torch.float64, requires_grad=True)
    fast, = torch.autograd.grad(dp.dispersion(h), h)
    slow, = torch.autograd.grad(brute_force(h), h)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-12)


def test_closed_forms_identical_orthonormal_antipodal():
    v = torch.randn(7, dtype=torch.float64)
    assert abs(dp.dispersion(v.repeat(10, 1)).item()) < 1e-12              # identical directions: 0
    assert abs(dp.dispersion(3.0 * v.repeat(4, 1) * torch.arange(1, 5, dtype=torch.float64)[:, None]).item()) < 1e-12
    q, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))         # 8 orthonormal vectors
    assert abs(dp.dispersion(q).item() - 1) < 1e-12
    # m antipodal pairs +-e_i: each vector is at distance 2 from its partner and 1 from the N-2 others,
    # so D = (2 + N - 2) / (N - 1) = N / (N - 1), the maximum (the unit vectors sum to zero)
    for m in (1, 3):
        e = torch.eye(m, dtype=torch.float64)
        N = 2 * m
        assert abs(dp.dispersion(torch.cat([e, -e])).item() - N / (N - 1)) < 1e-12
    a, b = torch.randn(5, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    ref = torch.stack([1 - F.cosine_similarity(x, y, dim=0) for x in a for y in b]).mean()
    torch.testing.assert_close(dp.cross_dispersion(a, b), ref)


def test_bad_sets_are_one_line_errors():
    with pytest.raises(UserError, match="at least two"):
        dp.dispersion(torch.randn(1, 4))
    with pytest.raises(UserError, match="at least two"):
        dp.dispersion(torch.randn(4))
    h = torch.randn(5, 4)
    h[2] = 0
    with pytest.raises(UserError, match="zero vector"):
        dp.dispersion(h)


# ----------------------------------------------------------------------------- layer profile

def test_layer_profile_covers_every_sub_layer_and_matches_a_direct_computation():
    model = tiny().eval()
    x = torch.randint(0, 50, (3, 16))
    profile = dp.layer_dispersion(model, [x, x[:1]])
    assert list(profile) == ["layers.0", "layers.1", "layers.2", "attn.0", "attn.1", "ffn_in.0", "ffn_in.1", "mlp.0",
                             "mlp.1", "final"]
    # independent reference: layer 0 is the token embedding (RoPE adds nothing), brute force per row,
    # averaged over the 4 rows (3 + 1) of the two batches
    rows = [model.wte.weight[r].double() for r in list(x) + [x[0]]]
    ref = sum(brute_force(r) for r in rows) / 4
    assert abs(profile["layers.0"] - ref.item()) < 1e-5
    with pytest.raises(UserError, match="out of range"):
        dp.pick(model.hidden_states(x), "attn.2")
    with pytest.raises(UserError, match="unknown layer"):
        dp.pick(model.hidden_states(x), "ffn.0")


def test_correlation_against_known_cases():
    x = torch.arange(1.0, 11.0)
    c = correlation(x, x.exp())  # monotone but not linear
    assert abs(c["spearman"] - 1) < 1e-12 and c["pearson"] < 0.9
    assert abs(correlation(x, -2 * x + 3)["pearson"] + 1) < 1e-12


# ----------------------------------------------------------------------------- the objective

def test_a_gradient_step_on_the_auxiliary_loss_alone_increases_dispersion():
    model = tiny()
    x = torch.randint(0, 50, (4, 16))

    def batch_dispersion():
        return -dp.aux_loss(model.body(model.embed(x)))
    before = batch_dispersion()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    opt.zero_grad()
    (-before).backward()  # L_aux = -D
    opt.step()
    with torch.no_grad():
        after = batch_dispersion()
    assert after.item() > before.item() + 1e-3


@pytest.mark.parametrize("scope", ["batch", "sequence"])
def test_zero_weight_is_exactly_next_token_prediction(scope):
    x, y = torch.randint(0, 50, (3, 16)), torch.randint(0, 50, (3, 16))
    ntp = tiny()
    loss_ntp = ntp(x, y)[1]
    loss_ntp.backward()
    disp = tiny()
    loss_disp, ce, aux = dp.dispersion_loss(disp, x, y, 0.0, scope)
    loss_disp.backward()
    assert torch.equal(loss_ntp, loss_disp)
    for (name, a), b in zip(ntp.named_parameters(), disp.parameters()):
        assert torch.equal(a.grad, b.grad), name
    assert aux.item() < 0 and ce.item() == loss_ntp.item()
    # and a positive weight really changes the gradients, by exactly lambda * dL_aux
    lam = 0.5
    with_aux = tiny()
    loss_aux, _, _ = dp.dispersion_loss(with_aux, x, y, lam, scope)
    loss_aux.backward()
    aux_only = tiny()
    dp.aux_loss(aux_only.body(aux_only.embed(x)), scope).backward()
    w = "blocks.0.attn.c_attn.weight"
    grad = {name: dict(m.named_parameters())[w].grad
            for name, m in [("aux", with_aux), ("ntp", ntp), ("only", aux_only)]}
    torch.testing.assert_close(grad["aux"], grad["ntp"] + lam * grad["only"])


def test_command_line_training_logs_both_terms_and_per_domain_metrics(tmp_path, capsys):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("to be or not to be, that is the question. " * 200)
    b.write_text("def f(x):\n    return x * 2 + 1\n" * 300)
    out = tmp_path / "run"
    train.main(["--objective", "dispersion", "--dispersion_weight", "0.1", "--dataset", f"file:{a}+file:{b}",
                "--tokenizer", "bytes", "--block_size", "32", "--n_layer", "1", "--n_embd", "32", "--n_head", "2",
                "--batch_size", "4", "--max_iters", "4", "--eval_interval", "4", "--eval_iters", "2",
                "--log_interval", "2", "--sample_tokens", "0", "--brier_positions", "0", "--out_dir", str(out)])
    printed = capsys.readouterr().out
    assert "| ce " in printed and "| aux " in printed and "| disp_run " in printed
    metrics = load_checkpoint(str(out / "ckpt.pt"))["metrics"]
    for key in ("val_ppl", "val_disp", "val_ppl_a", "val_ppl_b", "val_disp_a", "val_disp_b"):
        assert key in metrics and math.isfinite(metrics[key]), key
    assert 0 < metrics["val_disp"] < 2
    for bad in (["--dispersion_weight", "-1"], ["--dispersion_weight", "nan"], ["--dispersion_scope", "all"]):
        with pytest.raises(SystemExit) as e:
            train.main(["--objective", "dispersion", "--tokenizer", "bytes", "--out_dir", str(tmp_path / "x")] + bad)
        assert e.value.code == 2


# ----------------------------------------------------------------------------- kNN-LM

def test_knn_lm_with_weight_zero_is_the_language_model():
    model = tiny().eval()
    store = [(torch.randint(0, 50, (4, 16)), torch.randint(0, 50, (4, 16)))]
    evalb = [(torch.randint(0, 50, (3, 16)), torch.randint(0, 50, (3, 16))) for _ in range(2)]
    with torch.no_grad():  # reference: GPT.forward's own cross-entropy
        lm_ppl = math.exp(sum(model(x, y)[1].item() for x, y in evalb) / 2)
    for layer in ("final", "attn.0", "layers.1"):
        ds = dp.build_datastore(model, store, layer)
        assert abs(dp.knn_lm_perplexity(model, evalb, ds, layer, weight=0.0) / lm_ppl - 1) < 1e-6
        assert dp.knn_lm_perplexity(model, evalb, ds, layer, weight=0.5) != pytest.approx(lm_ppl)


def test_knn_lm_on_its_own_datastore_recovers_the_next_token():
    model = tiny().eval()
    x = torch.stack([torch.randperm(50)[:16] for _ in range(4)])  # no two rows share a prefix
    y = torch.randint(0, 50, (4, 16))
    for layer in ("final", "mlp.1", "layers.2"):
        ds = dp.build_datastore(model, [(x, y)], layer)
        assert dp.knn_lm_perplexity(model, [(x, y)], ds, layer, weight=1.0, k=1) == pytest.approx(1.0, abs=1e-9)
        keys, values = ds
        _, idx = dp.knn_search(keys, keys, k=1)
        assert torch.equal(values[idx[:, 0]], y.flatten())


def test_knn_and_layer_choice_bad_input():
    model = tiny().eval()
    x = torch.randint(0, 50, (2, 16))
    with pytest.raises(UserError, match="empty datastore"):
        dp.build_datastore(model, [], "final")
    with pytest.raises(UserError, match="empty datastore"):
        dp.knn_search(torch.randn(3, 32), torch.zeros(0, 32), 4)
    with pytest.raises(UserError, match="out of range"):
        dp.build_datastore(model, [(x, x)], "layers.3")
    ds = dp.build_datastore(model, [(x, x)], "final")
    with pytest.raises(UserError, match="weight"):
        dp.knn_lm_perplexity(model, [(x, x)], ds, "final", weight=1.5)
    profile = {"attn.0": 0.3, "mlp.0": 0.7, "final": 0.5}
    assert dp.choose_layer(profile) == "mlp.0"
    assert dp.choose_layer(profile, ["attn.0", "final"]) == "final"
    with pytest.raises(UserError):
        dp.choose_layer(profile, ["attn.9"])


def test_padding_targets_are_skipped_like_the_language_model_skips_them():
    model = tiny().eval()
    x, y = torch.randint(0, 50, (3, 16)), torch.randint(0, 50, (3, 16))
    y[0, 10:] = -1  # padded episode ends (the synthetic tasks' convention)
    y[2, 3:] = -1
    with torch.no_grad():
        lm_ppl = math.exp(model(x, y)[1].item())  # GPT.forward: cross-entropy with ignore_index=-1
    assert abs(dp.perplexity_and_dispersion(model, [(x, y)])["ppl"] / lm_ppl - 1) < 1e-6
    ds = dp.build_datastore(model, [(x, y)], "final")
    assert len(ds[0]) == 16 + 10 + 3 and bool((ds[1] >= 0).all())
    assert abs(dp.knn_lm_perplexity(model, [(x, y)], ds, "final", weight=0.0) / lm_ppl - 1) < 1e-6


# ----------------------------------------------------------------------------- the dispersion gap (App. 2)

def brute_force_between(a, b):
    return torch.stack([1 - F.cosine_similarity(x, y, dim=0) for x in a for y in b]).mean()


def test_dispersion_gap_on_hand_built_token_vectors_equals_the_formula_without_a_forward_pass():
    model = tiny(vocab=12, n_embd=4)
    W = torch.randn(12, 4, dtype=torch.float64)
    e = torch.eye(4, dtype=torch.float64)
    W[0], W[1], W[2] = e[0], e[1], -e[0]            # T = {0, 1}: orthogonal; T' = {2}: antipodal to 0, orthogonal to 1
    with torch.no_grad():
        model.lm_head.weight.copy_(W.float())       # the output matrix (tied to the input embedding)

    def no_forward(*a, **k):
        raise AssertionError("the dispersion gap must not run the model")
    model.forward = model.hidden_states = model.body = no_forward
    g = dp.dispersion_gap(model, [0, 1, 1], [2])    # duplicates count once
    # within(T) = 1 (orthogonal pair), between = mean(2, 1) = 1.5, G = within + between (a sum)
    assert g["within"] == pytest.approx(1.0) and g["between"] == pytest.approx(1.5) and g["gap"] == pytest.approx(2.5)
    task, ref = [3, 5, 7, 8], [1, 4, 6, 9, 10, 5]    # 5 is in both: it counts as a task token only
    g = dp.dispersion_gap(model, torch.tensor(task), ref)
    Wf = model.lm_head.weight.detach().double()
    within = brute_force(Wf[task])
    between = brute_force_between(Wf[task], Wf[[1, 4, 6, 9, 10]])
    assert g["within"] == pytest.approx(within.item(), abs=1e-6)
    assert g["between"] == pytest.approx(between.item(), abs=1e-6)
    assert g["gap"] == pytest.approx((within + between).item(), abs=1e-6)


@pytest.mark.parametrize("task, ref, message", [([], [1, 2], "at least two distinct task tokens"),
                                                ([3], [1, 2], "at least two distinct task tokens"),
                                                ([1, 2], [], "reference tokens are empty or all task tokens"),
                                                ([1, 2, 3], [3, 2, 1, 1], "reference tokens are empty or all task"),
                                                ([1, 50], [2], "task token id 50 is outside the vocabulary"),
                                                ([1, 2], [-1], "reference token id -1 is outside the vocabulary")])
def test_dispersion_gap_bad_token_sets_are_one_line_errors(task, ref, message):
    with pytest.raises(UserError, match=message) as e:
        dp.dispersion_gap(tiny(), task, ref)
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- the cross-domain loss

def test_cross_domain_loss_is_minus_the_mean_cosine_distance_over_between_domain_pairs_only():
    torch.manual_seed(3)
    h = torch.randn(5, 3, 4, dtype=torch.float64) + 0.3
    domains = torch.tensor([0, 1, 0, 2, 1])
    flat, labels = h.reshape(-1, 4), domains.repeat_interleave(3)
    pairs = [1 - F.cosine_similarity(flat[i], flat[j], dim=0) for i in range(15) for j in range(15)
             if labels[i] != labels[j]]
    torch.testing.assert_close(dp.aux_loss(h, "cross_domain", domains), -torch.stack(pairs).mean())
    # within-domain pairs are ignored: domain 0 collapsed onto e_1 or split into e_1 +- e_3 changes every
    # within-domain distance but no cosine with domain 1 (e_2), so the loss stays -1 while the batch loss moves
    e = torch.eye(4, dtype=torch.float64)
    together = torch.stack([e[0].repeat(3, 1), e[1].repeat(3, 1), e[0].repeat(3, 1)])          # (3 rows, T=3, d)
    apart = torch.stack([torch.stack([e[0] + e[2], e[0] - e[2], e[0]]), e[1].repeat(3, 1), -e[2].repeat(3, 1) + e[0]])
    two = torch.tensor([0, 1, 0])
    for h2 in (together, apart):
        assert dp.aux_loss(h2, "cross_domain", two).item() == pytest.approx(-1.0)
    assert dp.aux_loss(together, "batch").item() != pytest.approx(dp.aux_loss(apart, "batch").item())
    # and its gradient matches the brute-force gradient
    g = h.clone().requires_grad_(True)
    fast, = torch.autograd.grad(dp.aux_loss(g, "cross_domain", domains), g)
    flat = g.reshape(-1, 4)
    slow, = torch.autograd.grad(-torch.stack([1 - F.cosine_similarity(flat[i], flat[j], dim=0) for i in range(15)
                                              for j in range(15) if labels[i] != labels[j]]).mean(), g)
    torch.testing.assert_close(fast, slow)


def mixed_data(tmp_path):
    import data
    a, b = tmp_path / "aa.txt", tmp_path / "bb.txt"
    a.write_text("a" * 3000)
    b.write_text("b" * 5000)
    return data.load_dataset(f"file:{a}+file:{b}", "bytes")


def test_mixed_batches_are_balanced_and_carry_their_domain_labels(tmp_path):
    ds = mixed_data(tmp_path)
    gen = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for _ in range(20):  # every window lies inside one domain, and its label says which
            x, y = ds.get_batch(split, 6, 64, gen)
            assert x.domains.tolist() == [0, 1, 0, 1, 0, 1]
            assert all(set(row.tolist()) == {ord("a") + int(d)} for row, d in zip(torch.cat([x, y], 1), x.domains))
    x, _ = ds.get_batch("val:" + ds.domains[1], 3, 16, gen)
    assert x.domains.tolist() == [1, 1, 1]


def test_cross_domain_loss_in_training_and_its_one_line_errors(tmp_path, capsys):
    from util import one_line_error
    ds = mixed_data(tmp_path)
    model = tiny(vocab=256)
    x, y = ds.get_batch("train", 4, 16, torch.Generator().manual_seed(1))
    loss, _, _ = dp.dispersion_loss(model, x, y, 0.5, "cross_domain")
    h = model.body(model.embed(x))
    ce = F.cross_entropy(model.lm_head(h).flatten(0, 1), y.flatten())
    torch.testing.assert_close(loss, ce + 0.5 * -dp.between_domain_dispersion(h, x.domains))
    one, y1 = ds.get_batch("val:" + ds.domains[0], 4, 16)  # a batch of the mix holding one domain
    with pytest.raises(UserError, match="one domain only") as e:
        dp.dispersion_loss(model, one, y1, 0.5, "cross_domain")
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="domain labels"):
        dp.dispersion_loss(model, torch.randint(0, 50, (2, 8)), torch.randint(0, 50, (2, 8)), 0.5, "cross_domain")
    base = ["--objective", "dispersion", "--dispersion_scope", "cross_domain", "--tokenizer", "bytes",
            "--block_size", "16", "--n_layer", "1", "--n_embd", "16", "--n_head", "2", "--max_iters", "2",
            "--eval_iters", "1", "--sample_tokens", "0", "--brier_positions", "0", "--out_dir", str(tmp_path / "r")]
    mix = f"file:{tmp_path / 'aa.txt'}+file:{tmp_path / 'bb.txt'}"
    err = one_line_error(capsys, train.main, base + ["--dataset", f"file:{tmp_path / 'aa.txt'}"])
    assert "needs a mixed dataset" in err
    err = one_line_error(capsys, train.main, base + ["--dataset", mix, "--batch_size", "1"])
    assert "--batch_size must be at least 2" in err
    metrics = train.main(base + ["--dataset", mix, "--batch_size", "4"])
    assert math.isfinite(metrics["val_ppl_aa"]) and math.isfinite(metrics["val_ppl_bb"])


# ----------------------------------------------------------------------------- layer-wise correlation, kNN key

def test_perplexity_groups_sort_group_and_sample_uniformly_in_perplexity():
    ppl = torch.tensor([9.0, 1.0, 2.0, 30.0, 3.0, 4.0, 5.0, 6.0, 31.0, 7.0, 8.0, 10.0])
    groups = dp.perplexity_groups(ppl, 2)                          # sorted: 1 2 | 3 4 | 5 6 | 7 8 | 9 10 | 30 31
    assert [sorted(ppl[g].tolist()) for g in groups] == [[1, 2], [3, 4], [5, 6], [7, 8], [9, 10], [30, 31]]
    assert len(dp.perplexity_groups(ppl, 5)) == 2                  # the incomplete last group is dropped
    # means 1.5 3.5 5.5 7.5 9.5 30.5; 3 targets 1.5, 16, 30.5 -> nearest 1.5, 9.5 (|9.5-16| < |30.5-16|), 30.5
    kept = dp.perplexity_groups(ppl, 2, n_groups=3)
    assert ppl[kept].mean(1).tolist() == [1.5, 9.5, 30.5]
    with pytest.raises(UserError, match="group_size"):
        dp.perplexity_groups(ppl, 13)


def test_layer_correlations_match_a_direct_computation():
    model = tiny().eval()
    batches = [(torch.randint(0, 50, (8, 16)), torch.randint(0, 50, (8, 16))) for _ in range(3)]
    corr, g_ppl = dp.layer_correlations(model, batches, group_size=3, n_groups=5)
    assert set(corr) == set(dp.layer_dispersion(model, batches[:1])) and len(g_ppl) <= 5
    with torch.no_grad():  # reference: per-row perplexity from GPT.forward, dispersion by brute force
        ppl = torch.stack([model(x[i:i + 1], y[i:i + 1])[1].exp() for x, y in batches for i in range(8)])
        disp = torch.stack([brute_force(model.hidden_states(x[i:i + 1])["ffn_in"][1][0].double())
                            for x, _ in batches for i in range(8)])
    g = dp.perplexity_groups(ppl, 3, 5)
    expected = correlation(disp[g].mean(1), ppl[g].mean(1))["spearman"]
    assert corr["ffn_in.1"] == pytest.approx(expected, abs=1e-6)


def test_the_standard_knn_key_is_the_last_ffn_input_after_its_norm():
    model = tiny().eval()
    x = torch.randint(0, 50, (2, 16))
    seen = []
    model.blocks[1].ln_2.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        key = model.hidden_states(x)["ffn_in"][1]
        block = model.blocks[1]  # independent: the last block's input, its attention, then ln_2
        h = model.hidden_states(x)["layers"][1]
        ref = block.ln_2(h + block.attn(block.ln_1(h), model.rope_at(0, 16)))
    torch.testing.assert_close(key, seen[0])
    torch.testing.assert_close(key, ref)
    ds = dp.build_datastore(model, [(x, x)], "ffn_in.1")
    assert ds[0].shape == (32, 32)


def test_chunk_batches_are_distinct_non_overlapping_chunks():
    class Counting:  # position i holds token i, so a row tells where it starts
        def split(self, split):
            return range(1000)

        def batch_at(self, split, ix, T, device="cpu"):
            x = ix[:, None] + torch.arange(T)
            return x, x + 1
    batches = dp.chunk_batches(Counting(), "val", 40, 16, 16, seed=0)
    rows = torch.cat([x for x, _ in batches])
    assert [len(x) for x, _ in batches] == [16, 16, 8] and len(rows) == 40
    assert len(set(rows.flatten().tolist())) == 40 * 16 and bool((rows[:, 0] % 16 == 0).all())  # disjoint
    assert sum(len(x) for x, _ in dp.chunk_batches(Counting(), "val", 500, 64, 16)) == 62
    with pytest.raises(UserError, match="chunks"):
        dp.chunk_batches(Counting(), "val", 1, 1, 2000)


# ----------------------------------------------------------------------------- the experiment helpers (bench/)

def test_arithmetic_exact_match_scores_only_the_answer_and_its_newline():
    from bench import dispersion_experiments as dx
    windows = dx.arithmetic_windows(dx.arithmetic_problems(13, seed=5), context=3)
    x, y, answer, question = windows
    assert len(x) == 10
    for r in range(10):  # the masks cover exactly 'a+b=' and the answer's bytes plus the newline
        assert bytes(x[r][question[r]].tolist()).decode().endswith("=")
        assert bytes(y[r][answer[r]].tolist()).decode().endswith("\n")
    rows = {tuple(row.tolist()): r for r, row in enumerate(x)}
    spoil = {2: "answer", 5: "context", 7: "answer"}

    class Oracle(torch.nn.Module):  # predicts every next byte right, except where it was told to spoil
        def forward(self, xb):
            out = []
            for row in xb:
                r = rows[tuple(row.tolist())]
                target = y[r].clamp_min(0).clone()
                where = answer[r] if spoil.get(r) == "answer" else ~answer[r] & (y[r] >= 0)
                if r in spoil:
                    target[where.nonzero()[0]] = (target[where.nonzero()[0]] + 1) % 256
                out.append(F.one_hot(target, 256).float())
            return torch.stack(out), None
    correct = dx.arithmetic_correct(Oracle(), windows, batch_size=4)
    assert correct.tolist() == [r not in (2, 7) for r in range(10)]   # a wrong context byte does not count


def test_label_free_sets_have_the_asked_share_of_right_answers():
    from bench import dispersion_experiments as dx
    correct = torch.tensor([True] * 30 + [False] * 40)
    within = correct.double()                    # a question's "dispersion": 1 when answered right, else 0
    last = torch.randn(70, 8)
    out = dx.accuracy_sets(correct, within, last, set_size=20, n_sets=3)
    assert len(out["sets"]) == 33 and {s for s, _, _ in out["sets"]} == {i / 10 for i in range(11)}
    assert all(abs(w - share) < 1e-9 for share, w, _ in out["sets"])  # so the set's mean is its share
    assert out["within"]["pearson"] == pytest.approx(1.0)
    assert dx.accuracy_sets(correct, within, last, set_size=31, n_sets=1) is None  # only 30 right answers


def test_sweep_table_pairs_every_run_with_the_lambda_zero_run_of_its_seed():
    from bench import dispersion_experiments as dx

    def row(setting, scope, lam, seed, ppl):
        return dict(setting=setting, scope=scope, lam=lam, seed=seed, domains={"a": dict(ppl=ppl, disp=0.5)})
    rows = {str(i): r for i, r in enumerate([row("cross", "batch", 0, 1, 10.0), row("cross", "batch", 0, 2, 20.0),
                                             row("cross", "cross_domain", 0.1, 1, 9.0),
                                             row("cross", "cross_domain", 0.1, 2, 19.0)])}
    table = {(t[1], t[2]): t for t in dx.sweep_table(rows)}
    base, pushed = table[("-", 0)], table[("cross_domain", 0.1)]
    assert base[5:7] == (15.0, 5.0)                                    # mean 15, s.e. = sample std 7.07 / sqrt(2)
    assert pushed[7:9] == (-1.0, 0.0)                                 # both seeds 1 lower: no spread in the change


def test_parts_at_smoke_scale_write_records_with_provenance_and_verify(tmp_path, capsys):
    """Every part writes bench/records.py's format (config, metrics, provenance per run); the kNN part names the most
    dispersed key space and the best one; a finished run is reused; `bench verify` re-runs one run and agrees."""
    from bench import dispersion_experiments as dx, records
    out, work = tmp_path / "results", tmp_path / "work"
    reports = dx.run("all", "smoke", str(out), str(work), log=lambda *a: None)
    code = records.code_hash(["bench.dispersion_experiments"])
    for part, report in reports.items():
        assert report["experiment"] == f"dispersion_{part}" and report["module"] == "bench.dispersion_experiments"
        assert all(r["provenance"]["code"] == code and r["provenance"]["config"] == r["config"]
                   for r in report["runs"].values())
    assert len(reports["sweep"]["runs"]) == 8 and len(reports["gap"]["runs"]) == 4 and len(reports["knn"]["runs"]) == 2
    for r in reports["knn"]["runs"].values():
        layers = r["metrics"]["layers"]
        assert r["metrics"]["most_dispersed"] == max(layers, key=lambda k: layers[k]["disp_segments"])
        assert r["metrics"]["best"] == min(layers, key=lambda k: layers[k]["knn_ppl"])
        assert "final" in layers and "attn.0" in layers and "layers.0" not in layers
    snaps = [s["iter"] for r in reports["gap"]["runs"].values() for s in r["metrics"]["snapshots"]]
    assert sorted(set(snaps)) == [4, 8]
    before = (out / "dispersion_gap_smoke.json").read_text()
    dx.run("gap", "smoke", str(out), str(work), log=lambda *a: pytest.fail("retrained " + a[0]))
    assert (out / "dispersion_gap_smoke.json").read_text() == before
    assert records.verify(str(out / "dispersion_sweep_smoke.json"), "single_batch_0.1_1", work=str(tmp_path))
    assert capsys.readouterr().out.strip().endswith("agree")
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tutorials"))
    from keyfigs import dispersion as figs  # every key figure draws from these files (tick labels: no layer ids)
    for name in ("layerwise_correlation", "lambda_sweep", "knn_layer_choice", "gap_model_selection"):
        fig = figs.FIGURES[name](reports)
        assert fig.axes and fig.axes[0].has_data(), name
    labels = [t.get_text() for t in figs.knn_layer_choice(reports).axes[0].get_xticklabels()]
    assert "attention 1" in labels and "final (after LN)" in labels and not any("." in t for t in labels)
    rho = figs.predictors(figs.gap_family(reports["gap"]))
    assert rho["iter"] is None  # every model of the family at the same iteration


def test_predictor_table_ranks_against_accuracy_and_leaves_constant_predictors_out():
    from bench import dispersion_experiments as dx
    models = [dict(acc=a, gap=g, within=g, between=-g, hidden_disp=1.0, iter=100, params=p, share=s, ppl=10 - 5 * a)
              for a, g, p, s in ((0.1, 1.0, 10, 0.1), (0.5, 0.5, 20, 0.25), (0.9, 2.0, 30, 0.5))]
    rho = dx.predictor_table(models)
    assert rho["iter"] is None and rho["hidden_disp"] is None          # constant over the family: no ranking
    assert rho["params"] == pytest.approx(1.0) and rho["neg_ppl"] == pytest.approx(1.0)
    assert rho["gap"] == pytest.approx(0.5) and rho["between"] == pytest.approx(-0.5)
