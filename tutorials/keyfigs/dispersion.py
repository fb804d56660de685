"""Key figures of tutorials/dispersion.ipynb, drawn from the three files that `python -m bench dispersion
sweep|arithmetic|layers_knn` writes (bench/dispersion_experiments.py). `results` is a dict of them by part:
{"sweep": ..., "arithmetic": ..., "layers_knn": ...}, each {part, scale, hardware, rows} (the notebook passes
{"rows": ...} at smoke scale, where nothing is written). Rows:
  sweep       {"<setting>_<scope>_<lam>_<seed>": {setting, scope, lam, seed, domains: {<domain>: {ppl, disp}}}}
  arithmetic  {"<n_layer>x<n_embd>": {snapshots: [{iter, acc, gap, within, between, hidden_disp, ppl,
              label_free: {sets: [[share, within, across], ...], within: {spearman, ..}, across: {..}} or null}]}}
  layers_knn  {"layerwise": {init|trained: {spearman: {"layers.0": r, "attn.0": r, ..., "final": r}, group_ppl}},
               "knn <layer>": {knn_ppl, lm_ppl, tau, weight, disp_segments, disp_store}}
§1 of the notebook (dispersion over the checkpoints of one run) is computed in the notebook and is not a key figure."""
import matplotlib.pyplot as plt
import numpy as np

# per part, the first file that exists (gpu scale first); paths from the repository root
RESULTS = {part: [f"results/dispersion_{part}_gpu.json", f"results/dispersion_{part}.json"]
           for part in ("sweep", "arithmetic", "layers_knn")}


def paired_change(rows, setting, scope, domain):
    """[(lambda, mean change %, s.e. %)] of val perplexity against the lambda = 0 run of the same seed, as a
    percentage of the mean lambda = 0 perplexity, for every lambda > 0 run of this setting and loss scope."""
    base = {r["seed"]: r["domains"][domain]["ppl"] for r in rows.values() if r["setting"] == setting and r["lam"] == 0}
    ref = np.mean(list(base.values()))
    by_lam = {}
    for r in rows.values():
        if r["setting"] == setting and r["scope"] == scope and r["lam"] > 0 and r["seed"] in base:
            by_lam.setdefault(r["lam"], []).append(r["domains"][domain]["ppl"] - base[r["seed"]])
    out = []
    for lam, d in sorted(by_lam.items()):
        se = np.std(d, ddof=1) / np.sqrt(len(d)) if len(d) > 1 else 0.0
        out.append((lam, 100 * np.mean(d) / ref, 100 * se / ref))
    return out


def lambda_sweep(results):
    """The push-away loss, lambda <= 0.1: change of validation perplexity against the lambda = 0 run of the same
    seed (in % of the lambda = 0 perplexity; mean ± 1 s.e. over seeds), single-domain (Shakespeare, loss over the
    whole batch) and cross-domain (Shakespeare + Python: the cross-domain loss, and the whole-batch loss at 0.1),
    per evaluation domain. Below 0 = the loss helped."""
    rows = results["sweep"]["rows"]
    fig, ax = plt.subplots(1, 3, figsize=(14, 3.6))
    panels = [("single", "shakespeare", "single-domain: Shakespeare"), ("cross", "shakespeare", "cross-domain: Shakespeare"),
              ("cross", "pystdlib", "cross-domain: Python")]
    for a, (setting, domain, title) in zip(ax, panels):
        for scope, marker in (("batch", "o"), ("cross_domain", "s")):
            pts = [p for p in paired_change(rows, setting, scope, domain) if p[0] <= 0.1]
            if pts:
                a.errorbar([p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts], fmt=marker + "-", capsize=3,
                           label=f"loss: {scope}")
        a.axhline(0, color="gray", lw=0.8)
        a.set(xscale="log", xlabel="λ", title=title)
        a.legend(fontsize=8)
    ax[0].set_ylabel("Δ val perplexity vs λ = 0, % (paired)")
    large = [(lam, domain, change) for setting, domain in (("cross", "shakespeare"), ("cross", "pystdlib"))
             for lam, change, _ in paired_change(rows, setting, "cross_domain", domain) if lam > 0.1]
    if large:
        fig.suptitle("λ ≤ 0.1 (off the plot: " + ", ".join(f"λ = {lam:g} on {domain} {change:+.0f}%"
                                                           for lam, domain, change in large) + ")", fontsize=9)
    fig.tight_layout()
    return fig


def layerwise_correlation(results):
    """Layer-wise: Spearman correlation of group dispersion with group perplexity (groups of chunks kept uniformly
    in perplexity) at every layer and sub-layer (residual stream, attention output, FFN input, FFN output; star:
    after the final LayerNorm), for the trained model (solid) and a fresh initialisation of it (dashed). Negative =
    more dispersed groups are the better-predicted ones."""
    lw = results["layers_knn"]["rows"]["layerwise"]
    L = max(int(k.split(".")[1]) for k in lw["trained"]["spearman"] if k.startswith("layers."))
    kinds = [("layers", range(L + 1), "residual stream (0 = embeddings)"), ("attn", range(L), "attention output"),
             ("ffn_in", range(L), "FFN input (after ln_2)"), ("mlp", range(L), "FFN output")]
    fig, ax = plt.subplots(1, 4, figsize=(15, 3.4), sharey=True)
    for a, (kind, xs, title) in zip(ax, kinds):
        for label, style in (("init", "o--"), ("trained", "o-")):
            a.plot(list(xs), [lw[label]["spearman"][f"{kind}.{i}"] for i in xs], style, label=label)
        a.axhline(0, color="gray", lw=0.5)
        a.set(title=title, xlabel="layer", xticks=list(xs))
    for label, color in (("init", "C0"), ("trained", "C1")):
        ax[0].plot([L], [lw[label]["spearman"]["final"]], "*", ms=12, color=color)
    ax[0].set_ylabel("Spearman(dispersion, perplexity)")
    ax[0].legend()
    fig.tight_layout()
    return fig


def knn_key_spaces(results):
    """kNN-LM with keys from the last layer's sub-layers (attention output, FFN input = the standard key, FFN
    output, block output, final state): test perplexity (bars; dashed: the LM alone), with each key space's
    dispersion within test segments (black line, right axis)."""
    knn = {k[len("knn "):]: v for k, v in results["layers_knn"]["rows"].items() if k.startswith("knn ")}
    names, lm = list(knn), knn[next(iter(knn))]["lm_ppl"]
    fig, ax = plt.subplots(figsize=(8, 3.4))
    ax.bar(range(len(names)), [knn[n]["knn_ppl"] for n in names], color=["C1", "C2", "C3", "C0", "C4"][:len(names)])
    ax.axhline(lm, color="k", ls="--", label="LM alone")
    ax.set_ylim(min(min(r["knn_ppl"] for r in knn.values()), lm) * 0.97, lm * 1.02)
    ax.set_ylabel("kNN-LM perplexity (test)")
    ax.set_xticks(range(len(names)), names)
    ax.legend(loc="upper left")
    ax2 = ax.twinx()
    ax2.plot(range(len(names)), [knn[n]["disp_segments"] for n in names], "ko-", label="dispersion (segments)")
    ax2.set_ylabel("dispersion")
    ax2.legend(loc="upper right")
    fig.tight_layout()
    return fig


def family(results):
    """Every measured model of the arithmetic part: (size, snapshot) pairs, in the order of the file."""
    return [(size, r) for size, row in results["arithmetic"]["rows"].items() for r in row["snapshots"]]


def gap_vs_accuracy(results):
    """The dispersion gap G = within(T) + between(T, T') of the output matrix (T: digit and operator bytes, T':
    prose bytes) against exact-match arithmetic accuracy (left) and against training iterations (right), for byte
    GPTs of three sizes trained on Shakespeare + arithmetic, each at four checkpoints."""
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
    for size in results["arithmetic"]["rows"]:
        rs = [r for s, r in family(results) if s == size]
        ax[0].plot([r["gap"] for r in rs], [r["acc"] for r in rs], "o-", label=size)
        ax[1].plot([r["iter"] for r in rs], [r["gap"] for r in rs], "o-", label=size)
    ax[0].set(xlabel="dispersion gap G", ylabel="exact-match accuracy")
    ax[0].legend(fontsize=8)
    ax[1].set(xlabel="iteration", ylabel="G", xscale="log")
    fig.tight_layout()
    return fig


def label_free_accuracy(results):
    """Predicting accuracy without labels: sets of arithmetic questions whose share answered correctly goes from
    0 to 1, against the set's dispersion (dots; red: mean per share), within each question's token states (left)
    and across the questions' final states (right), for the model whose accuracy is closest to 50%."""
    models = [(s, r) for s, r in family(results) if r["label_free"]]
    if not models:
        raise ValueError("no model of the arithmetic part has label-free sets (too few right or wrong answers)")
    size, shown = min(models, key=lambda m: abs(m[1]["acc"] - 0.5))
    sets = shown["label_free"]["sets"]
    shares = sorted({s[0] for s in sets})
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.6))
    for a, (i, what) in zip(ax, ((1, "within"), (2, "across"))):
        a.scatter([s[0] for s in sets], [s[i] for s in sets], s=8, alpha=0.5)
        a.plot(shares, [np.mean([s[i] for s in sets if s[0] == p]) for p in shares], "r-")
        a.set(xlabel="share of the set answered correctly", ylabel=f"dispersion ({what})",
              title=f"{size} @ {shown['iter']} (accuracy {shown['acc']:.2f}): Spearman "
                    f"{shown['label_free'][what]['spearman']:+.2f}")
    fig.tight_layout()
    return fig


FIGURES = {"layerwise_correlation": layerwise_correlation, "lambda_sweep": lambda_sweep,
           "knn_key_spaces": knn_key_spaces, "gap_vs_accuracy": gap_vs_accuracy,
           "label_free_accuracy": label_free_accuracy}
