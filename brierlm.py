"""BrierLM: a likelihood-free score for any language model that can sample (Shao, Li, Meng, Zhou 2025,
"Continuous Autoregressive Language Models", arXiv 2510.27688: its section on likelihood-free evaluation).

Paper -> code
  Brier(P, y) = 2 P(y) - sum_x P(x)^2                      exact_brier1 (models that expose probabilities)
  unbiased two-sample estimate 1{x1=y} + 1{x2=y} - 1{x1=x2} two_sample_estimates
  Brier-n: outcome = the n-gram after a position; n-gram     two_sample_estimates (cumulative product of per-
           match = all n tokens match                        token matches over one 4-token rollout per sample)
  BrierLM = 100 * (Brier-1 Brier-2 Brier-3 Brier-4)^(1/4)    brierlm_from_briers (each factor clamped at 0)
  lower-variance variant for token models (authors' code):   variance_reduced_estimates
      2 prod_j P(y_j | y_<j) exact, collision term exact for the n-th token
  evaluation at random positions of a held-out split         eval_windows, brier_eval, summarize

The model is reached only through draw(ctx (B, T), n_tokens, generator) -> (B, n_tokens): two independent
continuations per position, never a probability. That one interface covers token models (ancestral sampling),
MTP (its next-token head) and CALM (sampled vectors decoded into K-token chunks; its contexts end at chunk
boundaries because context_length is a multiple of K). objectives.py gives every objective its draw;
`python score.py --ckpt PATH` scores any checkpoint.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

from runtime import UserError

MAX_N = 4  # the paper's BrierLM uses n = 1 .. 4
WINDOW_BYTES = 2 ** 30  # every evaluation window is built at once: N x (context + 4) int64 must fit in 1 GiB


def check_n(max_n):
    if not isinstance(max_n, int) or not 1 <= max_n <= MAX_N:
        raise UserError(f"n-gram size must be an integer in 1..{MAX_N}, got {max_n!r}")


# ----------------------------------------------------------------------------- the estimators

def two_sample_estimates(x1, x2, y, max_n=MAX_N):
    """Unbiased Brier-n estimates per position from two sampled continuations x1, x2 and the reference y, all
    (N, >= max_n) token tensors. Returns (N, max_n) floats; column n-1 is the Brier-n estimate."""
    check_n(max_n)
    for name, t in (("x1", x1), ("x2", x2), ("reference", y)):
        if t.dim() != 2 or t.size(1) < max_n:
            raise UserError(f"{name} has shape {tuple(t.shape)}: need (N, >= {max_n}) tokens for Brier-{max_n}")
    x1, x2, y = x1[:, :max_n], x2[:, :max_n], y[:, :max_n].to(x1.device)
    hit1 = (x1 == y).long().cumprod(dim=1)      # (N, n): 1{x1 matches all of y_1..y_n}
    hit2 = (x2 == y).long().cumprod(dim=1)
    same = (x1 == x2).long().cumprod(dim=1)     # 1{the two n-gram samples agree}
    return (hit1 + hit2 - same).float()         # eq. two-sample: E = 2 P(y) - sum_g P(g)^2 = Brier(P, y)


def exact_brier1(logits, y):
    """Exact Brier-1 per row: 2 p(y) - sum_x p(x)^2, logits (N, V), y (N,). Needs probabilities."""
    p = F.softmax(logits.float(), dim=-1)
    return 2 * p.gather(1, y.view(-1, 1)).squeeze(1) - (p * p).sum(dim=1)


@torch.no_grad()
def variance_reduced_estimates(logits_fn, ctx, y, x1, x2, max_n=MAX_N):
    """Lower-variance unbiased Brier-n for models with probabilities (the authors' token-model evaluation).
    accuracy term  2 prod_{j<=n} P(y_j | ctx, y_<j)                      exact (teacher forcing on y)
    collision term 1{x1_<n == x2_<n} * sum_x P(x | ctx, x1_<n)^2          exact in the n-th token
    E[collision] = sum_{prefix} P(prefix)^2 sum_x P(x | prefix)^2 = sum_g P(g)^2, so the sum stays unbiased.
    logits_fn(idx (B, T)) -> logits (B, T, V); ctx (N, T); y, x1, x2 (N, >= max_n). Returns (N, max_n)."""
    check_n(max_n)
    T = ctx.size(1)
    y, x1, x2 = y[:, :max_n].to(ctx.device), x1[:, :max_n], x2[:, :max_n]
    p_ref = F.softmax(logits_fn(torch.cat([ctx, y[:, :-1]], 1))[:, T - 1:].float(), -1)    # (N, n, V)
    p_y = p_ref.gather(2, y.unsqueeze(2)).squeeze(2).cumprod(dim=1)                       # P(y_1..y_n)
    p_s1 = F.softmax(logits_fn(torch.cat([ctx, x1[:, :-1]], 1))[:, T - 1:].float(), -1)   # along sample 1
    same_prefix = torch.cat([torch.ones_like(x1[:, :1]), (x1 == x2).long().cumprod(1)[:, :-1]], 1)  # (N, n)
    return 2 * p_y - same_prefix * (p_s1 * p_s1).sum(-1)


def brierlm_from_briers(briers):
    """100 x geometric mean of Brier-1..n (the paper: n = 4). A Brier-n below 0 (a confidently wrong model, or
    noise) makes the score 0. The authors' code clamps the product instead, so that an even number of negative
    Brier-n would give a positive score (four Brier-n of -1 would score 100); clamping each factor avoids that
    and is identical whenever every Brier-n >= 0, the regime of every number in the paper."""
    prod = float(np.prod(np.clip(np.asarray(briers, dtype=np.float64), 0.0, None)))
    return 100.0 * prod ** (1.0 / len(briers))


def brierlm_stderr(per_position):
    """Standard error of BrierLM by the delta method over positions: per_position (N, n) estimates."""
    e = np.asarray(per_position, dtype=np.float64)
    b = e.mean(0)
    if len(e) < 2 or (b <= 0).any():
        return float("nan")
    score = brierlm_from_briers(b)
    influence = (score / (len(b) * b) * (e - b)).sum(1)  # d score / d b_n = score / (n b_n), linearised
    return float(influence.std(ddof=1) / math.sqrt(len(e)))


# ----------------------------------------------------------------------------- where to evaluate

def context_length(block_size, chunk_size=1):
    """Largest multiple of the chunk size (1 for token models, K for CALM) that leaves room for 4 new tokens."""
    T = (block_size - MAX_N) // chunk_size * chunk_size
    if T < 1:
        raise UserError(f"block_size={block_size} leaves no context before {MAX_N} evaluated tokens "
                        f"(chunk size {chunk_size}): BrierLM needs block_size >= {chunk_size + MAX_N}")
    return T


def eval_windows(data, split, n_positions, ctx_len, generator, max_n=MAX_N):
    """n_positions random positions of a split: contexts (N, ctx_len) and the next max_n reference tokens."""
    tokens = data.split(split)
    if n_positions < 1:
        raise UserError(f"the number of BrierLM positions must be at least 1, got {n_positions}")
    if n_positions * (ctx_len + max_n) * 8 > WINDOW_BYTES:
        raise UserError(f"{n_positions:,} BrierLM positions need {n_positions * (ctx_len + max_n) * 8 / 2 ** 30:.1f} "
                        f"GiB of windows, built at once; use at most {WINDOW_BYTES // ((ctx_len + max_n) * 8):,} "
                        f"(and average several seeds)")
    if len(tokens) < ctx_len + max_n + 1:
        raise UserError(f"the {split!r} split ({len(tokens)} tokens) is shorter than one BrierLM window "
                        f"({ctx_len} context + {max_n} tokens)")
    ix = torch.randint(len(tokens) - ctx_len - max_n + 1, (n_positions,), generator=generator).tolist()
    w = torch.stack([torch.from_numpy(tokens[i:i + ctx_len + max_n].astype(np.int64)) for i in ix])
    return w[:, :ctx_len], w[:, ctx_len:]  # (N, T), (N, max_n)


# ----------------------------------------------------------------------------- evaluation from samples

@torch.no_grad()
def brier_eval(draw, data, n_positions, context_len, seed, split="val", batch_positions=64, device="cpu",
               logits_fn=None, progress=None):
    """Per-position Brier-n estimates at n_positions random positions of a split, (N, 4) numpy, from two samples
    per position: draw(ctx (B, T), n_tokens, generator) -> (B, n_tokens) sampled continuations, the only access to
    the model. logits_fn(idx (B, T)) -> (B, T, V), for models that have probabilities, adds the variance-reduced
    estimates 'reduced' (N, 4) and the exact Brier-1 'exact1' (N,) (valid when draw samples that softmax at
    temperature 1). Deterministic in seed; the global torch RNG is saved and restored (training's stream is
    untouched). progress(positions done), if given, is called after every batch."""
    device = torch.device(device)
    out = {"sampled": []}
    if logits_fn is not None:
        out.update(reduced=[], exact1=[])
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed)  # a draw() that uses the global RNG is deterministic too
        ctx_all, ref_all = eval_windows(data, split, n_positions, context_len, torch.Generator().manual_seed(seed))
        gen = torch.Generator(device=device).manual_seed(seed)
        for lo in range(0, n_positions, batch_positions):
            ctx, ref = ctx_all[lo:lo + batch_positions].to(device), ref_all[lo:lo + batch_positions]
            B = ctx.size(0)
            xs = draw(torch.cat([ctx, ctx]), MAX_N, gen)                 # (2B, 4): two independent samples
            if not torch.is_tensor(xs) or xs.shape != (2 * B, MAX_N):
                raise UserError(f"draw() must return ({2 * B}, {MAX_N}) tokens, got "
                                f"{tuple(xs.shape) if torch.is_tensor(xs) else type(xs).__name__}")
            x1, x2 = xs[:B], xs[B:]
            out["sampled"].append(two_sample_estimates(x1, x2, ref).cpu())
            if logits_fn is not None:
                reduced = variance_reduced_estimates(logits_fn, ctx, ref, x1, x2).cpu()
                out["reduced"].append(reduced)
                out["exact1"].append(reduced[:, 0])  # n = 1 has no sampled part left: the exact Brier-1
            if progress is not None:
                progress(lo + B)
    return {k: torch.cat(v).double().numpy() for k, v in out.items()}


def summarize(per_position):
    """{'brier1'..'brier4', 'brierlm'} from per-position estimates (N, 4)."""
    b = per_position.mean(0)
    res = {f"brier{n + 1}": float(b[n]) for n in range(len(b))}
    res["brierlm"] = brierlm_from_briers(b)
    return res
