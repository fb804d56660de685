"""BrierLM of any checkpoint, from samples only (brierlm.py; Shao et al. 2025).

    python score.py --ckpt out/calm/ckpt.pt [--positions 2048] [--seed 1337] [--exact]

Prints Brier-1..4 with their standard errors and BrierLM at --positions random positions of the validation split;
--exact adds, for a plain GPT, the exact Brier-1 and the variance-reduced Brier-n (the authors' token-model
estimator). A run longer than a few seconds prints a progress line with an ETA to stderr.
"""
import math
import sys

import brierlm
from data import load_data
from gpt import GPT
from objectives import brier_scores, finite_probabilities, load_model
from runtime import OneLineParser, Progress, UserError, pick_device


def uncertainty(e):
    """'±se' of BrierLM from per-position estimates e (N, 4), or why there is none."""
    se = brierlm.brierlm_stderr(e)
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
        ctx_len = brierlm.context_length(saved.block_size, getattr(model, "K", 1))
        data = load_data(saved.dataset, saved.tokenizer)
        with finite_probabilities(a.ckpt):
            r = brier_scores(model, objective, data, saved, n, a.seed, a.split, variance_reduced=a.exact,
                             progress=Progress("BrierLM", n, "positions"))
        print(f"{a.ckpt}: {n} positions of {data.name}/{a.split}, seed {a.seed}, context {ctx_len}")
        rows = [("sampled (two-sample)", r["sampled"])] + ([("variance-reduced", r["reduced"])] if a.exact else [])
        for name, e in rows:
            se = e.std(0, ddof=1) / math.sqrt(len(e))
            s = brierlm.summarize(e)
            print(f"  {name:21s}" + "".join(f" Brier-{i + 1} {s[f'brier{i + 1}']:.4f}±{se[i]:.4f} |"
                                             for i in range(brierlm.MAX_N)) +
                  f" BrierLM {s['brierlm']:.3f}{uncertainty(e)}")
        if a.exact:
            print(f"  exact Brier-1 {r['exact1'].mean():.4f}±{r['exact1'].std(ddof=1) / math.sqrt(n):.4f}")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
