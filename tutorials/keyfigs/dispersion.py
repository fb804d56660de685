"""Key figures of tutorials/dispersion.ipynb, drawn from the three files that `python -m bench dispersion
sweep|gap|knn` writes (bench/dispersion_experiments.py). `results` is a dict of them by part: {"sweep": ..., "gap":
..., "knn": ...}, each in bench/records.py's format {experiment, module, description, runs: {run_id: {config,
metrics, provenance}}} (the notebook's live versions have the same shape). Runs:
  sweep  config {setting, scope, lam, seed, ..}, metrics {domains: {<domain>: {ppl, disp}}}
  gap    config {n_layer, n_embd, share, seed, iters, ..}, metrics {params_non_embedding, snapshots: [{iter, acc,
         gap, within, between, hidden_disp, ppl, label_free: {sets: [[share, within, across], ..], within: {..},
         across: {..}} or null}]}
  knn    config {seed, n_layer, ..}, metrics {layers: {<layer>: {knn_ppl, lm_ppl, disp_segments, ..}},
         most_dispersed, best, layerwise: {init|trained: {spearman: {"layers.0": r, .., "final": r}, group_ppl}}}"""
import matplotlib.pyplot as plt
import numpy as np

RESULTS = {part: [f"results/dispersion_{part}_gpu.json", f"results/dispersion_{part}.json"]
           for part in ("sweep", "gap", "knn")}
NEEDS = {"layerwise_correlation": ["knn"], "lambda_sweep": ["sweep"], "knn_layer_choice": ["knn"],
         "gap_model_selection": ["gap"], "label_free_accuracy": ["gap"]}
KIND_NAMES = {"layers": "block {} output", "attn": "attention {}", "ffn_in": "FFN input {}", "mlp": "FFN output {}"}
PREDICTOR_NAMES = {"gap": "G (no labels)", "within": "within(T)", "between": "between(T, T')",
                   "hidden_disp": "state dispersion", "iter": "iteration", "params": "parameters",
                   "share": "arithmetic share", "neg_ppl": "−perplexity\n(uses answers)"}


def runs(report):
    """{run_id: config and metrics in one dict}."""
    return {k: dict(r.get("config", {}), **r.get("metrics", {})) for k, r in report["runs"].items()}


def layer_label(name):
    """'attn.3' -> 'attention 4' (blocks counted from 1), 'layers.0' -> 'embeddings', 'final' -> 'final (after LN)'."""
    if name == "final":
        return "final (after LN)"
    kind, _, i = name.partition(".")
    if kind == "layers":
        return "embeddings" if i == "0" else f"block {i} output"
    return KIND_NAMES[kind].format(int(i) + 1)


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
    """The push-away loss, λ ≤ 0.1: change of validation perplexity against the λ = 0 run of the same seed (in % of
    the λ = 0 perplexity; mean ± 1 s.e. over seeds), single-domain (Shakespeare, loss over the whole batch) and
    cross-domain (Shakespeare + Python: the cross-domain loss, and the whole-batch loss at 0.1), per evaluation
    domain. Gray: 0, no effect (λ = 0); red: the paper's change (GPT-2 small: −0.4% single-domain at λ = 0.1, −16%
    cross-domain at λ = 0.01)."""
    rows = runs(results["sweep"])
    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    panels = [("single", "shakespeare", "single-domain: Shakespeare", (0.1, -0.4)),
              ("cross", "shakespeare", "cross-domain: Shakespeare", (0.01, -16.2)),
              ("cross", "pystdlib", "cross-domain: Python", (0.01, -16.2))]
    for a, (setting, domain, title, paper) in zip(ax, panels):
        for scope, marker, label in (("batch", "o", "whole-batch loss"), ("cross_domain", "s", "cross-domain loss")):
            pts = [p for p in paired_change(rows, setting, scope, domain) if p[0] <= 0.1]
            if pts:
                a.errorbar([p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts], fmt=marker + "-", capsize=3,
                           label=label)
        a.axhline(0, color="gray", lw=1, label="no effect (λ = 0)")
        a.plot([paper[0]], [paper[1]], "r*", ms=12, label=f"paper (GPT-2 small): {paper[1]:+g}%")
        a.set(xscale="log", xlabel="λ", title=title)
        a.legend(fontsize=8)
    ax[0].set_ylabel("Δ val perplexity vs λ = 0, % (paired)")
    large = [(lam, domain, change) for setting, domain in (("cross", "shakespeare"), ("cross", "pystdlib"))
             for lam, change, _ in paired_change(rows, setting, "cross_domain", domain) if lam > 0.1]
    if large:
        fig.suptitle("off the plot: " + ", ".join(f"λ = {lam:g} on {domain} {change:+.0f}%"
                                                  for lam, domain, change in large), fontsize=9)
    fig.tight_layout()
    return fig


def layerwise_correlation(results):
    """Layer-wise: Spearman correlation of group dispersion with group perplexity (groups of training chunks kept
    uniformly in perplexity) at every layer and sub-layer (residual stream, attention output, FFN input, FFN output;
    star: after the final LayerNorm), trained (solid) and at initialisation (dashed), one line per model (seed).
    Gray: 0, no relation. The paper: weak in early layers, strongly negative in deep ones, absent at
    initialisation."""
    models = list(runs(results["knn"]).items())
    L = max(int(k.split(".")[1]) for k in models[0][1]["layerwise"]["trained"]["spearman"] if k.startswith("layers."))
    kinds = [("layers", range(L + 1), "residual stream (0 = embeddings)"), ("attn", range(L), "attention output"),
             ("ffn_in", range(L), "FFN input (after its LN)"), ("mlp", range(L), "FFN output")]
    fig, ax = plt.subplots(1, 4, figsize=(15, 3.8), sharey=True)
    for m, (name, r) in enumerate(models):
        lw = r["layerwise"]
        for a, (kind, xs, title) in zip(ax, kinds):
            for label, style, color in (("init", "o--", "C0"), ("trained", "o-", "C1")):
                a.plot([i + (kind != "layers") for i in xs], [lw[label]["spearman"][f"{kind}.{i}"] for i in xs], style,
                       color=color, alpha=1 - 0.35 * m, label=f"{label}, seed {r['seed']}")
            a.axhline(0, color="gray", lw=0.8)
            a.set(title=title, xlabel="block", xticks=[i + (kind != "layers") for i in xs])
        for label, color in (("init", "C0"), ("trained", "C1")):
            ax[0].plot([L], [lw[label]["spearman"]["final"]], "*", ms=12, color=color, alpha=1 - 0.35 * m)
    ax[0].set_ylabel("Spearman(dispersion, perplexity)")
    ax[0].legend(fontsize=7)
    fig.suptitle("paper: weak in early layers, strongly negative in deep ones, absent at initialisation",
                 fontsize=10)
    fig.tight_layout()
    return fig


def knn_layer_choice(results):
    """kNN-LM layer choice, one panel per model (seed): test perplexity of the kNN-LM with keys from each layer and
    sub-layer (bars), the perplexity of the LM alone (dashed: what keys that add nothing give), and each key space's
    dispersion within test segments (black, right axis). Orange: the authors' rule, the most dispersed key space;
    green: the best by search (if they differ)."""
    models = list(runs(results["knn"]).items())
    fig, axes = plt.subplots(len(models), 1, figsize=(12, 3.4 * len(models)), squeeze=False)
    for ax, (name, r) in zip(axes[:, 0], models):
        names = list(r["layers"])
        ppl = [r["layers"][n]["knn_ppl"] for n in names]
        colors = ["C1" if n == r["most_dispersed"] else "C2" if n == r["best"] else "C7" for n in names]
        ax.bar(range(len(names)), ppl, color=colors)
        lm = r["layers"][names[0]]["lm_ppl"]
        ax.axhline(lm, color="k", ls="--", label=f"LM alone ({lm:.2f})")
        ax.set_ylim(min(min(ppl), lm) * 0.97, max(max(ppl), lm) * 1.01)
        ax.set_xticks(range(len(names)), [layer_label(n) for n in names], rotation=35, ha="right", fontsize=8)
        ax.set_ylabel("kNN-LM perplexity")
        chosen, best = r["layers"][r["most_dispersed"]], r["layers"][r["best"]]
        ax.set_title(f"seed {r['seed']}: most dispersed = {layer_label(r['most_dispersed'])} ({chosen['knn_ppl']:.3f}); "
                     f"best = {layer_label(r['best'])} ({best['knn_ppl']:.3f})", fontsize=10)
        ax.legend(loc="upper left", fontsize=8)
        ax2 = ax.twinx()
        ax2.plot(range(len(names)), [r["layers"][n]["disp_segments"] for n in names], "ko-", ms=4)
        ax2.set_ylabel("dispersion (black)")
    fig.tight_layout()
    return fig


def gap_family(report, final_only=True):
    """(run, snapshot) pairs of the gap part, as dicts with the run's size, share and parameters."""
    out = []
    for run_id, r in runs(report).items():
        for snap in r["snapshots"][-1:] if final_only else r["snapshots"]:
            out.append(dict(snap, run=run_id, params=r["params_non_embedding"], share=r["share"], seed=r["seed"],
                            size=f"{r['n_layer']} × {r['n_embd']}"))
    return out


def spearman(a, b):
    """Spearman's rank correlation (average ranks for ties); None when either side is constant."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(set(a)) < 2 or len(set(b)) < 2:
        return None
    rank = lambda v: np.array([np.mean(np.nonzero(np.sort(v) == x)[0]) for x in v])  # noqa: E731
    return float(np.corrcoef(rank(a), rank(b))[0, 1])


def predictors(models):
    """{predictor: Spearman with accuracy over the models} (None when constant over them)."""
    acc = [m["acc"] for m in models]
    return {k: spearman([-m["ppl"] if k == "neg_ppl" else m[k] for m in models], acc) for k in PREDICTOR_NAMES}


def gap_model_selection(results):
    """Model selection by the dispersion gap G: byte GPTs of three sizes trained on Shakespeare with 20%, 35% or 50%
    arithmetic, all at the same iteration. Left: G against exact-match arithmetic accuracy (gray: 0, no skill).
    Right: Spearman correlation with accuracy over these models of G and of trivial predictors (dark), and over
    the same models plus their half-way checkpoints (light), where iteration becomes a predictor too. Red: the
    paper's Spearman (> 0.95 over 9 math-tuned checkpoints); gray: 0, a predictor with no information."""
    final, every = gap_family(results["gap"]), gap_family(results["gap"], final_only=False)
    fig, ax = plt.subplots(1, 2, figsize=(13, 4.2), gridspec_kw=dict(width_ratios=[1, 1.4]))
    shares, sizes = sorted({m["share"] for m in final}), sorted({m["size"] for m in final}, key=lambda s: len(s))
    for m in final:
        ax[0].scatter(m["gap"], m["acc"], color=f"C{shares.index(m['share'])}",
                      marker="os^D"[sizes.index(m["size"]) % 4], s=50)
    for i, share in enumerate(shares):
        ax[0].scatter([], [], color=f"C{i}", label=f"{share:.0%} arithmetic")
    for j, size in enumerate(sizes):
        ax[0].scatter([], [], color="gray", marker="os^D"[j % 4], label=f"{size}")
    ax[0].axhline(0, color="gray", lw=1)
    ax[0].set(xlabel="dispersion gap G (output matrix, no labels)", ylabel="exact-match arithmetic accuracy",
              title=f"{len(final)} models at iteration {final[0]['iter'] if final else '?'}")
    ax[0].title.set_fontsize(10)
    ax[0].legend(fontsize=7)
    keys = list(PREDICTOR_NAMES)
    for k, (models, alpha, label) in enumerate(((final, 1.0, "equal iterations"),
                                                (every, 0.45, "with half-way checkpoints"))):
        rho = predictors(models)
        ax[1].bar([i + 0.4 * k for i in range(len(keys))], [rho[key] if rho[key] is not None else 0 for key in keys],
                  0.4, alpha=alpha, color=["C3" if key == "gap" else "C0" for key in keys],
                  label=f"{label} ({len(models)} models)")
        for i, key in enumerate(keys):
            if rho[key] is None:
                ax[1].text(i + 0.4 * k, 0.02, "const.", rotation=90, fontsize=7, ha="center")
    ax[1].axhline(0.95, color="r", ls="--", lw=1, label="paper: G, Spearman > 0.95")
    ax[1].axhline(0, color="gray", lw=1)
    ax[1].set_xticks([i + 0.2 for i in range(len(keys))], [PREDICTOR_NAMES[k] for k in keys], rotation=30,
                     ha="right", fontsize=8)
    ax[1].set(ylabel="Spearman with accuracy", ylim=(-1.05, 1.05))
    ax[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def label_free_accuracy(results):
    """Predicting accuracy without labels: sets of arithmetic questions whose share answered correctly goes from
    0 to 1, against the set's dispersion (dots; red: mean per share), within each question's token states (left)
    and across the questions' final states (right), for the model whose accuracy is closest to 50%. Gray: the
    overall mean, what a dispersion unrelated to correctness would show at every share."""
    models = [m for m in gap_family(results["gap"], final_only=False) if m.get("label_free")]
    if not models:
        raise ValueError("no model of the gap part has label-free sets (too few right or wrong answers)")
    shown = min(models, key=lambda m: abs(m["acc"] - 0.5))
    sets = shown["label_free"]["sets"]
    shares = sorted({s[0] for s in sets})
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
    for a, (i, what) in zip(ax, ((1, "within"), (2, "across"))):
        a.scatter([s[0] for s in sets], [s[i] for s in sets], s=8, alpha=0.5)
        a.plot(shares, [np.mean([s[i] for s in sets if s[0] == p]) for p in shares], "r-")
        a.axhline(np.mean([s[i] for s in sets]), color="gray", ls=":")
        a.set(xlabel="share of the set answered correctly", ylabel=f"dispersion ({what})",
              title=f"{shown['size']}, {shown['share']:.0%} arithmetic, iteration {shown['iter']} (accuracy "
                    f"{shown['acc']:.2f}): Spearman {shown['label_free'][what]['spearman']:+.2f}")
        a.title.set_fontsize(9)
    fig.tight_layout()
    return fig


FIGURES = {"layerwise_correlation": layerwise_correlation, "lambda_sweep": lambda_sweep,
           "knn_layer_choice": knn_layer_choice, "gap_model_selection": gap_model_selection,
           "label_free_accuracy": label_free_accuracy}
