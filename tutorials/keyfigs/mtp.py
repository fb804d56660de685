"""Key figures of tutorials/mtp.ipynb, drawn from the files that `python -m bench mtp sweep <sweep>` writes
(bench/mtp_experiments.py). `results` is a dict of them by part, {"size": ..., "induction": ..., "polynomial": ...,
"bytes": ..., "speedup": ...}, holding the parts that exist; each is {sweep, scale, hardware, protocol, recipe,
runs: {name: run}} with
  size        "<L>x<d>_n<n>_s<seed>": {n_layer, n_embd, n, seed, params_non_embedding, val_loss_h1, brier1, brierlm, ..}
  induction   "<L>x<d>_n<n>_s<seed>": {n_layer, n_embd, n, seed, params_non_embedding, acc_val, token_acc_val}
  polynomial  the same, with acc_val_ood, token_acc_val_ood and acc_ops<m>_val / acc_ops<m>_val_ood
  bytes       "<data>_n<n>": {dataset, n, tokens_per_forward (greedy), tokens_per_forward_t1, per_prompt, ..}
  speedup     "<name>": {n, n_layer, n_embd, verify_over_step, per_prompt: [{tokens_per_forward, speedup}], speedup, ..}
A sweep still running has fewer runs: what exists is drawn (one seed: no error bar); a figure whose part has no file
is skipped (NEEDS). The memory figure and the verify-cost table of the notebook are measured in the notebook itself
and are not key figures."""
import matplotlib.pyplot as plt
import numpy as np

RESULTS = {part: f"results/mtp_{part}.json" for part in ("size", "induction", "polynomial", "bytes", "speedup")}
NEEDS = {"accepted_tokens": ["bytes"], "speedup": ["speedup"], "benefit_vs_size": ["size"],
         "induction_vs_size": ["induction"], "polynomial": ["polynomial"]}


def mean_se(values):
    """(mean, standard error over the values); se None for a single value (no error bar)."""
    v = np.asarray(values, dtype=float)
    return float(v.mean()), (float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else None)


def size_summary(report):
    """Per model size and n (sizes by L d^2): non-embedding parameters and, paired by seed against the n = 1 run of
    the same size, mean and se of head 1's val loss, Brier-1 and BrierLM and of their change from n = 1 (d_<key>)."""
    runs, rows = report["runs"], []
    for L, d in sorted({(r["n_layer"], r["n_embd"]) for r in runs.values()}, key=lambda s: s[0] * s[1] ** 2):
        for n in sorted({r["n"] for r in runs.values()}):
            pairs = [(r, runs.get(f"{L}x{d}_n1_s{r['seed']}")) for r in runs.values()
                     if (r["n_layer"], r["n_embd"], r["n"]) == (L, d, n)]
            pairs = [(r, base) for r, base in pairs if base is not None]
            if not pairs:
                continue
            row = dict(n_layer=L, n_embd=d, n=n, seeds=len(pairs), params=pairs[0][0]["params_non_embedding"])
            for k in ("val_loss_h1", "brier1", "brierlm"):
                row[k], row[k + "_se"] = mean_se([r[k] for r, _ in pairs])
                row["d_" + k], row["d_" + k + "_se"] = mean_se([r[k] - base[k] for r, base in pairs])
            rows.append(row)
    return rows


def task_summary(report):
    """Per model size and n: mean and se over seeds of every accuracy (acc_*, token_acc_*)."""
    runs, rows = report["runs"], []
    for L, d, n in sorted({(r["n_layer"], r["n_embd"], r["n"]) for r in runs.values()},
                          key=lambda k: (k[0] * k[1] ** 2, k[2])):
        group = [r for r in runs.values() if (r["n_layer"], r["n_embd"], r["n"]) == (L, d, n)]
        row = dict(n_layer=L, n_embd=d, n=n, seeds=len(group), params=group[0]["params_non_embedding"])
        for k in sorted(k for k in group[0] if k.startswith(("acc", "token_acc"))):
            row[k], row[k + "_se"] = mean_se([r[k] for r in group])
        rows.append(row)
    return rows


def errorbar(ax, rows, x, key, **style):
    """One curve of summary rows; error bars only where there are two seeds or more."""
    se = [r[key + "_se"] or 0.0 for r in rows]
    ax.errorbar([r[x] for r in rows], [r[key] for r in rows], yerr=se if any(se) else None, capsize=3, **style)


def seeds(rows):
    lo, hi = min(r["seeds"] for r in rows), max(r["seeds"] for r in rows)
    return f"{lo}" + (f"-{hi}" if hi > lo else "") + f" seed{'s' * (hi > 1)}"


def accepted_tokens(results):
    """Byte-level self-speculative decoding: accepted tokens per forward against the number of heads n (10 blocks
    × 144, byte models of code and of text), greedy (solid; its output is plain greedy decoding's) and speculative
    sampling at T = 1 (dashed). Dotted: the upper bound n. The paper: 6.4× faster decoding at n = 8 (7B, bytes)."""
    runs = results["bytes"]["runs"].values()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for ds, label in (("pystdlib", "code"), ("shakespeare", "text")):
        rs = sorted((r for r in runs if r["dataset"] == ds), key=lambda r: r["n"])
        if rs:
            line, = ax.plot([r["n"] for r in rs], [r["tokens_per_forward"] for r in rs], "o-", label=f"{label}, greedy")
            ax.plot([r["n"] for r in rs], [r["tokens_per_forward_t1"] for r in rs], "s--", color=line.get_color(),
                    label=f"{label}, sampling T = 1")
    ns = sorted({r["n"] for r in runs})
    ax.plot(ns, ns, ":", color="gray", label="upper bound: n")
    ax.set(xlabel="n (heads)", ylabel="accepted tokens per forward", xticks=ns, title="byte-level self-speculative "
           "decoding\n(paper, 7B bytes, n = 8: 6.4x wall-clock on GPU)")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def speedup(results):
    """Where self-speculative decoding pays on a CPU: wall-clock speed-up over cached greedy decoding of the same
    model (bfloat16, n = 4, batch 1) against accepted tokens per forward, one point per prompt, for a model trained
    on code and one on a counting stream (drafts easy). Dotted: tokens per forward / (verify forward / greedy step),
    the speed-up the measured costs predict; 1 = break-even."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for i, (name, sp) in enumerate(results["speedup"]["runs"].items()):
        ax.scatter([q["tokens_per_forward"] for q in sp["per_prompt"]], [q["speedup"] for q in sp["per_prompt"]],
                   color=f"C{i}", label=f"{name}: {sp['n_layer']} × {sp['n_embd']}, {sp['speedup']:.2f}x on average")
        xs = [1, sp["n"]]
        ax.plot(xs, [x / sp["verify_over_step"] for x in xs], ":", color=f"C{i}",
                label=f"{name}: tokens/forward / {sp['verify_over_step']:.2f}")
    ax.axhline(1, color="gray", lw=1)
    ax.set(xlabel="accepted tokens per forward", ylabel="speed-up over cached greedy (wall clock)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def benefit_vs_size(results):
    """Benefit of n heads vs model size, on the same code bytes for every size: head 1's val loss (nats/byte; below
    0: MTP better), Brier-1 and BrierLM (above 0: MTP better) of n = 2, 4 (8) minus those of n = 1 of the same size
    and seed, against non-embedding parameters (mean ± 1 s.e. over paired seeds; one seed: no bar). The paper
    (0.3B-13B): small models lose with n > 1, the benefit grows with size."""
    rows = size_summary(results["size"])
    fig, ax = plt.subplots(1, 3, figsize=(14, 3.8))
    keys = (("d_val_loss_h1", "head-1 val loss: n minus n = 1\n(nats/byte; below 0: MTP better)"),
            ("d_brier1", "Brier-1 of head 1: n minus n = 1\n(above 0: MTP better)"),
            ("d_brierlm", "BrierLM of head 1: n minus n = 1\n(above 0: MTP better)"))
    for n in sorted({r["n"] for r in rows} - {1}):
        rs = [r for r in rows if r["n"] == n]
        for a, (k, _) in zip(ax, keys):
            errorbar(a, rs, "params", k, marker="o", label=f"n = {n} ({seeds(rs)})")
    for a, (_, label) in zip(ax, keys):
        a.axhline(0, color="gray", ls=":")
        a.set(xscale="log", xlabel="non-embedding parameters", ylabel=label)
    ax[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def induction_vs_size(results):
    """Induction vs model size: head 1's accuracy on the second token of a recurring name (chance 10%; near 1 =
    an induction head) for n = 1, 2, 4 at three widths of 4 blocks (mean ± 1 s.e. over seeds; one seed: no bar).
    The paper: n = 2 beats n = 1 for small models, and the gap closes with size."""
    rows = task_summary(results["induction"])
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for n in sorted({r["n"] for r in rows}):
        rs = [r for r in rows if r["n"] == n]
        errorbar(ax, rs, "params", "acc_val", marker="o", label=f"n = {n} ({seeds(rs)})")
    ax.axhline(0.1, color="gray", ls=":", label="chance (10 digits)")
    ax.set(xscale="log", xlabel="non-embedding parameters", ylabel="accuracy of head 1")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def polynomial(results):
    """Polynomial arithmetic in F_7[X]/(X^5): exact match of the whole answer (left) and accuracy per answer digit
    (right; chance 1/7) under greedy decoding, in distribution (1-5 operations) and out of it (6-8), for n = 1, 2,
    4 at each model size trained (mean over seeds). The paper: n = 2 and 4 beat n = 1, in and out of distribution."""
    rows = task_summary(results["polynomial"])
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.4))
    for i, (k, label) in enumerate((("val", "in distribution (m = 1..5)"), ("val_ood", "out of distribution (m = 6..8)"))):
        for a, key in zip(ax, (f"acc_{k}", f"token_acc_{k}")):
            a.bar([j + 0.4 * i for j in range(len(rows))], [r.get(key, np.nan) for r in rows], 0.4, label=label,
                  yerr=[r.get(key + "_se") or 0.0 for r in rows])
    ax[1].axhline(1 / 7, color="gray", ls=":", label="chance 1/7")
    ticks = [f"{r['n_layer']}x{r['n_embd']} n = {r['n']}" if len({(q['n_layer'], q['n_embd']) for q in rows}) > 1
             else f"n = {r['n']}" for r in rows]
    for a, title in zip(ax, ("exact match of the answer", "accuracy per answer digit")):
        a.set_xticks([j + 0.2 for j in range(len(rows))], ticks)
        a.set_title(title, fontsize=9)
        a.legend(fontsize=7)
    fig.tight_layout()
    return fig


FIGURES = {"accepted_tokens": accepted_tokens, "speedup": speedup, "benefit_vs_size": benefit_vs_size,
           "induction_vs_size": induction_vs_size, "polynomial": polynomial}
