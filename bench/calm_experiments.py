"""Measurements behind tutorials/calm.ipynb and bench/calm_runs.py (not the paper itself: that is calm.py and
calm_heads.py). Every function takes a trained model (CALM or a GPT) and the data, and samples only."""
import copy
import json
import os
import time

import numpy as np
import torch

import brierlm
import calm


def sampler_at(model, temperature, sampler="batch"):
    """A draw() for brierlm at a temperature: CALM's likelihood-free sampler (sampler 'batch' or 'exact'), or
    softmax(logits / T) for a GPT."""
    if isinstance(model, calm.CALM):
        def draw(m, ctx, n, gen, args):
            args = copy.copy(args)
            args.temp_sampler = sampler
            return calm.calm_draw(m, ctx, n, gen, args, temperature)
        return draw
    return lambda m, ctx, n, gen, args: m.generate(ctx, n, temperature=temperature, generator=gen)[:, -n:]


def brier_scores(model, data, args, n_positions=256, temperature=1.0, seed=0, sampler="batch"):
    """Brier-1..4 and BrierLM of any model here (brierlm.py, two samples per position), with their standard
    errors over positions ('brier1_se' .. 'brier4_se', 'brierlm_se', None when a Brier-n <= 0)."""
    est = brierlm.brier_eval(model, {"draw": sampler_at(model, temperature, sampler)}, data, args, n_positions,
                             seed)["sampled"]
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
    ctx, ref = brierlm.eval_windows(data, "val", n_positions, brierlm.context_length(args), gen)
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


# ----------------------------------------------------------------------------- reading bench/calm_runs.py's results

METRICS = ["brier1", "brier2", "brier3", "brier4", "brierlm"]


def load_results(exp, folder):
    """The runs of results/calm_<exp>.json ({} when absent)."""
    path = os.path.join(folder, f"calm_{exp}.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)["runs"]


def curves(runs):
    """{'ntp' | 'calm K=k': [point, ...]}: NTP's one-point runs joined into a curve; CALM's seeds averaged point by
    point, each metric as mean, its standard error over seeds (m_se; 0 for one seed) and the seeds' values."""
    out = {}
    ntp = sorted((r["points"][-1] for name, r in runs.items() if name.startswith("ntp")), key=lambda p: p["iter"])
    if ntp:  # one seed: the standard error over positions (NaN where undefined)
        out["ntp"] = [dict(p, seeds=1, **{m + "_se": p.get(m + "_se") or np.nan for m in METRICS}) for p in ntp]
    groups = {}
    for name, r in runs.items():
        if name.startswith("calm"):
            groups.setdefault(name.split(" seed")[0], []).append(r["points"])
    for label, seeds in sorted(groups.items(), key=lambda kv: -int(kv[0].split("K=")[1])):
        n_points = min(len(s) for s in seeds)
        points = []
        for i in range(n_points):
            ps = [s[i] for s in seeds]
            p = dict(iter=ps[0]["iter"], train_flops=ps[0]["train_flops"], flops_per_token=ps[0]["flops_per_token"],
                     seeds=len(ps))
            for m in METRICS:
                v = np.array([q[m] for q in ps], dtype=float)
                p[m], p[m + "_values"] = float(v.mean()), v.tolist()
                p[m + "_se"] = float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else (ps[0].get(m + "_se")
                                                                                            or np.nan)
            points.append(p)
        out[label] = points
    return out


def ntp_at(ntp, flops, metric="brier1"):
    """NTP's metric at a FLOPs count, interpolated linearly in log FLOPs between its points (None outside)."""
    xs = np.log([p["train_flops"] for p in ntp])
    ys = [p[metric] for p in ntp]
    x = np.log(flops)
    return float(np.interp(x, xs, ys)) if xs[0] <= x <= xs[-1] else None


def ratio_to_ntp(calm_points, ntp, metric="brier1"):
    """[(FLOPs, CALM / NTP at those FLOPs, its standard error from the CALM seeds)] along a CALM curve."""
    out = []
    for p in calm_points:
        ref = ntp_at(ntp, p["train_flops"], metric)
        if ref:
            out.append((p["train_flops"], p[metric] / ref, p[metric + "_se"] / ref))
    return out
