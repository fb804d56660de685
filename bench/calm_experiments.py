"""Measurements behind tutorials/calm.ipynb and bench/calm_runs.py (not the paper itself: that is calm.py and
calm_comparison_heads.py). Every function takes a trained model (CALM, a GPT or CALM's autoencoder) and the data,
and samples only; unigram_baselines takes the data alone (what a model with no skill scores)."""
import copy
import time

import numpy as np
import torch

import brierlm
import calm
import objectives


def sampler_at(model, temperature, sampler="batch"):
    """A draw() for brierlm at a temperature: CALM's likelihood-free sampler (sampler 'batch' or 'exact'), or
    softmax(logits / T) for a GPT."""
    if isinstance(model, calm.CALM):
        def draw(m, ctx, n, gen, args):
            args = copy.copy(args)
            args.temp_sampler = sampler
            return objectives.calm_draw(m, ctx, n, gen, args, temperature)
        return draw
    return lambda m, ctx, n, gen, args: m.generate(ctx, n, temperature=temperature, generator=gen)[:, -n:]


def brier_scores(model, data, args, n_positions=256, temperature=1.0, seed=0, sampler="batch"):
    """Brier-1..4 and BrierLM of any model here (brierlm.py, two samples per position), with their standard
    errors over positions ('brier1_se' .. 'brier4_se', 'brierlm_se', None when a Brier-n <= 0)."""
    draw = sampler_at(model, temperature, sampler)
    objective = objectives.Objective("sampler", None, None, None, draw=draw)
    est = objectives.brier_scores(model, objective, data, args, n_positions, seed)["sampled"]
    se = est.std(0, ddof=1) / np.sqrt(len(est))
    out = {**brierlm.summarize(est), **{f"brier{n + 1}_se": float(se[n]) for n in range(est.shape[1])}}
    se_lm = brierlm.brierlm_stderr(est)
    out["brierlm_se"] = se_lm if se_lm == se_lm else None
    return out


@torch.no_grad()
def tempered_accuracy(model, data, args, temperature, n_positions=512, seed=0, sampler="batch"):
    """Quality and diversity of samples at a temperature, at n_positions val positions: accuracy of the first
    1 and 4 sampled tokens (all 4 right: CALM K = 4's first chunk) and how often two samples agree (4-grams)."""
    gen = torch.Generator().manual_seed(seed)
    ctx_len = brierlm.context_length(args.block_size, getattr(model, "K", 1))
    ctx, ref = brierlm.eval_windows(data, "val", n_positions, ctx_len, gen)
    draw, hits, agree = sampler_at(model, temperature, sampler), [], []
    for lo in range(0, n_positions, 64):
        c, r = ctx[lo:lo + 64], ref[lo:lo + 64]
        x = draw(model, torch.cat([c, c]), 4, gen, args)
        x1, x2 = x[:len(c)], x[len(c):]
        hits.append((x1 == r).long().cumprod(1))
        agree.append((x1 == x2).all(1).float())
    hits, agree = torch.cat(hits).float(), torch.cat(agree)
    return dict(acc1=hits[:, 0].mean().item(), acc4=hits[:, 3].mean().item(), agree4=agree.mean().item(),
                acc1_se=hits[:, 0].std().item() / n_positions ** 0.5)


@torch.no_grad()
def distinct_ngrams(model, data, args, temperature=1.0, n_prompts=16, length=32, n=2, seed=0, sampler="batch"):
    """Diversity: distinct n-grams / all n-grams over `length`-token continuations of fixed val prompts."""
    gen = torch.Generator().manual_seed(seed)
    ctx = data.get_batch("val", n_prompts, 16, gen)[0]             # the same prompts for every model
    out = sampler_at(model, temperature, sampler)(model, ctx.to(next(model.parameters()).device), length, gen, args)
    grams = [tuple(row[i:i + n]) for row in out.tolist() for i in range(len(row) - n + 1)]
    return len(set(grams)) / len(grams)


@torch.no_grad()
def continuations(model, args, prompt="ROMEO:\nI am ", n=3, length=32, temperature=1.0, seed=0):
    """n sampled continuations (text) of a byte prompt (12 bytes: 3 chunks at K = 4), for reading."""
    ctx = torch.tensor([list(prompt.encode())] * n)
    out = sampler_at(model, temperature)(model, ctx, length, torch.Generator().manual_seed(seed), args)
    return [bytes(row).decode("utf-8", "replace") for row in out.tolist()]


@torch.no_grad()
def generation_speed(model, n_tokens=128, repeats=5):
    """(backbone steps per generated token, tokens/s) for batch-1 generation with the KV cache (best of repeats)."""
    K = model.K if isinstance(model, calm.CALM) else 1
    prompt = torch.zeros(1, K, dtype=torch.long, device=next(model.parameters()).device)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        if isinstance(model, calm.CALM):
            calm.generate_chunks(model, prompt, n_tokens // K)
        else:
            model.generate(prompt, n_tokens, temperature=1.0)
        best = min(best, time.perf_counter() - t)
    return 1 / K, n_tokens // K * K / best


def unigram_baselines(data):
    """Scores of models with no context, exact from the corpus: 'unigram_brier1', the Brier-1 on the val split of
    the train split's token frequencies p (2 sum_x q(x) p(x) - sum_x p(x)^2, q the val frequencies), and
    'mode_accuracy', how often the train split's most frequent token is the val token (an autoencoder or sampler
    that always answers it)."""
    train, val = (np.bincount(np.asarray(data.split(s)), minlength=data.vocab_size).astype(np.float64)
                  for s in ("train", "val"))
    p, q = train / train.sum(), val / val.sum()
    return dict(unigram_brier1=float(2 * q @ p - p @ p), mode_accuracy=float(q[p.argmax()]))


@torch.no_grad()
def robustness(ae, data, args, sigmas, n_batches=16):
    """Held-out reconstruction accuracy of an autoencoder with Gaussian noise on the posterior mean: 'recon_rel'
    {sigma: accuracy} with sigma relative to the latents' RMS (calm.reconstruction_accuracy(relative=True)),
    'recon_abs' with sigma absolute, 'recon_acc' clean, 'latent_rms' (the RMS of the posterior means),
    'posterior_sigma_rms' (of the posterior's standard deviations; 0 for a plain autoencoder) and 'tokens' scored.
    The chunks are objectives.ae_evaluate's (n_batches val batches, its generator)."""
    rel = objectives.ae_evaluate(ae, data, args, sigmas, n_batches, relative=True)
    absolute = objectives.ae_evaluate(ae, data, args, sigmas, n_batches)
    gen = torch.Generator().manual_seed(args.seed + 2)  # ae_evaluate's chunks, again
    x = torch.cat([data.get_batch("val", args.batch_size, args.block_size, gen)[0]
                   for _ in range(n_batches)]).view(-1, ae.K)
    mu, log_sigma = ae.encode(x)
    sigma = log_sigma.exp() if ae.cfg.variational else torch.zeros_like(mu)
    return dict(recon_acc=calm.reconstruction_accuracy(ae, x), recon_rel={f"{s:g}": a for s, a in rel.items()},
                recon_abs={f"{s:g}": a for s, a in absolute.items()}, latent_rms=float(mu.pow(2).mean().sqrt()),
                posterior_sigma_rms=float(sigma.pow(2).mean().sqrt()), tokens=x.numel())
