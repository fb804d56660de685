"""Representation dispersion: the O(N d) metric against brute force and closed forms, the push-away objective
against NTP, and the kNN-LM against its two limits."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import dispersion as dp
import train
from gpt import GPT, GPTConfig, UserError


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


def args_for(weight, scope="batch"):
    return SimpleNamespace(dispersion_weight=weight, dispersion_scope=scope)


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
    assert list(profile) == ["layers.0", "layers.1", "layers.2", "attn.0", "attn.1", "mlp.0", "mlp.1", "final"]
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
    c = dp.correlation(x, x.exp())  # monotone but not linear
    assert abs(c["spearman"] - 1) < 1e-12 and c["pearson"] < 0.9
    assert abs(dp.correlation(x, -2 * x + 3)["pearson"] + 1) < 1e-12


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
    loss_ntp, _ = train.ntp_loss(ntp, x, y, None)
    loss_ntp.backward()
    disp = tiny()
    loss_disp, logs = dp.dispersion_loss(disp, x, y, args_for(0.0, scope))
    loss_disp.backward()
    assert torch.equal(loss_ntp, loss_disp)
    for (name, a), b in zip(ntp.named_parameters(), disp.parameters()):
        assert torch.equal(a.grad, b.grad), name
    assert logs["aux"] < 0 and logs["ce"] == loss_ntp.item()
    # and a positive weight really changes the gradients, by exactly lambda * dL_aux
    lam = 0.5
    with_aux = tiny()
    loss_aux, _ = dp.dispersion_loss(with_aux, x, y, args_for(lam, scope))
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
    metrics = train.load_checkpoint(str(out / "ckpt.pt"))["metrics"]
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


def test_dispersion_gap_reads_separation_from_a_reference():
    model = tiny().eval()
    task = [torch.randint(0, 10, (2, 16))]
    ref = [torch.randint(40, 50, (2, 16))]
    gap = dp.dispersion_gap(model, task, ref)
    ta = torch.cat([model.hidden_states(t)["final"].reshape(-1, 32) for t in task]).double().detach()
    re = torch.cat([model.hidden_states(r)["final"].reshape(-1, 32) for r in ref]).double().detach()
    assert abs(gap["within"] - brute_force(ta).item()) < 1e-5
    between = torch.stack([1 - F.cosine_similarity(a, b, dim=0) for a in ta for b in re]).mean()
    assert abs(gap["between"] - between.item()) < 1e-5
    assert gap["gap"] == pytest.approx(gap["between"] - gap["within"])


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
