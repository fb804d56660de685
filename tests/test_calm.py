"""calm.py against independent references: the closed-form energy score of Gaussians, p^n / sum p^n for the
temperature sampler, a full forward pass for cached generation, and a real autoencoder run on Shakespeare."""
import math
from types import SimpleNamespace

import pytest
import torch

import torch.nn.functional as F

import calm
import objectives
import sample
import train
import trainer
from runtime import UserError
from util import one_line_error

TINY = ["--dataset", "shakespeare", "--tokenizer", "bytes", "--block_size", "64", "--batch_size", "16",
        "--eval_iters", "2", "--sample_tokens", "8", "--warmup_iters", "10", "--learning_rate", "3e-3"]


# ----------------------------------------------------------------------------- the energy score

def expected_abs(delta, s):
    """E|Z| for Z ~ N(delta, s^2) (folded normal mean)."""
    phi = 0.5 * (1 + math.erf(-delta / (s * math.sqrt(2))))
    return s * math.sqrt(2 / math.pi) * math.exp(-delta ** 2 / (2 * s * s)) + delta * (1 - 2 * phi)


def closed_form_loss(m, s):
    """E[2|X - Y| - |X - X'|] for X, X' ~ N(m, s^2) (the model) and Y ~ N(0, 1) (the data), alpha = 1."""
    return 2 * expected_abs(m, math.sqrt(s * s + 1)) - expected_abs(0, math.sqrt(2) * s)


def mc_loss(m, s, N, M, P, gen):
    x = m + s * torch.randn(N, P, 1, generator=gen, dtype=torch.float64)
    y = torch.randn(M, P, 1, generator=gen, dtype=torch.float64)
    return calm.energy_loss(x, y)  # (P,)


def test_energy_loss_is_unbiased_against_the_closed_form():
    gen = torch.Generator().manual_seed(0)
    for (m, s) in [(0.0, 1.0), (0.7, 0.5), (-0.3, 2.0)]:
        est = mc_loss(m, s, N=2, M=1, P=200_000, gen=gen)  # the smallest unbiased estimator, many draws
        se = est.std().item() / math.sqrt(est.numel())
        assert abs(est.mean().item() - closed_form_loss(m, s)) < 4 * se + 1e-3


def test_energy_loss_matches_a_large_sample_estimate_in_several_dimensions():
    gen = torch.Generator().manual_seed(1)
    mu, P = torch.tensor([0.5, -1.0, 2.0]), 20_000
    x = lambda n, p: mu + 0.8 * torch.randn(n, p, 3, generator=gen, dtype=torch.float64)  # noqa: E731
    y = lambda n, p: torch.randn(n, p, 3, generator=gen, dtype=torch.float64)  # noqa: E731
    small = calm.energy_loss(x(2, P), y(1, P))  # 20k independent draws of the smallest estimator
    large = calm.energy_loss(x(3000, 1), y(3000, 1)).item()  # one estimate from 3000 + 3000 samples
    assert abs(small.mean().item() - large) < 4 * small.std().item() / math.sqrt(P)


def test_energy_score_is_strictly_proper_on_a_gaussian():
    """Monte Carlo (N = 8, M = 4, 50k positions, the same random numbers for every candidate): the true N(0, 1)
    has the lowest expected loss; shifted, under- and over-dispersed models are worse by > 10 standard errors."""
    cands = [(0, 1), (0.5, 1), (0, 0.5), (0, 2), (0, 0.8), (0.2, 1.1)]
    losses = {ms: mc_loss(*ms, N=8, M=4, P=50_000, gen=torch.Generator().manual_seed(2)) for ms in cands}
    true = losses[(0, 1)]
    for ms, loss in losses.items():
        assert abs(loss.mean().item() - closed_form_loss(*ms)) < 0.02
        if ms != (0, 1):
            gap = (loss - true).mean().item()
            assert gap > 10 * (loss - true).std().item() / math.sqrt(loss.numel())


# ----------------------------------------------------------------------------- temperature sampling

P_TOY = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03])


def toy_draw(gen):
    return lambda m: torch.multinomial(P_TOY, m, replacement=True, generator=gen).view(m, 1)


def tempered(T):
    target = P_TOY.double() ** (1 / T)
    return target / target.sum()


def chi_square_p(draws, target):
    """Pearson's chi-square test of 5-category counts against target; p-value of 4 degrees of freedom, whose
    survival function is exp(-x/2) (1 + x/2) in closed form."""
    counts = torch.bincount(draws, minlength=len(target)).double()
    x = ((counts - len(draws) * target) ** 2 / (len(draws) * target)).sum().item()
    return math.exp(-x / 2) * (1 + x / 2)


@pytest.mark.parametrize("T", [0.5, 1 / 3, 0.7, 0.4])
def test_exact_temperature_sampler_gives_p_to_the_one_over_t(T):
    """1/T = 2, 3 (agreement alone), 1.43 and 2.5 (agreement + Bernoulli factory): p^(1/T) / Z by chi-square,
    and the same counts clearly reject p^floor(1/T), so the fractional step is doing its job."""
    gen = torch.Generator().manual_seed(round(100 * T))
    draws = torch.stack([calm.sample_exact(toy_draw(gen), T, gen) for _ in range(3000)]).flatten()
    assert chi_square_p(draws, tempered(T)) > 1e-3
    if 1 / T != round(1 / T):
        assert chi_square_p(draws, tempered(1 / math.floor(1 / T))) < 1e-6


def test_bernoulli_factory_flips_p_to_the_a():
    gen = torch.Generator().manual_seed(5)
    for p, a in ((0.3, 0.5), (0.8, 0.25), (0.05, 0.9)):
        coin = lambda: torch.rand((), generator=gen).item() < p  # noqa: E731
        heads = torch.tensor([calm.bernoulli_factory(coin, a, gen) for _ in range(20_000)]).double()
        assert abs(heads.mean().item() - p ** a) < 4 * math.sqrt(p ** a * (1 - p ** a) / 20_000)


@pytest.mark.parametrize("T", [0.5, 0.7, 0.4])
def test_batch_temperature_sampler_is_close_to_p_to_the_one_over_t(T):
    """The approximation with 200 candidates stays within total variation 0.03 of p^(1/T) / Z on the toy
    (measured 0.005 - 0.011 with 4000 draws, sampling noise included)."""
    gen = torch.Generator().manual_seed(4)
    draws = torch.stack([calm.sample_batch(toy_draw(gen), T, 200, gen) for _ in range(3000)]).flatten()
    freq = torch.bincount(draws, minlength=len(P_TOY)).double() / len(draws)
    assert 0.5 * (freq - tempered(T)).abs().sum() < 0.03


@pytest.mark.parametrize("T", [0, -1, 1.5, None])
def test_temperature_outside_zero_one_is_a_user_error(T):
    with pytest.raises(UserError, match="in \\(0, 1\\]"):
        calm.temperature_split(T)


# ----------------------------------------------------------------------------- the generative heads on a 2-D toy

def fit_toy_head(kind, steps=300):
    """Two conditions h, each with its own 2-D Gaussian target (known mean and covariance); train the head for
    `steps` Adam steps, return (first loss, last loss, {condition: samples})."""
    torch.manual_seed(0)
    means = torch.tensor([[1.0, -1.0], [-2.0, 0.5]])
    chol = torch.tensor([[[0.5, 0.0], [0.3, 0.4]], [[0.3, 0.0], [-0.2, 0.6]]])
    head = objectives.make_head(2, SimpleNamespace(head=kind, head_dim=64, latent_dim=2, head_layers=2, noise_size=8,
                                                   num_samples=8, num_target_samples=8, alpha=1.0, flow_steps=10,
                                                   diffusion_steps=50))
    opt = torch.optim.AdamW(head.parameters(), lr=2e-3)
    losses = []
    for _ in range(steps):
        c = torch.randint(2, (64,))
        h = F.one_hot(c, 2).float()
        z = means[c] + (chol[c] @ torch.randn(8, 64, 2, 1)).squeeze(-1)    # (8, 64, 2) target samples
        if kind == "energy":
            loss = calm.energy_loss(head(h, 8), z).mean()
        else:
            loss = head.regression_loss(h, z).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        samples = {i: head(torch.eye(2)[i], 2000, torch.Generator().manual_seed(i)) for i in range(2)}
    return sum(losses[:20]) / 20, sum(losses[-20:]) / 20, samples, means, chol @ chol.transpose(1, 2)


@pytest.mark.parametrize("kind", ["flow", "diffusion"])
def test_heads_learn_a_conditional_2d_gaussian(kind):
    """Loss falls; samples match each condition's mean within 0.15 and covariance within 0.1 per entry (the
    covariance entries are 0.09 - 0.4; 2000 samples estimate them to ~0.01)."""
    first, last, samples, means, covs = fit_toy_head(kind)
    assert last < 0.8 * first
    for i, s in samples.items():
        assert (s.mean(0) - means[i]).abs().max() < 0.15, (kind, i, s.mean(0))
        assert (torch.cov(s.T) - covs[i]).abs().max() < 0.1, (kind, i, torch.cov(s.T))


# ----------------------------------------------------------------------------- the model

def tiny_model(K=4, block_size=32, head="energy"):
    args, _ = trainer.parse_args(["--objective", "calm", "--chunk_size", str(K), "--latent_dim", "8", "--ae_dim", "32",
                                  "--head", head, "--block_size", str(block_size), "--n_layer", "2", "--n_head", "2",
                                  "--n_embd", "32"])
    torch.manual_seed(0)
    return objectives.calm_build(objectives.gpt_config(args, 256), args), args


def test_the_head_gets_its_own_learning_rate():
    model, args = tiny_model()
    args.head_lr_scale, args.learning_rate, args.weight_decay, args.beta1, args.beta2 = 3.0, 1e-3, 0.1, 0.9, 0.95
    groups = trainer.make_optimizer(model, objectives.CALM, args, "cpu").param_groups
    head = {id(p) for p in model.head.parameters()}
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())
    for g in groups:
        in_head = {id(p) in head for p in g["params"]}
        assert len(in_head) == 1 and g["lr_scale"] == (3.0 if in_head.pop() else 1.0)


def test_k_must_divide_block_size():
    with pytest.raises(UserError, match="divide"):
        tiny_model(K=3, block_size=32)


def test_generation_makes_k_tokens_per_backbone_step_and_respects_the_length():
    model = tiny_model()[0].eval()
    calls = []
    body = model.backbone.body
    model.backbone.body = lambda x, *a, **k: calls.append(x.size(1)) or body(x, *a, **k)
    args = SimpleNamespace(max_new_tokens=10, temperature=1.0, temp_sampler="batch", temp_candidates=20)
    prompt = torch.randint(256, (1, 5))
    out = objectives.calm_generate(model, prompt, args, torch.Generator().manual_seed(0))
    assert out.shape == (1, 15) and torch.equal(out[:, :5], prompt)
    assert len(calls) == 3 and calls[1:] == [1, 1]  # ceil(10 / 4) steps; cached steps feed one chunk
    calls.clear()
    long = calm.generate_chunks(model, torch.randint(256, (2, 28)), 6, torch.Generator().manual_seed(0))
    assert long.shape == (2, 28 + 24) and len(calls) == 6  # the 8-chunk window fills and is re-encoded
    args.temperature = 0.5
    assert objectives.calm_generate(model, prompt, args, torch.Generator().manual_seed(0)).shape == (1, 15)


def test_cached_chunk_steps_match_one_full_pass():
    model, _ = tiny_model()
    model.eval()
    idx = torch.randint(256, (2, 24))
    full = model.hidden_states(idx)
    assert len(full["layers"]) == 3 and full["final"].shape == (2, 6, 32)  # one vector per chunk
    cache = calm.KVCache(2)
    h = [model.backbone.body(model.with_start(model.chunk_inputs(idx[:, :8])), 0, cache)[:, 1:]]
    for i in range(2, 6):
        h.append(model.backbone.body(model.chunk_inputs(idx[:, 4 * i:4 * i + 4]), len(cache), cache))
    assert torch.allclose(torch.cat(h, 1), full["final"], atol=1e-5)


def test_draw_returns_the_requested_tokens():
    model, args = tiny_model()
    out = objectives.calm_draw(model.eval(), torch.randint(256, (3, 8)), 4, torch.Generator().manual_seed(0), args)
    assert out.shape == (3, 4)
    with pytest.raises(UserError):
        objectives.calm_draw(model, torch.randint(256, (3, 7)), 4, None, args)


# ----------------------------------------------------------------------------- end to end on Shakespeare

@pytest.fixture(scope="module")
def ae_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("ae")
    metrics = train.main(TINY + ["--objective", "autoencoder", "--out_dir", str(out), "--max_iters", "300",
                                 "--eval_interval", "300"])
    return out / "ckpt.pt", metrics


def test_autoencoder_reconstructs_held_out_shakespeare(ae_ckpt):
    _, metrics = ae_ckpt
    assert metrics["recon_acc"] >= 0.99  # held-out (val split) token accuracy at K = 4, bytes
    assert metrics["recon_acc_noisy"] > 0.5  # sigma = 0.3 latent noise: still decodable (variational AE)


def test_calm_trains_samples_and_refuses_other_objectives(ae_ckpt, tmp_path, capsys):
    path, _ = ae_ckpt
    out = tmp_path / "calm"
    metrics = train.main(TINY + ["--objective", "calm", "--autoencoder", str(path), "--out_dir", str(out),
                                 "--max_iters", "4", "--eval_interval", "4", "--brier_positions", "0",
                                 "--n_layer", "2", "--n_embd", "32", "--n_head", "2"])
    assert metrics["ae_recon_acc"] >= 0.99 and math.isfinite(metrics["val_loss"])
    assert "sample:" in capsys.readouterr().out
    for T, sampler in (("0.5", "batch"), ("0.7", "exact")):  # any T in (0, 1], both samplers
        sample.main(["--ckpt", str(out / "ckpt.pt"), "--prompt", "ROMEO:", "--max_new_tokens", "9", "--temperature",
                     T, "--temp_sampler", sampler])
        assert capsys.readouterr().out.startswith("ROMEO:")
    for T in ("0", "1.5"):
        assert "in (0, 1]" in one_line_error(capsys, sample.main, ["--ckpt", str(out / "ckpt.pt"), "--temperature", T])
    err = one_line_error(capsys, train.main, TINY + ["--objective", "autoencoder", "--out_dir", str(out),
                                                     "--resume", "--max_iters", "8"])
    assert "calm" in err
    err = one_line_error(capsys, train.main, TINY + ["--objective", "calm", "--autoencoder", str(out / "ckpt.pt"),
                                                     "--out_dir", str(tmp_path / "x")])
    assert "not an autoencoder" in err


def test_a_short_run_of_the_recipe_beats_the_unigram_brier1(ae_ckpt, tmp_path):
    """CALM K = 4 with the recipe's defaults (learning rate, constant schedule, head), 300 iterations of 16 x 64
    bytes: its Brier-1 at 4096 held-out positions beats a unigram model's exact Brier-1 on the same split
    (2 sum_x q(x) q_val(x) - sum_x q(x)^2, q the train split's byte frequencies, about 0.054) by > 4 standard errors."""
    import numpy as np
    import brierlm
    from data import load_data
    out = tmp_path / "calm"
    train.main(TINY[:-4] + ["--objective", "calm", "--autoencoder", str(ae_ckpt[0]), "--out_dir", str(out),
                            "--max_iters", "300", "--eval_interval", "300", "--brier_positions", "0"])
    model, objective, args, _ = objectives.load_model(str(out / "ckpt.pt"))
    assert args.learning_rate == args.min_lr == objectives.RECIPE["learning_rate"]  # the recipe: constant after warm-up
    data = load_data("shakespeare", "bytes")
    est = objectives.brier_scores(model, objective, data, args, 4096, 0)["sampled"][:, 0]
    q, q_val = (np.bincount(data.split(s), minlength=256) / len(data.split(s)) for s in ("train", "val"))
    unigram = 2 * (q * q_val).sum() - (q * q).sum()
    assert est.mean() - unigram > 4 * est.std(ddof=1) / np.sqrt(len(est)), (est.mean(), unigram)


@pytest.mark.parametrize("flag, value, words", [("--chunk_size", "2", "chunk_size=4"),
                                                ("--latent_dim", "16", "latent_dim=32"),
                                                ("--tokenizer", "gpt2", "tokenizer='bytes'")])
def test_mismatched_autoencoder_is_a_one_line_error(ae_ckpt, tmp_path, capsys, flag, value, words):
    err = one_line_error(capsys, train.main, TINY + ["--objective", "calm", "--autoencoder", str(ae_ckpt[0]),
                                                     "--out_dir", str(tmp_path), flag, value])
    assert words in err


def test_a_missing_autoencoder_path_is_a_one_line_error_and_nothing_is_trained(tmp_path, capsys):
    missing = tmp_path / "nowhere" / "ckpt.pt"
    err = one_line_error(capsys, train.main, TINY + ["--objective", "calm", "--autoencoder", str(missing),
                                                     "--out_dir", str(tmp_path / "run")])
    assert f"no autoencoder at {missing}" in err
    assert not missing.exists() and not (tmp_path / "run" / "ckpt.pt").exists()


@pytest.mark.parametrize("flags, words", [
    (["--flow_steps", "5"], "--flow_steps is a flag of --head flow, not of --head energy"),
    (["--head", "flow", "--diffusion_steps", "5"], "--diffusion_steps is a flag of --head diffusion"),
    (["--head", "mse", "--noise_size", "8"], "--noise_size is a flag of --head energy"),
    (["--head", "flow", "--flow_steps", "0"], "--flow_steps must be at least 1, got 0"),
    (["--head", "diffusion", "--diffusion_steps", "-2"], "--diffusion_steps must be at least 1"),
    (["--head", "gan"], "--head must be one of energy, flow, diffusion, mse")])
def test_bad_head_flags_are_one_line_errors(ae_ckpt, tmp_path, capsys, flags, words):
    err = one_line_error(capsys, train.main, TINY + ["--objective", "calm", "--autoencoder", str(ae_ckpt[0]),
                                                     "--out_dir", str(tmp_path)] + flags)
    assert words in err and not (tmp_path / "ckpt.pt").exists()


@pytest.mark.parametrize("head", ["flow", "diffusion"])
def test_flow_and_diffusion_heads_train_score_and_sample(ae_ckpt, tmp_path, capsys, head):
    metrics = train.main(TINY + ["--objective", "calm", "--autoencoder", str(ae_ckpt[0]), "--out_dir", str(tmp_path),
                                 "--head", head, f"--{head}_steps", "3", "--max_iters", "3", "--eval_interval", "3",
                                 "--brier_positions", "8", "--n_layer", "1", "--n_embd", "32", "--n_head", "2"])
    assert math.isfinite(metrics["val_loss"]) and -1 <= metrics["brier1"] <= 1
    capsys.readouterr()
    sample.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--prompt", "ROMEO:", "--max_new_tokens", "8",
                 "--temperature", "0.6"])
    assert capsys.readouterr().out.startswith("ROMEO:")


def test_k_not_dividing_block_size_is_a_one_line_error(tmp_path, capsys):
    err = one_line_error(capsys, train.main, TINY + ["--objective", "autoencoder", "--chunk_size", "3",
                                                     "--out_dir", str(tmp_path)])
    assert "divide" in err


def test_calm_without_autoencoder_trains_one_then_reuses_it(tmp_path, capsys):
    flags = TINY + ["--objective", "calm", "--out_dir", str(tmp_path), "--ae_iters", "3", "--max_iters", "2",
                    "--eval_interval", "2", "--brier_positions", "0", "--n_layer", "1", "--n_embd", "32",
                    "--n_head", "2", "--overwrite"]
    train.main(flags)
    out = capsys.readouterr().out
    assert "training the autoencoder first" in out and (tmp_path / "autoencoder" / "ckpt.pt").exists()
    train.main(flags)
    assert "reusing the finished autoencoder" in capsys.readouterr().out
    sample.main(["--ckpt", str(tmp_path / "autoencoder" / "ckpt.pt"), "--prompt", "ROMEO:", "--temperature", "1"])
    assert len(capsys.readouterr().out) > 0  # an autoencoder "generates" its round trip of the prompt


def test_calm_loss_runs_on_a_plain_autoencoder_and_with_every_head():
    x = torch.randint(256, (2, 32))
    for variational, head in ((False, "energy"), (True, "mse"), (True, "flow"), (True, "diffusion")):
        model, args = tiny_model(head=head)
        model.ae.cfg.variational = variational
        loss = calm.calm_loss(model, x)
        assert loss.ndim == 0 and torch.isfinite(loss)
        loss.backward()
        assert all(p.grad is not None for p in model.head.parameters() if p.requires_grad)
    mse = tiny_model(head="mse")[0].eval()  # the regression head is deterministic: every sample is the same
    h = torch.randn(3, 32)
    assert torch.equal(mse.head(h, 5)[0], mse.head(h, 5)[4])


def test_calm_objectives_default_to_the_byte_tokenizer(tmp_path):
    """A 50k-token autoencoder cannot be trained in a CPU run; without --tokenizer, CALM's objectives use bytes."""
    train.main(["--objective", "autoencoder", "--dataset", "shakespeare", "--block_size", "16", "--max_iters", "1",
                "--eval_iters", "1", "--out_dir", str(tmp_path)])
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=False)["args"]
    assert saved["tokenizer"] == "bytes"


# ----------------------------------------------------------------------------- issue 23: the experiments' promises

def smoke_scaling(results, work, **kw):
    from bench import calm_runs
    calm_runs.run("smoke_scaling", log=lambda *a: None, results=str(results), work=str(work), **kw)
    import json
    return json.loads((results / "calm_smoke_scaling.json").read_text())


def test_epochs_seen_is_tokens_trained_over_corpus_tokens(tmp_path):
    """A toy run (NTP at 1 x 32, 16 iterations of 16 x 32 bytes): its recorded epochs are the tokens it trained on
    divided by the training split's tokens, counted here from the data itself."""
    from data import load_data
    res = smoke_scaling(tmp_path / "r", tmp_path / "w", only=r"ntp x0\.25")
    point = res["runs"]["ntp x0.25 seed 0"]["points"][0]
    train_tokens = len(load_data("shakespeare", "bytes").split("train"))
    assert point["epochs"] == pytest.approx(point["iter"] * 16 * 32 / train_tokens, rel=1e-12)
    assert res["corpus"]["shakespeare"]["train_tokens"] == train_tokens
    from bench.calm_runs import epochs_seen
    assert epochs_seen(10, 4, 8, 320) == 1.0
    with pytest.raises(UserError, match="smaller than one window"):
        epochs_seen(10, 4, 8, 8)


def test_calm_checkpoints_at_budget_points_resume_to_the_numbers_of_an_uninterrupted_run(tmp_path, monkeypatch):
    """CALM at smoke scale (1 x 32, checkpointed every 5 iterations and kept at every budget point): a run cut after
    its third save (between two budget points) and started again gives the same scores, losses and weights at every
    budget point as the same run done in one go."""
    import shutil
    from bench import calm_runs
    whole = smoke_scaling(tmp_path / "a", tmp_path / "wa", only="calm")["runs"]["calm K=4 seed 0"]
    (tmp_path / "wb").mkdir()
    shutil.copytree(tmp_path / "wa" / "autoencoders", tmp_path / "wb" / "autoencoders")  # the same autoencoder
    calls, real = [], trainer.run_quietly

    def cut_at_the_fourth_stage(flags):
        calls.append(flags)
        if len(calls) == 4:
            raise UserError("killed")  # as if the process died: the third save is the last checkpoint
        return real(flags)
    monkeypatch.setattr(calm_runs.trainer, "run_quietly", cut_at_the_fourth_stage)
    cut = smoke_scaling(tmp_path / "b", tmp_path / "wb", only="calm")["runs"]["calm K=4 seed 0"]
    points = [p["iter"] for p in whole["points"]]
    assert len(points) == 3 and [p["iter"] for p in cut["points"]] == points[:2]  # cut before its last point
    monkeypatch.setattr(calm_runs.trainer, "run_quietly", real)
    resumed = smoke_scaling(tmp_path / "b", tmp_path / "wb", only="calm")["runs"]["calm K=4 seed 0"]
    keys = ["iter", "train_flops", "val_loss", "train_loss", "epochs"] + [f"brier{n}" for n in range(1, 5)]
    assert [{k: p[k] for k in keys} for p in resumed["points"]] == [{k: p[k] for k in keys} for p in whole["points"]]
    for it in points:
        a = torch.load(tmp_path / "wa" / "smoke_scaling" / "calm_K=4_seed_0" / f"ckpt_{it}.pt", weights_only=False)
        b = torch.load(tmp_path / "wb" / "smoke_scaling" / "calm_K=4_seed_0" / f"ckpt_{it}.pt", weights_only=False)
        assert a["iter"] == b["iter"] == it
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_relative_noise_at_sigma_zero_is_the_clean_reconstruction_accuracy(ae_ckpt):
    from bench import calm_experiments
    from data import load_data
    model, _, args, _ = objectives.load_model(str(ae_ckpt[0]))
    args.device = "cpu"
    data = load_data("shakespeare", "bytes")
    out = calm_experiments.robustness(model, data, args, [0.0, 0.3, 1.0], n_batches=2)
    assert out["recon_rel"]["0"] == out["recon_abs"]["0"] == out["recon_acc"]
    assert out["recon_acc"] == objectives.ae_evaluate(model, data, args, n_batches=2)["recon_acc"]
    assert objectives.ae_evaluate(model, data, args, [0.0], 2, relative=True)[0.0] == out["recon_acc"]
    assert out["latent_rms"] > 0 and out["tokens"] == 2 * args.batch_size * args.block_size
    assert out["recon_rel"]["1"] <= out["recon_acc"]


def test_unigram_baselines_are_exact():
    """The no-skill scores the figures draw: a unigram model's Brier-1 and the most frequent byte's accuracy."""
    from bench import calm_experiments
    data = SimpleNamespace(vocab_size=3, split=lambda s: {"train": [0, 0, 0, 1], "val": [0, 1, 2, 2]}[s])
    out = calm_experiments.unigram_baselines(data)
    p, q = [0.75, 0.25, 0], [0.25, 0.25, 0.5]
    assert out["unigram_brier1"] == pytest.approx(2 * sum(a * b for a, b in zip(p, q)) - sum(a * a for a in p))
    assert out["mode_accuracy"] == 0.25


@pytest.mark.parametrize("argv, words", [
    (["--budgets", "1,0.5"], "--budgets must be increasing positive multiples of the base budget, got 1,0.5"),
    (["--budgets", "0.5,0.5"], "increasing"),
    (["--budgets", "0,1"], "positive"),
    (["--budgets", "a,b"], "--budgets must be comma-separated numbers"),
    (["--dataset", "file:TINY"], "is smaller than one window"),
])
def test_bad_scaling_input_is_one_line(tmp_path, capsys, argv, words):
    import bench.__main__
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("def f(x):\n    return x\n")
    argv = [a.replace("TINY", str(tiny)) for a in argv]
    err = one_line_error(capsys, bench.__main__.main, ["calm", "run", "smoke_scaling", *argv, "--results",
                                                       str(tmp_path / "r"), "--work", str(tmp_path / "w")])
    assert words in err
    assert not (tmp_path / "w" / "smoke_scaling").exists()


def test_scaling_options_need_a_scaling_experiment_and_other_results(tmp_path, capsys):
    import bench.__main__
    err = one_line_error(capsys, bench.__main__.main, ["calm", "run", "smoke_curves", "--budgets", "1,2",
                                                       "--results", str(tmp_path)])
    assert "--budgets applies only to the experiments" in err
    err = one_line_error(capsys, bench.__main__.main, ["calm", "run", "smoke_scaling", "--budgets", "1,2"])
    assert "--results DIR" in err


def test_negative_eval_noise_is_a_one_line_error(tmp_path, capsys):
    err = one_line_error(capsys, train.main, TINY + ["--objective", "autoencoder", "--eval_noise", "-0.1",
                                                     "--out_dir", str(tmp_path)])
    assert "--eval_noise must be >= 0, got -0.1" in err and not (tmp_path / "ckpt.pt").exists()


def test_the_figures_shakespeare_baselines_are_the_corpus_own():
    """keyfigs/calm.py's SHAKESPEARE (for results files written before the corpus was recorded) = the data's."""
    import sys
    from pathlib import Path
    from bench import calm_experiments
    from data import load_data
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tutorials"))
    from keyfigs import calm as figs
    got = calm_experiments.unigram_baselines(load_data("shakespeare", "bytes"))
    assert got == {k: pytest.approx(v, abs=5e-5) for k, v in figs.SHAKESPEARE.items()}
