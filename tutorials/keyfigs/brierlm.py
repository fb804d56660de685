"""Key figures of tutorials/brierlm.ipynb, drawn from its results (results/brierlm_<scale>.json at cpu/gpu scale).
Schema of `results` (written by the notebook): meta; estimator [{dist, V, y, exact, mean, se}]; checkpoints
[{size: [L, H, D], iters, val_loss, brierlm, brierlm_se, brierlm_vr, brierlm_vr_se, exact_brier1}]; spread [{N,
groups, sampled: {spread, delta, zero_share}, reduced: {...}}]; temperature [{T, sample_acc, brier1, cross_entropy}].
Standard errors that are undefined are null."""
import matplotlib.pyplot as plt

RESULTS = ["results/brierlm_gpu.json", "results/brierlm_cpu.json"]


def label(size):
    return f"L{size[0]} d{size[2]}"


def zero_if_none(values):
    return [0.0 if v is None else v for v in values]


def estimator_check(results):
    """The two-sample estimator is unbiased: its mean over many draws against the exact Brier score
    2 P(y) - sum P^2 (left), and their difference with ± 2 standard errors (right), for categorical distributions
    with known probabilities (flat or peaked, the observed y the mode or a rare outcome). Every difference is
    within its error bar of 0."""
    rows = results["estimator"]
    fig, ax = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw=dict(width_ratios=[1, 1.4]))
    lo, hi = min(r["exact"] for r in rows) - 0.1, max(r["exact"] for r in rows) + 0.1
    ax[0].plot([lo, hi], [lo, hi], color="gray", ls=":", label="estimate = exact")
    ax[0].scatter([r["exact"] for r in rows], [r["mean"] for r in rows], color="C0", zorder=3)
    ax[0].set(xlabel="exact Brier(P, y)", ylabel="mean two-sample estimate", title="estimate vs exact")
    ax[0].legend(fontsize=8)
    names = [f"{r['dist']}, V={r['V']}" for r in rows]
    ax[1].errorbar(range(len(rows)), [r["mean"] - r["exact"] for r in rows], yerr=[2 * r["se"] for r in rows],
                   marker="o", capsize=4, ls="none")
    ax[1].axhline(0, color="gray", ls=":")
    ax[1].set_xticks(range(len(rows)), names, rotation=35, ha="right", fontsize=8)
    ax[1].set(ylabel="estimate - exact (± 2 s.e.)", title="the difference is noise")
    fig.tight_layout()
    return fig


def brierlm_vs_ce(results):
    """BrierLM tracks cross-entropy: every checkpoint of small next-token Transformers of several sizes, BrierLM
    (left; lines: the lower-variance estimator with 1 s.e., crosses: samples only) and the exact Brier-1 (right)
    against the validation cross-entropy. Lower cross-entropy, higher BrierLM: the ranking agrees."""
    rows = results["checkpoints"]
    sizes = sorted({tuple(r["size"]) for r in rows}, key=lambda s: s[2] * s[0])
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for size in sizes:
        k = [r for r in rows if tuple(r["size"]) == size]
        ce = [r["val_loss"] for r in k]
        ax[0].errorbar(ce, [r["brierlm_vr"] for r in k], yerr=zero_if_none([r["brierlm_vr_se"] for r in k]),
                       marker="o", capsize=2, label=f"{label(size)} (variance-reduced)")
        ax[0].scatter(ce, [r["brierlm"] for r in k], marker="x", color="k", zorder=3)
        ax[1].plot(ce, [r["exact_brier1"] for r in k], "o-", label=label(size))
    ax[0].scatter([], [], marker="x", color="k", label="two-sample (samples only)")
    ax[0].axhline(0, color="gray", ls=":", label="no skill (BrierLM 0)")
    uniform = 1 / 256 if all(r.get("vocab", 256) == 256 for r in rows) else None  # byte models: 2/V - V/V^2
    if uniform is not None:
        ax[1].axhline(uniform, color="gray", ls=":", label="no skill: uniform bytes (1/256)")
    ours = results.get("correlations", {}).get("brierlm_vr", {}).get("spearman")
    note = "paper (CALM): Spearman ≈ −0.99, Pearson ≈ −0.96" + (f"\nours: Spearman {ours:+.3f}" if ours is not None else "")
    ax[0].text(0.98, 0.97, note, transform=ax[0].transAxes, ha="right", va="top", fontsize=8,
               bbox=dict(facecolor="white", alpha=0.8, edgecolor="none"))
    ax[0].set(xlabel="val cross-entropy (nats/token)", ylabel="BrierLM", title="BrierLM vs cross-entropy")
    ax[1].set(xlabel="val cross-entropy (nats/token)", ylabel="exact Brier-1", title="Brier-1 vs cross-entropy")
    ax[0].legend(fontsize=8)
    ax[1].legend(fontsize=8)
    fig.tight_layout()
    return fig


def stderr_vs_positions(results):
    """How many positions make BrierLM stable: the standard deviation of BrierLM over disjoint groups of N
    positions (dots) and the delta-method standard error (lines), for the two-sample and the lower-variance
    estimator, against N; the dotted line is 0.1 BrierLM."""
    rows = results["spread"]
    Ns = [r["N"] for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for key, name, color in (("sampled", "two-sample", "C0"), ("reduced", "variance-reduced", "C1")):
        ax.loglog(Ns, [r[key]["spread"] for r in rows], "o", color=color, label=f"{name}: spread over groups")
        ax.loglog(Ns, [r[key]["delta"] for r in rows], "-", color=color, label=f"{name}: delta method")
    ax.axhline(0.1, color="gray", ls=":", label="0.1")
    ax.text(0.02, 0.03, "paper: every WikiText-103 test position (~2.5e5)", transform=ax.transAxes, fontsize=7)
    ax.set_xticks(Ns, [str(n) for n in Ns])
    ax.xaxis.set_minor_locator(plt.NullLocator())
    ax.set(xlabel="positions N", ylabel="std of BrierLM", title="BrierLM standard error vs positions")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def accuracy_not_proper(results):
    """Accuracy is not a proper score: sharpening a trained model's distribution (temperature T < 1) raises the
    accuracy of a sample, P_T(y), but lowers the Brier-1 score, which is best near the model's own T = 1.
    Exact values from the model's probabilities."""
    rows = sorted(results["temperature"], key=lambda r: r["T"])
    T = [r["T"] for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot(T, [r["sample_acc"] for r in rows], "o-", label="sample accuracy  E 1{x=y}")
    ax.plot(T, [r["brier1"] for r in rows], "s-", label="Brier-1 (proper)")
    ax.axvline(1.0, color="gray", ls=":", label="the model's own distribution (T = 1)")
    ax.text(0.98, 0.5, "paper: accuracy rewards collapsing\nonto the mode; Brier is proper", transform=ax.transAxes,
            ha="right", fontsize=7)
    ax.set(xlabel="temperature T", ylabel="score (higher is better)", title="sharpening helps accuracy, not Brier")
    ax.legend()
    fig.tight_layout()
    return fig


FIGURES = {"estimator_check": estimator_check, "brierlm_vs_ce": brierlm_vs_ce,
           "stderr_vs_positions": stderr_vs_positions, "accuracy_not_proper": accuracy_not_proper}
