"""BrierLM: a likelihood-free score for any language model that can sample (Shao et al. 2025, "Continuous
Autoregressive Language Models", the evaluation section; paper note: ../shared/papers/brierlm.md).

    python brierlm.py --ckpt out/ntp/ckpt.pt [--positions 512] [--seed 1337] [--exact]

Paper -> code
  Brier(P, y) = 2 P(y) - sum_x P(x)^2                      exact_brier1 (models that expose probabilities)
  unbiased two-sample estimate 1{x1=y} + 1{x2=y} - 1{x1=x2} two_sample_estimates
  Brier-n: outcome = the n-gram after a position; n-gram     two_sample_estimates (cumulative product of per-
           match = all n tokens match                        token matches over one 4-token rollout per sample)
  BrierLM = 100 * (Brier-1 Brier-2 Brier-3 Brier-4)^(1/4)    brierlm_from_briers (product clamped at >= 0)
  lower-variance variant for token models (authors' code):   variance_reduced_estimates
      2 prod_j P(y_j | y_<j) exact, collision term exact for the n-th token
  evaluation at positions of the val split                   eval_windows, brier_eval, evaluate_objective

The model is reached only through an objective's draw(model, ctx (B, T), n_tokens, generator, args) -> (B, n):
two independent continuations per position, never a probability. That one interface covers token models
(ancestral sampling), MTP (its next-token head) and CALM (sampled vectors decoded into K-token chunks; contexts
end at chunk boundaries because the context length is a multiple of args.chunk_size).
"""
import argparse
import math
import sys
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

from gpt import UserError

MAX_N = 4  # the paper's BrierLM uses n = 1 .. 4


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
    """100 x geometric mean of Brier-1..n (the paper: n = 4); a negative product (noise) is clamped to 0."""
    prod = max(float(np.prod(briers)), 0.0)
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

def context_length(args):
    """Largest multiple of the chunk size (1 for token models, K for CALM) that leaves room for 4 new tokens."""
    k = int(getattr(args, "chunk_size", 1) or 1)
    T = (args.block_size - MAX_N) // k * k
    if T < 1:
        raise UserError(f"block_size={args.block_size} leaves no context before {MAX_N} evaluated tokens "
                        f"(chunk size {k}): BrierLM needs block_size >= {k + MAX_N}")
    return T


def eval_windows(data, split, n_positions, ctx_len, generator, max_n=MAX_N):
    """n_positions random positions of a split: contexts (N, ctx_len) and the next max_n reference tokens."""
    tokens = data.split(split)
    if n_positions < 1:
        raise UserError(f"the number of BrierLM positions must be at least 1, got {n_positions}")
    if len(tokens) < ctx_len + max_n + 1:
        raise UserError(f"the {split!r} split ({len(tokens)} tokens) is shorter than one BrierLM window "
                        f"({ctx_len} context + {max_n} tokens)")
    ix = torch.randint(len(tokens) - ctx_len - max_n + 1, (n_positions,), generator=generator).tolist()
    w = torch.stack([torch.from_numpy(tokens[i:i + ctx_len + max_n].astype(np.int64)) for i in ix])
    return w[:, :ctx_len], w[:, ctx_len:]  # (N, T), (N, max_n)


# ----------------------------------------------------------------------------- evaluation through draw()

def get_draw(model, objective):
    if objective.get("draw") is not None:
        return objective["draw"]
    if model is None or not hasattr(model, "generate"):
        raise UserError("BrierLM needs a sampler: this objective has no draw() and its model no generate()")
    import train
    return train.default_draw


def model_device(model):
    p = next(model.parameters(), None) if isinstance(model, torch.nn.Module) else None
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def brier_eval(model, objective, data, args, n_positions, seed, split="val", batch_positions=8,
               variance_reduced=False):
    """Per-position Brier-n estimates, (N, 4) numpy, from two draws per position; variance_reduced=True adds
    the lower-variance estimates of a model with logits (N, 4) and the exact Brier-1 (N,). Deterministic in
    seed; the global torch RNG is saved and restored, so training's random stream is untouched."""
    draw = get_draw(model, objective)
    device = model_device(model)
    ctx_len = context_length(args)
    was_training = model.training if isinstance(model, torch.nn.Module) else None
    if was_training:
        model.eval()
    out = {"sampled": []}
    if variance_reduced:
        out.update(reduced=[], exact1=[])
    fork = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=fork):
            torch.manual_seed(seed)  # a draw() that uses the global RNG is deterministic too
            ctx_all, ref_all = eval_windows(data, split, n_positions, ctx_len, torch.Generator().manual_seed(seed))
            gen = torch.Generator(device=device).manual_seed(seed)
            for lo in range(0, n_positions, batch_positions):
                ctx, ref = ctx_all[lo:lo + batch_positions].to(device), ref_all[lo:lo + batch_positions]
                B = ctx.size(0)
                xs = draw(model, torch.cat([ctx, ctx]), MAX_N, gen, args)  # (2B, 4): two independent samples
                if not torch.is_tensor(xs) or xs.shape != (2 * B, MAX_N):
                    raise UserError(f"draw() must return ({2 * B}, {MAX_N}) tokens, got "
                                    f"{tuple(xs.shape) if torch.is_tensor(xs) else type(xs).__name__}")
                x1, x2 = xs[:B], xs[B:]
                out["sampled"].append(two_sample_estimates(x1, x2, ref).cpu())
                if variance_reduced:
                    logits_fn = lambda idx: model(idx)[0]  # noqa: E731 (models that expose logits)
                    out["reduced"].append(variance_reduced_estimates(logits_fn, ctx, ref, x1, x2).cpu())
                    out["exact1"].append(exact_brier1(logits_fn(ctx)[:, -1], ref[:, 0].to(device)).cpu())
    finally:
        if was_training:
            model.train()
    return {k: torch.cat(v).double().numpy() for k, v in out.items()}


def summarize(per_position):
    b = per_position.mean(0)
    res = {f"brier{n + 1}": float(b[n]) for n in range(len(b))}
    res["brierlm"] = brierlm_from_briers(b)
    return res


def evaluate_objective(model, objective, data, args):
    """What train.py calls at each eval: Brier-1..4 and BrierLM (0..100) at args.brier_positions val positions,
    from samples only. Deterministic given args.seed; leaves the global RNG as it found it."""
    est = brier_eval(model, objective, data, args, args.brier_positions, args.seed)["sampled"]
    return summarize(est)


# ----------------------------------------------------------------------------- command line

def main(argv=None):
    from data import load_data
    from sample import load_model
    from train import OneLineParser, pick_device
    parser = OneLineParser(description="BrierLM (Brier-1..4) of any checkpoint, from samples only")
    parser.add_argument("--ckpt", default="out/ntp/ckpt.pt")
    parser.add_argument("--positions", type=int, default=None, help="val positions (default: the checkpoint's "
                                                                        "brier_positions, at least 256)")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--split", default="val")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--exact", action="store_true", help="token models: also the exact Brier-1 and the "
                                                              "variance-reduced Brier-n")
    try:
        a = parser.parse_args(argv)
        device = pick_device(a.device)
        model, objective, saved, _ = load_model(a.ckpt, device)
        saved.device = device
        n = a.positions if a.positions is not None else max(256, getattr(saved, "brier_positions", 0))
        data = load_data(saved.dataset, saved.tokenizer)
        if a.exact and objective.get("draw") is not None:
            raise UserError("--exact needs a model with next-token probabilities (a token model, e.g. ntp)")
        r = brier_eval(model, objective, data, saved, n, a.seed, a.split, variance_reduced=a.exact)
        print(f"{a.ckpt}: {n} positions of {data.name}/{a.split}, seed {a.seed}, context {context_length(saved)}")
        rows = [("sampled (two-sample)", r["sampled"])] + ([("variance-reduced", r["reduced"])] if a.exact else [])
        for name, e in rows:
            se = e.std(0, ddof=1) / math.sqrt(len(e))
            s = summarize(e)
            print(f"  {name:21s}" + "".join(f" Brier-{i + 1} {s[f'brier{i + 1}']:.4f}±{se[i]:.4f} |"
                                             for i in range(MAX_N)) +
                  f" BrierLM {s['brierlm']:.3f}±{brierlm_stderr(e):.3f}")
        if a.exact:
            print(f"  exact Brier-1 {r['exact1'].mean():.4f}±{r['exact1'].std(ddof=1) / math.sqrt(n):.4f}")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
