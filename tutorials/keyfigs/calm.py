"""Key figures of tutorials/calm.ipynb, drawn from the files that `python -m bench calm run <experiment>` writes
(bench/calm_runs.py). `results` is a dict of them by part, {"curves_4x128": ..., "curves_6x192": ..., "heads": ...,
"recipe": ...}, holding the parts that exist; each is {"runs": {name: run}, "updated"} with
  run     {flags, points: [{iter, train_flops, flops_per_token, brier1..brier4, brierlm, brier1_se..brierlm_se
          (None where undefined), val_loss, train_seconds, threads}], post (after training, some runs only)}
  names   curves: "ntp <fraction of the budget>" (one point each), "calm K=<K> seed <s>" (a point per fraction);
          heads: "flow seed <s>", "diffusion seed <s>", "mse seed 0"; recipe: one name per setting
  post    curves "ntp 1" and "calm K=4 seed <s>": {temperature: {"<T>" or "<T> exact": {T, sampler, acc1, acc4,
          agree4, distinct2, acc1_se}}, samples}; heads (flow, diffusion): {steps: {"<n>": {calls, brier1.., *_se}},
          distinct2, samples}
Runs still missing (a sweep in progress) are simply not drawn: a curve with one seed has no error bar, and a figure
whose part has no file is skipped (NEEDS). The autoencoder figures of section (a) and the generation speed are
computed in the notebook and are not key figures."""
import matplotlib.pyplot as plt
import numpy as np

RESULTS = {part: f"results/calm_{part}.json" for part in ("curves_4x128", "curves_6x192", "heads", "recipe")}
NEEDS = {"performance_vs_compute": ["curves_4x128"], "ratio_to_ntp": ["curves_4x128"], "heads": ["heads"],
         "temperature": ["curves_4x128"], "recipe_sweep": ["recipe"]}  # each figure's parts; drawn when present:
USES = {"performance_vs_compute": ["curves_6x192"], "ratio_to_ntp": ["curves_6x192"], "heads": ["curves_4x128"]}
SIZES = {"curves_4x128": "4 × 128", "curves_6x192": "6 × 192"}
METRICS = ["brier1", "brier2", "brier3", "brier4", "brierlm"]  # aggregated over seeds by curves()
PLOTTED = {"brier1": "Brier-1", "brierlm": "BrierLM"}


def mean_se(values):
    """(mean, standard error over the values); se None for a single value (no error bar)."""
    v = np.asarray(values, dtype=float)
    return float(v.mean()), (float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else None)


def curves(runs):
    """{"ntp" | "calm K=<K>": [{iter, train_flops, seeds, <metric>, <metric>_se}]}: NTP's one-point runs joined into a
    curve (sorted by FLOPs); CALM's seeds averaged at every iteration any seed reached (se None below 2 seeds)."""
    out, groups = {}, {}
    ntp = sorted((r["points"][-1] for name, r in runs.items() if name.startswith("ntp") and r["points"]),
                 key=lambda p: p["train_flops"])
    if ntp:
        out["ntp"] = [dict(iter=p["iter"], train_flops=p["train_flops"], seeds=1, **{m: p[m] for m in METRICS},
                           **{m + "_se": None for m in METRICS}) for p in ntp]
    for name, r in runs.items():
        if name.startswith("calm"):
            for p in r["points"]:
                groups.setdefault(name.split(" seed")[0], {}).setdefault(p["iter"], []).append(p)
    for label in sorted(groups, key=lambda k: -int(k.split("K=")[1])):
        points = []
        for it, ps in sorted(groups[label].items()):
            p = dict(iter=it, train_flops=ps[0]["train_flops"], seeds=len(ps))
            for m in METRICS:
                p[m], p[m + "_se"] = mean_se([q[m] for q in ps])
            points.append(p)
        out[label] = points
    return out


def errorbar(ax, points, metric, **style):
    """One curve; error bars only where the points have a standard error (two seeds or more)."""
    se = [p[metric + "_se"] or 0.0 for p in points]
    ax.errorbar([p["train_flops"] for p in points], [p[metric] for p in points],
                yerr=se if any(se) else None, marker="o", capsize=3, **style)


def color_of(name):
    """One color per curve across figures: NTP black, CALM K = 4, 2, 1, 8 C1 .. C4."""
    return "k" if name.startswith("ntp") else f"C{[4, 2, 1, 8].index(int(name.split('K=')[1])) + 1}"


def label_of(name, points):
    seeds = max(p["seeds"] for p in points)
    return ("NTP" if name == "ntp" else "CALM " + name[5:]) + f" ({seeds} seed{'s' * (seeds > 1)})"


def size_parts(results):
    return [part for part in SIZES if part in results]


def performance_vs_compute(results):
    """Performance vs training compute: Brier-1 (top) and BrierLM (bottom) of NTP (solid) and CALM K = 1, 2, 4
    (dashed) against the training FLOPs spent, one column per backbone size, on the same data and windows. CALM:
    mean ± 1 s.e. over its seeds at 1/8, 1/4, 1/2 and all of the budget (no bar with one seed); NTP: one cosine run
    per budget."""
    parts = size_parts(results)
    fig, axes = plt.subplots(2, len(parts), figsize=(6 * len(parts), 7), squeeze=False)
    for col, part in enumerate(parts):
        for name, points in curves(results[part]["runs"]).items():
            for row, m in enumerate(PLOTTED):
                errorbar(axes[row, col], points, m, ls="-" if name == "ntp" else "--", color=color_of(name),
                         label=label_of(name, points))
        axes[0, col].set_title(f"backbone {SIZES[part]}")
        for row, m in enumerate(PLOTTED):
            axes[row, col].set(xscale="log", xlabel="training FLOPs", ylabel=PLOTTED[m])
            axes[row, col].grid(alpha=0.3)
        axes[0, col].legend(fontsize=8)
    fig.tight_layout()
    return fig


def ntp_at(ntp, flops):
    """NTP's Brier-1 at a FLOPs count, interpolated linearly in log FLOPs between its budgets (None outside them by
    more than 1%: CALM's iterations are rounded, so its full budget may exceed NTP's by a hair)."""
    xs, x = np.log([p["train_flops"] for p in ntp]), np.log(flops)
    inside = xs[0] - 0.01 <= x <= xs[-1] + 0.01
    return float(np.interp(x, xs, [p["brier1"] for p in ntp])) if inside else None


def ratio_to_ntp(results):
    """CALM relative to NTP at equal training FLOPs: CALM's Brier-1 divided by NTP's (NTP interpolated in log FLOPs
    between its budgets; only inside them), per K and backbone size (solid 4 × 128, dashed 6 × 192). Error bars:
    CALM's seeds only (none with one seed). Dotted: 0.8, the project's target at the larger size."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for part, style in zip(size_parts(results), ("-o", "--s")):
        cv = curves(results[part]["runs"])
        for name, points in cv.items():
            if name == "ntp" or "ntp" not in cv:
                continue
            pts = [(p, ntp_at(cv["ntp"], p["train_flops"])) for p in points]
            pts = [(p, ref) for p, ref in pts if ref]
            if pts:
                se = [(p["brier1_se"] or 0.0) / ref for p, ref in pts]
                ax.errorbar([p["train_flops"] for p, _ in pts], [p["brier1"] / ref for p, ref in pts],
                            yerr=se if any(se) else None, fmt=style, capsize=3,
                            color=color_of(name),
                            label=f"{SIZES[part]}, {label_of(name, points)[5:]}")
    ax.axhline(0.8, color="gray", ls=":", label="0.8")
    ax.axhline(1, color="k", lw=0.5)
    ax.set(xscale="log", xlabel="training FLOPs", ylabel="CALM Brier-1 / NTP Brier-1", title="CALM relative to NTP")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def heads(results):
    """The generative head at equal training (K = 4, 4 × 128): Brier-1 against network calls per sample, for flow
    matching (a midpoint step = 2 calls) and diffusion at several step counts (mean ± 1 s.e. over seeds; one seed:
    no bar), the energy head (one call; the CALM K = 4 runs of the curves at the same iteration) and the
    deterministic MSE head (regression, one call)."""
    runs = results["heads"]["runs"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for kind, color in (("flow", "C0"), ("diffusion", "C3")):
        done = [r for name, r in runs.items() if name.startswith(kind) and "post" in r]
        if not done:
            continue
        steps = sorted(set.intersection(*(set(r["post"]["steps"]) for r in done)), key=int)
        stats = [mean_se([r["post"]["steps"][s]["brier1"] for r in done]) for s in steps]
        se = [e or 0.0 for _, e in stats]
        ax.errorbar([done[0]["post"]["steps"][s]["calls"] for s in steps], [m for m, _ in stats],
                    yerr=se if any(se) else None, marker="o", capsize=3, color=color,
                    label=f"{kind} ({len(done)} seed{'s' * (len(done) > 1)})")
    last = max((r["points"][-1]["iter"] for r in runs.values() if r["points"]), default=None)
    energy = curves(results["curves_4x128"]["runs"]).get("calm K=4", []) if "curves_4x128" in results else []
    energy = [p for p in energy if p["iter"] == last]
    if energy:
        e = energy[0]
        ax.errorbar([1], [e["brier1"]], yerr=[e["brier1_se"]] if e["brier1_se"] else None, marker="*", ms=14,
                    color="C2", capsize=3, label=f"energy ({e['seeds']} seed{'s' * (e['seeds'] > 1)})")
    mse = [r["points"][-1] for name, r in runs.items() if name.startswith("mse") and r["points"]]
    if mse:
        ax.plot([1] * len(mse), [p["brier1"] for p in mse], "kx", ms=10, label="MSE (regression)")
    ax.set(xscale="log", xlabel="network calls per sample", ylabel="Brier-1 (higher is better)",
           title="generative heads at equal training (K = 4, 4 × 128)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def temperature(results):
    """Likelihood-free temperature: quality against diversity as T goes from 1 down to 0.25 (4 × 128, the full
    budget). Left: accuracy of the first sampled byte against distinct 2-grams of 32-byte continuations; right:
    accuracy of the first 4 bytes (CALM K = 4's first chunk) against 1 − P(two 4-byte samples agree). NTP:
    softmax(logits / T); CALM K = 4 (mean over its seeds): the batch sampler at every T, the exact one (diamonds) at
    T = 0.8 and 0.5."""
    runs = results["curves_4x128"]["runs"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    groups = (("NTP", [r for n, r in runs.items() if n == "ntp 1" and "post" in r], "-o", "k"),
              ("CALM K=4", [r for n, r in runs.items() if n.startswith("calm K=4 ") and "post" in r], "--s", "C1"))
    for label, done, style, color in groups:
        for sampler, marker in (("batch", style), ("exact", "D")):
            keys = [k for k, v in done[0]["post"]["temperature"].items() if v["sampler"] == sampler] if done else []
            keys = [k for k in keys if all(k in r["post"]["temperature"] for r in done)]
            if not keys:
                continue
            get = {m: [float(np.mean([r["post"]["temperature"][k][m] for r in done])) for k in keys]
                   for m in ("acc1", "acc4", "agree4", "distinct2")}
            name = f"{label} ({sampler}, {len(done)} seed{'s' * (len(done) > 1)})" if label != "NTP" else label
            axes[0].plot(get["distinct2"], get["acc1"], marker, color=color, label=name)
            axes[1].plot([1 - a for a in get["agree4"]], get["acc4"], marker, color=color, label=name)
            for k, x, y in zip(keys, get["distinct2"], get["acc1"]):
                axes[0].annotate(f"T={done[0]['post']['temperature'][k]['T']:g}", (x, y), fontsize=7)
    axes[0].set(xlabel="diversity: distinct 2-grams / all 2-grams", ylabel="accuracy of the first sampled byte")
    axes[1].set(xlabel="diversity: 1 − P(two 4-byte samples agree)", ylabel="accuracy of the first 4 bytes")
    for a in axes:
        a.legend(fontsize=7)
        a.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def recipe_sweep(results):
    """The recipe sweep (4 × 128, K = 4): Brier-1 (± 1 s.e. over the 2,048 scored positions) of each setting at half
    (open) and all (filled) of a 7e12 training-FLOPs budget. Each CALM row changes one thing from the base (head 64
    wide, 2 blocks, N = 8 samples, learning rate 1e-3 constant); NTP's learning rate beside it (gray)."""
    runs = sorted(((name, r["points"]) for name, r in results["recipe"]["runs"].items() if r["points"]),
                  key=lambda run: run[0].startswith("ntp"))  # CALM first, NTP below
    fig, ax = plt.subplots(figsize=(7.5, 0.35 * len(runs) + 1.5))
    for y, (name, points) in enumerate(runs):
        color = "gray" if name.startswith("ntp") else "C1"
        for p, fill in ((points[0], "none"), (points[-1], color)):
            ax.errorbar([p["brier1"]], [y], xerr=[p["brier1_se"] or 0.0], fmt="o", mfc=fill, color=color, capsize=2)
        ax.plot([points[0]["brier1"], points[-1]["brier1"]], [y, y], color=color, lw=0.8)
    ax.set_yticks(range(len(runs)), [name for name, _ in runs], fontsize=8)
    ax.invert_yaxis()
    flops = sorted({p["train_flops"] for _, ps in runs for p in (ps[0], ps[-1])})
    ax.set(xlabel=f"Brier-1 (open: {flops[0]:.2g} FLOPs, filled: {flops[-1]:.2g})", title="the recipe sweep")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return fig


FIGURES = {"performance_vs_compute": performance_vs_compute, "ratio_to_ntp": ratio_to_ntp, "heads": heads,
           "temperature": temperature, "recipe_sweep": recipe_sweep}
