"""BrierLM: a likelihood-free score for any language model that can sample (Shao et al. 2025, "Continuous
Autoregressive Language Models", the evaluation section; paper note: ../shared/papers/brierlm.md).

    python brierlm.py --ckpt out/ntp/ckpt.pt [--positions 512] [--seed 1337] [--exact]

Paper -> code
  Brier(P, y) = 2 P(y) - sum_x P(x)^2                      exact_brier1 (models that expose probabilities)
  unbiased two-sample estimate 1{x1=y} + 1{x2=y} - 1{x1=x2} two_sample_estimates
  Brier-n: outcome = the n-gram after a position; n-gram     two_sample_estimates (cumulative product of per-
           match = all n tokens match                        token matches over one 4-token rollout per sample)
  BrierLM = 100 * (Brier-1 Brier-2 Brier-3 Brier-4)^(1/4)    brierlm_from_briers (each factor clamped at 0)
  lower-variance variant for token models (authors' code):   variance_reduced_estimates
      2 prod_j P(y_j | y_<j) exact, collision term exact for the n-th token
  evaluation at positions of the val split                   eval_windows, brier_eval, evaluate_objective

The model is reached only through an objective's draw(model, ctx (B, T), n_tokens, generator, args) -> (B, n):
two independent continuations per position, never a probability. That one interface covers token models
(ancestral sampling), MTP (its next-token head) and CALM (sampled vectors decoded into K-token chunks; contexts
end at chunk boundaries because the context length is a multiple of args.chunk_size).
"""
import math
import sys

import numpy as np
import torch
import torch.nn.functional as F

from data import load_data
from gpt import GPT, UserError
from runtime import OneLineParser, Progress, default_draw, load_model, pick_device

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


# ----------------------------------------------------------------------------- evaluation through draw()

def get_draw(model, objective):
    if objective.get("draw") is not None:
        return objective["draw"]
    if model is None or not hasattr(model, "generate"):
        raise UserError("BrierLM needs a sampler: this objective has no draw() and its model no generate()")
    return default_draw


def model_device(model):
    p = next(model.parameters(), None) if isinstance(model, torch.nn.Module) else None
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def brier_eval(model, objective, data, args, n_positions, seed, split="val", batch_positions=None,
               variance_reduced=False, progress=None):
    """Per-position Brier-n estimates, (N, 4) numpy, from two draws per position; variance_reduced=True adds
    the lower-variance estimates of a model with logits (N, 4) and the exact Brier-1 (N,) (valid when draw()
    samples the model's own softmax at temperature 1, as the default draw does). Deterministic in seed (for a
    given batch_positions); the global torch RNG is saved and restored, so training's random stream is untouched.
    progress(positions done), if given, is called after every batch."""
    draw = get_draw(model, objective)
    device = model_device(model)
    ctx_len = context_length(args)
    if batch_positions is None:  # keep the (2B, T, V) logits of one draw() under ~64 MB of float32
        batch_positions = max(4, min(64, 2 ** 23 // (ctx_len * data.vocab_size)))
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
                    reduced = variance_reduced_estimates(logits_fn, ctx, ref, x1, x2).cpu()
                    out["reduced"].append(reduced)
                    out["exact1"].append(reduced[:, 0])  # n = 1 has no sampled part left: the exact Brier-1
                if progress is not None:
                    progress(lo + B)
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


# ----------------------------------------------------------------------------- checkpoints and correlations

@torch.no_grad()
def val_cross_entropy(model, objective, data, args, n_batches=20, batch_size=16, seed=0, split="val"):
    """Mean next-token loss over n_batches fixed random windows (its own generator)."""
    gen = torch.Generator().manual_seed(seed)
    losses = [objective["loss"](model, *data.get_batch(split, batch_size, args.block_size, gen,
                                                       model_device(model)), args)[0].item()
              for _ in range(n_batches)]
    return float(np.mean(losses))


def score_checkpoint(path, n_positions=512, seed=0, ce_batches=20, variance_reduced=True, device="cpu"):
    """Val cross-entropy and BrierLM (two-sample, and variance-reduced for token models) of one checkpoint,
    with standard errors and the per-position estimates ('sampled', 'reduced', 'exact1')."""
    model, objective, saved, _ = load_model(path, device)
    saved.device = device
    data = load_data(saved.dataset, saved.tokenizer)
    variance_reduced = variance_reduced and isinstance(model, GPT)  # needs next-token probabilities
    per = brier_eval(model, objective, data, saved, n_positions, seed, variance_reduced=variance_reduced)
    out = dict(val_loss=val_cross_entropy(model, objective, data, saved, ce_batches, seed=seed), **summarize(
        per["sampled"]), brierlm_se=brierlm_stderr(per["sampled"]), per_position=per)
    if variance_reduced:
        out.update(brierlm_vr=summarize(per["reduced"])["brierlm"], brierlm_vr_se=brierlm_stderr(per["reduced"]),
                   exact_brier1=float(per["exact1"].mean()))
    return out


@torch.no_grad()
def temperature_sweep(model, data, args, temperatures, n_batches=10, batch_size=16, seed=0, split="val"):
    """Why accuracy is not a proper score: scale a token model's logits by 1/T and measure, exactly from its
    probabilities, the accuracy of a sample (E 1{x=y} = P_T(y)), the Brier-1 score 2 P_T(y) - sum P_T^2 and the
    cross-entropy. Sharpening (T < 1) raises sample accuracy; the proper scores are best near the model's own
    (T = 1) distribution. Returns {T: {'sample_acc', 'brier1', 'cross_entropy'}}."""
    gen = torch.Generator().manual_seed(seed)
    batches = [data.get_batch(split, batch_size, args.block_size, gen, model_device(model)) for _ in range(n_batches)]
    logits = [model(x)[0].flatten(0, 1).float() for x, _ in batches]  # (B*T, V) each
    ys = [y.flatten() for _, y in batches]
    out = {}
    for T in temperatures:
        acc, b1, ce = [], [], []
        for lg, y in zip(logits, ys):
            p = F.softmax(lg / T, -1)
            acc.append(p.gather(1, y.view(-1, 1)).mean().item())
            b1.append(exact_brier1(lg / T, y).mean().item())
            ce.append(F.cross_entropy(lg / T, y).item())
        out[T] = dict(sample_acc=float(np.mean(acc)), brier1=float(np.mean(b1)), cross_entropy=float(np.mean(ce)))
    return out


def pearson(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else float("nan")  # undefined for a constant series


def ranks(a):
    """Ranks 1..n, ties sharing their average rank (what Spearman's coefficient needs)."""
    a = np.asarray(a, dtype=np.float64)
    order = np.argsort(a, kind="stable")
    r = np.empty(len(a))
    r[order] = np.arange(1, len(a) + 1)
    for v in np.unique(a):
        r[a == v] = r[a == v].mean()
    return r


def spearman(a, b):
    return pearson(ranks(a), ranks(b))


# ----------------------------------------------------------------------------- command line

def uncertainty(e):
    """'±se' of BrierLM from per-position estimates e (N, 4), or why there is none."""
    se = brierlm_stderr(e)
    if math.isfinite(se):
        return f"±{se:.3f}"
    low = [f"Brier-{n + 1}" for n, b in enumerate(e.mean(0)) if b <= 0]
    return (f" (no ±: {', '.join(low)} <= 0 clamps the score to 0, where it has no standard error; "
            f"read the Brier-n above, or use more positions)")


def make_parser():
    parser = OneLineParser(description="BrierLM (Brier-1..4) of any checkpoint, from samples only")
    parser.add_argument("--ckpt", default="out/ntp/ckpt.pt")
    parser.add_argument("--positions", type=int, default=None, help="val positions (default: the checkpoint's "
                                                                        "brier_positions, at least 256)")
    parser.add_argument("--seed", type=int, default=None, help="default: the checkpoint's seed (what train.py used)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--exact", action="store_true", help="token models: also the exact Brier-1 and the "
                                                              "variance-reduced Brier-n")
    return parser


def main(argv=None):
    parser = make_parser()
    try:
        a = parser.parse_args(argv)  # every number checked (runtime.NUMBER_RULES): positions >= 2, seed
        device = pick_device(a.device)
        model, objective, saved, _ = load_model(a.ckpt, device)
        saved.device = device
        n = a.positions if a.positions is not None else max(256, getattr(saved, "brier_positions", 0))
        a.seed = saved.seed if a.seed is None else a.seed
        if a.exact and not isinstance(model, GPT):
            raise UserError("--exact needs a model with next-token probabilities (a plain GPT, e.g. ntp)")
        ctx_len = context_length(saved)
        data = load_data(saved.dataset, saved.tokenizer)
        r = brier_eval(model, objective, data, saved, n, a.seed, a.split, variance_reduced=a.exact,
                       progress=Progress("BrierLM", n, "positions"))
        print(f"{a.ckpt}: {n} positions of {data.name}/{a.split}, seed {a.seed}, context {ctx_len}")
        rows = [("sampled (two-sample)", r["sampled"])] + ([("variance-reduced", r["reduced"])] if a.exact else [])
        for name, e in rows:
            se = e.std(0, ddof=1) / math.sqrt(len(e))
            s = summarize(e)
            print(f"  {name:21s}" + "".join(f" Brier-{i + 1} {s[f'brier{i + 1}']:.4f}±{se[i]:.4f} |"
                                             for i in range(MAX_N)) + f" BrierLM {s['brierlm']:.3f}{uncertainty(e)}")
        if a.exact:
            print(f"  exact Brier-1 {r['exact1'].mean():.4f}±{r['exact1'].std(ddof=1) / math.sqrt(n):.4f}")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
