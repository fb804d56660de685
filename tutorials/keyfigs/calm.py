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
Issue 23's parts (bench/calm_runs.py, same run schema; points also carry train_loss and epochs, and the file a
"corpus" entry {dataset: {train_tokens, val_tokens, unigram_brier1, mode_accuracy}}):
  scaling_4x128      "calm K=4 seed <s>" (a point per budget), "ntp x<multiple> seed <s>" (one point, annealed to
                     it; brier1_exact, brier1_exact_se, brierlm_vr: NTP's exact Brier-1 and variance-reduced BrierLM)
  recipe_pystdlib    "calm K=4 lr=<lr> seed <s>", "ntp lr=<lr> seed <s>", each scored at 1/2 and all of 1.4e13
  head_study         "energy seed <s>", "flow seed <s>" (points at 1, 2, 4 x 1,358 iterations), "energy <change>
                     seed <s>" (one point at 1,358)
  autoencoder_noise  "<arm> seed <s>", arm regularised | no variational | plain; one point {recon_acc, recon_rel
                     {sigma: acc}, recon_abs {sigma: acc}, latent_rms, posterior_sigma_rms, tokens}
Runs still missing (a sweep in progress) are simply not drawn: a curve with one seed has no error bar, and a figure
whose part has no file is skipped (NEEDS). The generation speed is measured in the notebook and is not a key
figure. Every figure draws what a model with no skill scores (a unigram model of the corpus's bytes, or always
the most frequent byte; SHAKESPEARE for the files written before the corpus was recorded) and the paper's result
in one line of text."""
import matplotlib.pyplot as plt
import numpy as np

PARTS = ("curves_4x128", "curves_6x192", "heads", "recipe", "scaling_4x128", "recipe_pystdlib", "head_study",
         "autoencoder_noise")
RESULTS = {part: f"results/calm_{part}.json" for part in PARTS}
NEEDS = {"performance_vs_compute": ["curves_4x128"], "ratio_to_ntp": ["curves_4x128"], "heads": ["heads"],
         "temperature": ["curves_4x128"], "recipe_sweep": ["recipe"], "scaling": ["scaling_4x128"],
         "recipe_pystdlib": ["recipe_pystdlib"], "head_study": ["head_study"],
         "autoencoder_noise": ["autoencoder_noise"]}  # each figure's parts; drawn when present:
USES = {"performance_vs_compute": ["curves_6x192"], "ratio_to_ntp": ["curves_6x192"],
        "heads": ["curves_4x128", "head_study"]}
SIZES = {"curves_4x128": "4 × 128", "curves_6x192": "6 × 192"}
METRICS = ["brier1", "brier2", "brier3", "brier4", "brierlm"]  # aggregated over seeds by curves()
PLOTTED = {"brier1": "Brier-1", "brierlm": "BrierLM"}
# Tiny Shakespeare bytes (90% / 10% split), from bench.calm_experiments.unigram_baselines(load_data("shakespeare",
# "bytes")) (tests/test_calm.py checks these): the files written before issue 23 do not record their corpus
SHAKESPEARE = dict(unigram_brier1=0.0537, mode_accuracy=0.1490)
PAPER = {"headline": "paper: CALM-M (371M, K = 4) reaches BrierLM 5.72 vs Transformer-S 6.05\n"
                     "with 44% fewer training FLOPs (WikiText-103; 15B Pile tokens)",
         "heads": "paper: the energy head is at least as good as flow matching and diffusion\n"
                  "(authors: those are 'slightly below') and needs 1 call instead of 20-100",
         "autoencoder": "paper: regularised AE ≈ 99.9% with σ ≈ 0.3 noise on z; a plain AE is brittle",
         "temperature": "paper: lower T trades diversity for accuracy, like a Transformer's temperature",
         "recipe": "paper's recipe: AdamW 3e-4, constant after 2,000 warm-up steps, head as wide as the backbone"}


def baseline(results, part, key="unigram_brier1"):
    """A no-skill score of the corpus a part was trained on: recorded in its file, else Tiny Shakespeare's."""
    corpus = results.get(part, {}).get("corpus", {})
    if corpus:
        return next(iter(corpus.values()))[key]
    return SHAKESPEARE[key]


def note(ax, text, where="upper left", size=8):
    """One line (or two) of text in a corner of the axes: the paper's result, a null result."""
    x, ha = (0.02, "left") if "left" in where else (0.98, "right")
    y, va = (0.97, "top") if "upper" in where else (0.03, "bottom")
    ax.text(x, y, text, transform=ax.transAxes, ha=ha, va=va, fontsize=size,
            bbox=dict(facecolor="white", alpha=0.85, edgecolor="none"))


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
    return ("NTP" if name == "ntp" else "CALM " + name[5:].replace("=", " = ")) + f" ({seeds} seed{'s' * (seeds > 1)})"


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
        axes[0, col].set_title(f"backbone {SIZES[part]}, Tiny Shakespeare bytes")
        axes[0, col].axhline(baseline(results, part), color="gray", ls=":",
                             label=f"no skill: unigram bytes ({baseline(results, part):.3f})")
        axes[1, col].axhline(0, color="gray", ls=":", label="no skill (BrierLM 0)")
        for row, m in enumerate(PLOTTED):
            axes[row, col].set(xscale="log", xlabel="training FLOPs", ylabel=PLOTTED[m])
            axes[row, col].grid(alpha=0.3)
        axes[0, col].legend(fontsize=8, loc="lower right")
    note(axes[1, 0], PAPER["headline"])
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
    between its budgets; only inside them), per K and backbone size (solid 4 × 128, dashed 6 × 192), Tiny
    Shakespeare bytes. Error bars: CALM's seeds only (none with one seed). 1: CALM as good as NTP."""
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
    ax.axhline(1, color="k", lw=0.5, label="as good as NTP")
    for part, style in zip(size_parts(results), ("-", "--")):  # a unigram model relative to NTP's curve
        ntp = [p for p in curves(results[part]["runs"]).get("ntp", []) if p["brier1"] > 0]
        if ntp:
            ax.plot([p["train_flops"] for p in ntp], [baseline(results, part) / p["brier1"] for p in ntp], ls=style,
                    color="gray", lw=1, label=f"no skill: unigram bytes / NTP ({SIZES[part]})")
    note(ax, PAPER["headline"], "lower right", 7)
    ax.set(xscale="log", xlabel="training FLOPs", ylabel="CALM Brier-1 / NTP Brier-1", title="CALM relative to NTP")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def heads(results):
    """The generative head at equal training (K = 4, 4 × 128): Brier-1 against network calls per sample, for flow
    matching (a midpoint step = 2 calls) and diffusion at several step counts (mean ± 1 s.e. over seeds; one seed:
    no bar), the energy head (one call; the CALM K = 4 runs of the curves at the same iteration) and the
    deterministic MSE head (regression, one call); with the head study, the best single change to the energy head
    (head_study figure). Tiny Shakespeare bytes."""
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
    best = best_energy_change(results["head_study"]["runs"], last) if "head_study" in results else None
    if best is not None:
        label, m, se, n = best
        ax.errorbar([1.3], [m], yerr=[se] if se else None, marker="P", ms=10, color="C2", capsize=3, ls="none",
                    label=f"energy, best single change: {label} ({n} seeds)")
    ax.axhline(baseline(results, "heads"), color="gray", ls=":",
               label=f"no skill: unigram bytes ({baseline(results, 'heads'):.3f})")
    note(ax, PAPER["heads"], "lower right", 7)
    ax.set(xscale="log", xlabel="network calls per sample", ylabel="Brier-1 (higher is better)",
           title="generative heads at equal training (K = 4, 4 × 128, Tiny Shakespeare)")
    ax.legend(fontsize=7, loc="center right")
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
    mode = baseline(results, "curves_4x128", "mode_accuracy")
    axes[0].axhline(mode, color="gray", ls=":", label=f"no skill: always the most frequent byte ({mode:.3f})")
    note(axes[0], PAPER["temperature"], "lower right", 7)
    axes[0].set(xlabel="diversity: distinct 2-grams / all 2-grams", ylabel="accuracy of the first sampled byte")
    axes[1].set(xlabel="diversity: 1 − P(two 4-byte samples agree)", ylabel="accuracy of the first 4 bytes")
    for a in axes:
        a.legend(fontsize=7)
        a.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def readable(name):
    """A run's name as a label for slides: 'calm K=4 head lr x3 cos' -> 'CALM, head's learning rate ×3, cosine'."""
    words = [("calm K=4", "CALM"), ("ntp", "NTP"), (" head lr x", ", head's learning rate ×"),
             (" head w=", ", head width "), (" H=", ", head blocks "), (" N=", ", samples N = "),
             (" lr=", ", learning rate "), (" const", ", constant"), (" cos", ", cosine"),
             (" latent ", ", latent size "), (" seed ", ", seed ")]
    for old, new in words:
        name = name.replace(old, new)
    return name


def sweep_rows(runs):
    """{label: [points of each seed]}, the seeds of a setting together ('... seed <s>' names)."""
    rows = {}
    for name, r in runs.items():
        if r["points"]:
            rows.setdefault(readable(name.split(" seed ")[0]), []).append(r["points"])
    return dict(sorted(rows.items(), key=lambda row: row[0].startswith("NTP")))  # CALM first, NTP below


def sweep_figure(runs, title, unigram):
    """Brier-1 of each setting at half (open) and all (filled) of its budget, mean ± 1 s.e. (over seeds with 2 or
    more, else over the scored positions)."""
    rows = sweep_rows(runs)
    fig, ax = plt.subplots(figsize=(8, 0.38 * len(rows) + 1.8))
    for y, (label, seeds) in enumerate(rows.items()):
        color = "gray" if label.startswith("NTP") else "C1"
        ends = []
        for i, fill in ((0, "none"), (-1, color)):
            values = [points[i]["brier1"] for points in seeds]
            m, se = mean_se(values)
            se = se if se is not None else seeds[0][i]["brier1_se"]
            ax.errorbar([m], [y], xerr=[se or 0.0], fmt="o", mfc=fill, color=color, capsize=2)
            ends.append(m)
        ax.plot(ends, [y, y], color=color, lw=0.8)
        ax.text(max(ends) + 0.01, y, f"{len(seeds)} seed{'s' * (len(seeds) > 1)}", va="center", fontsize=7)
    ax.axvline(unigram, color="gray", ls=":", label=f"no skill: unigram bytes ({unigram:.3f})")
    ax.set_yticks(range(len(rows)), list(rows), fontsize=8)
    ax.invert_yaxis()
    flops = sorted({p["train_flops"] for seeds in rows.values() for pts in seeds for p in (pts[0], pts[-1])})
    ax.set(xlabel=f"Brier-1 (open: {flops[0]:.2g} FLOPs, filled: {flops[-1]:.2g})", title=title)
    ax.legend(fontsize=7, loc="lower right")
    ax.text(0.0, -0.6 / (0.38 * len(rows) + 1.8), PAPER["recipe"], transform=ax.transAxes, fontsize=7, va="top")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return fig


def recipe_sweep(results):
    """The recipe sweep (4 × 128, K = 4, Tiny Shakespeare bytes): Brier-1 (± 1 s.e. over the 2,048 scored positions)
    of each setting at half (open) and all (filled) of a 7e12 training-FLOPs budget. Each CALM row changes one
    thing from the base (head 64 wide, 2 blocks, N = 8 samples, learning rate 1e-3 constant); NTP's learning rate
    beside it (gray)."""
    return sweep_figure(results["recipe"]["runs"], "the recipe sweep (Tiny Shakespeare)",
                        baseline(results, "recipe"))


def recipe_pystdlib(results):
    """Is the recipe right for code? CALM K = 4 at three learning rates (constant, the head's ×3) and NTP at two
    (cosine), 4 × 128 on Python source (pystdlib bytes), at half (open) and all (filled) of 1.4e13 training FLOPs;
    mean ± 1 s.e. over seeds where there are two."""
    return sweep_figure(results["recipe_pystdlib"]["runs"], "the recipe on Python source (pystdlib bytes)",
                        baseline(results, "recipe_pystdlib"))


# ----------------------------------------------------------------------------- issue 23: the headline at scale

def budget_of(name):
    """'ntp x0.125 seed 1' -> 0.125."""
    return float(name.split(" x")[1].split()[0])


def scaling_rows(runs):
    """One row per budget of the scaling experiment: {budget, flops, ntp: [(seed, point)], calm: [(seed, point)],
    ratio, ratio_se, ratio_seeds, ...}. CALM's point of a budget is the one within 1% of NTP's FLOPs. The ratio is
    CALM's Brier-1 over NTP's exact Brier-1 seed by seed (paired: same seed, same positions), averaged; its
    standard error is the larger of the spread over seeds and the scored positions' (delta method), so two
    seeds that agree by chance do not shrink it below what the positions allow."""
    ntp, calm_runs = {}, {}
    for name, r in runs.items():
        seed = int(name.split(" seed ")[1])
        if name.startswith("ntp") and r["points"]:
            ntp.setdefault(budget_of(name), []).append((seed, r["points"][-1]))
        elif name.startswith("calm"):
            calm_runs[seed] = r["points"]
    rows = []
    for b in sorted(ntp):
        flops = ntp[b][0][1]["train_flops"]
        calm = [(s, p) for s, pts in calm_runs.items() for p in pts if abs(p["train_flops"] / flops - 1) < 0.01]
        row = dict(budget=b, flops=flops, ntp=sorted(ntp[b], key=lambda sp: sp[0]), calm=sorted(calm, key=lambda sp: sp[0]))
        for side in ("ntp", "calm"):
            key = "brier1_exact" if side == "ntp" else "brier1"
            row[side + "_brier1"] = mean_se([p.get(key, p["brier1"]) for _, p in row[side]])
            row[side + "_brierlm"] = mean_se([p.get("brierlm_vr", p["brierlm"]) if side == "ntp" else p["brierlm"]
                                              for _, p in row[side]])
            row[side + "_epochs"] = float(np.mean([p["epochs"] for _, p in row[side]])) if all(
                "epochs" in p for _, p in row[side]) else None
        pairs = [(dict(row["calm"])[s], p) for s, p in row["ntp"] if s in dict(row["calm"]) and
                 p.get("brier1_exact", p["brier1"]) > 0 and dict(row["calm"])[s]["brier1"] != 0]
        if pairs:
            ratios = [c["brier1"] / n.get("brier1_exact", n["brier1"]) for c, n in pairs]
            positions = [r * np.hypot(c["brier1_se"] / c["brier1"], n.get("brier1_exact_se", n["brier1_se"]) /
                                      n.get("brier1_exact", n["brier1"])) for r, (c, n) in zip(ratios, pairs)]
            m, se_seeds = mean_se(ratios)
            se_positions = float(np.sqrt(np.mean(np.square(positions)) / len(pairs)))
            row.update(ratio=m, ratio_se=max(se_seeds or 0.0, se_positions), ratio_seeds=len(pairs))
        rows.append(row)
    return rows


def headline(rows):
    """The headline in the paper's terms, from the scaling rows: 'equivalent' (at CALM's largest budget, the
    FLOPs NTP needs for the same Brier-1, interpolated in log FLOPs along NTP's budgets; None when CALM is below
    NTP's smallest budget), and 'crossing' (where a straight line in log FLOPs through the ratio's last four
    budgets reaches 1: an extrapolation; None unless the ratio is rising)."""
    done = [r for r in rows if r["calm"] and r["ntp"]]
    out = dict(equivalent=None, crossing=None, slope=None, fit=None)
    if not done:
        return out
    last = done[-1]
    ntp_x = np.log10([r["flops"] for r in rows])
    ntp_y = [r["ntp_brier1"][0] for r in rows]
    target = last["calm_brier1"][0]
    if min(ntp_y) <= target <= max(ntp_y) and all(b >= a for a, b in zip(ntp_y, ntp_y[1:])):
        out["equivalent"] = dict(calm_flops=last["flops"], ntp_flops=float(10 ** np.interp(target, ntp_y, ntp_x)),
                                 brier1=target)
    pts = [r for r in done if "ratio" in r][-4:]
    if len(pts) >= 3:
        x, y = np.log10([r["flops"] for r in pts]), [r["ratio"] for r in pts]
        slope, icpt = np.polyfit(x, y, 1)
        out["slope"], out["fit"] = float(slope), (float(slope), float(icpt), float(10 ** x[0]))  # per decade
        if slope > 0:
            out["crossing"] = float(10 ** ((1 - icpt) / slope))
    return out


def scaling(results):
    """CALM K = 4 against NTP on Python source (pystdlib bytes), 4 × 128, budgets 1/8 to 8 × 1.4e13 training FLOPs
    (bench.train_flops_per_token; NTP annealed to each budget, CALM at constant rate scored along one run per seed).
    Top left: Brier-1 (NTP exact, CALM from samples; mean ± 1 s.e. over seeds). Top right: CALM / NTP paired by
    seed, with the straight line in log FLOPs that extrapolates it (dotted). Bottom left: BrierLM. Bottom right:
    epochs of the training split each model has seen."""
    rows = scaling_rows(results["scaling_4x128"]["runs"])
    unigram = baseline(results, "scaling_4x128")
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for side, color, style, label in (("ntp", "k", "-o", "NTP (exact Brier-1)"), ("calm", "C1", "--s", "CALM K = 4")):
        got = [r for r in rows if r[side]]
        if not got:
            continue
        seeds = max(len(r[side]) for r in got)
        for ax, key in ((axes[0, 0], "_brier1"), (axes[1, 0], "_brierlm")):
            ms = [r[side + key] for r in got]
            se = [e or 0.0 for _, e in ms]
            ax.errorbar([r["flops"] for r in got], [m for m, _ in ms], yerr=se if any(se) else None, fmt=style,
                        color=color, capsize=3, label=f"{label} ({seeds} seed{'s' * (seeds > 1)})")
        if all(r[side + "_epochs"] is not None for r in got):
            axes[1, 1].plot([r["flops"] for r in got], [r[side + "_epochs"] for r in got], style, color=color,
                            label=label.split(" (")[0])
    axes[0, 0].axhline(unigram, color="gray", ls=":", label=f"no skill: unigram bytes ({unigram:.3f})")
    axes[1, 0].axhline(0, color="gray", ls=":", label="no skill (BrierLM 0)")
    paired = [r for r in rows if "ratio" in r]
    ax = axes[0, 1]
    if paired:
        ax.errorbar([r["flops"] for r in paired], [r["ratio"] for r in paired], yerr=[r["ratio_se"] for r in paired],
                    fmt="-o", color="C1", capsize=3, label=f"CALM / NTP ({max(r['ratio_seeds'] for r in paired)} "
                    f"seed pairs)")
        ax.plot([r["flops"] for r in paired], [unigram / r["ntp_brier1"][0] for r in paired], color="gray", ls=":",
                label="no skill: unigram / NTP")  # (paired rows have NTP above 0)
    h = headline(rows)
    ax.axhline(1, color="k", lw=0.5, label="as good as NTP")
    if h["fit"] is not None:
        slope, icpt, x0 = h["fit"]
        x1 = h["crossing"] if h["crossing"] and h["crossing"] < 1e3 * x0 else paired[-1]["flops"] * 8
        xs = np.logspace(np.log10(x0), np.log10(x1), 20)
        ax.plot(xs, slope * np.log10(xs) + icpt, ":", color="C1",
                label=f"extrapolation: {h['slope']:+.2f} per decade" +
                (f", reaches 1 at {h['crossing']:.1g} FLOPs" if h["crossing"] else ", never reaches 1"))
    done = [r for r in rows if r["calm"] and r["ntp"]]
    if h["equivalent"]:
        e = h["equivalent"]
        ours = (f"ours: CALM at {e['calm_flops']:.2g} FLOPs = NTP at {e['ntp_flops']:.2g} "
                f"(CALM needs {e['calm_flops'] / e['ntp_flops']:.0f}× NTP's compute)")
    elif done and done[-1]["calm_brier1"][0] < rows[0]["ntp_brier1"][0]:
        ours = (f"ours: CALM at {done[-1]['flops']:.2g} FLOPs is below NTP at our smallest budget, {rows[0]['flops']:.2g}"
                f"\n(CALM needs more than {done[-1]['flops'] / rows[0]['flops']:.0f}× NTP's compute)")
    else:
        ours = "ours: no CALM point to compare yet" if not done else "ours: CALM above NTP at every budget"
    note(axes[0, 0], PAPER["headline"] + "\n" + ours, "upper left", 7)
    axes[1, 1].axhline(1, color="gray", ls=":", label="one pass over the training split")
    corpus = ", ".join(results["scaling_4x128"].get("corpus", {"pystdlib": None}))
    axes[0, 0].set(ylabel="Brier-1", title=f"Brier-1 vs training compute ({corpus} bytes, 4 × 128)")
    ax.set(ylabel="CALM Brier-1 / NTP Brier-1", title="CALM relative to NTP, paired by seed")
    axes[1, 0].set(ylabel="BrierLM (NTP: variance-reduced)", title="BrierLM")
    axes[1, 1].set(ylabel="epochs seen", yscale="log", title="passes over the training data")
    for a in axes.flat:
        a.set(xscale="log", xlabel="training FLOPs")
        a.grid(alpha=0.3)
        a.legend(fontsize=7, loc="lower right")
    axes[0, 0].set_ylim(0, 1.3 * axes[0, 0].get_ylim()[1])  # room above the curves for the paper's line
    ax.set_ylim(0, 1.3)  # room above "as good as NTP" for the legend, away from the curves
    ax.legend(fontsize=7, loc="upper center", ncol=2)
    fig.tight_layout()
    return fig


CHANGES = {"N=16": "N = 16 samples", "M=100": "M = 100 target samples", "head width 128": "head as wide as the backbone",
           "4 head blocks": "4 head blocks", "head lr x10": "head's learning rate ×10",
           "head lr x1": "head's learning rate ×1"}  # head_study's changes, for slides


def study_groups(runs, at):
    """{label: [Brier-1 points of each seed at iteration `at`]} of the head study (energy and flow, one change
    each), labels for slides."""
    out = {}
    for name, r in runs.items():
        p = [q for q in r["points"] if q["iter"] == at]
        if p:
            head, _, change = name.split(" seed ")[0].partition(" ")
            change = CHANGES.get(change, change)
            out.setdefault(("flow matching" if head == "flow" else "energy") + (f": {change}" if change else
                                                                               " (the recipe)"), []).append(p[0])
    return out


def best_energy_change(runs, at):
    """(label, mean, se, seeds) of the energy head's best single change at iteration `at`, or None."""
    groups = {k: v for k, v in study_groups(runs, at).items() if k.startswith("energy: ")}
    if not groups:
        return None
    label, points = max(groups.items(), key=lambda kv: np.mean([p["brier1"] for p in kv[1]]))
    m, se = mean_se([p["brier1"] for p in points])
    return label.removeprefix("energy: "), m, se, len(points)


def head_study(results):
    """Why does the energy head trail flow matching at our scale? Left: Brier-1 (mean ± 1 s.e. over seeds) of CALM
    K = 4 on Tiny Shakespeare bytes (4 × 128) with the recipe's energy head, one change at a time, and the flow
    head, all at the same 1,358 iterations (7e12 FLOPs of the recipe). Right: the recipe's energy and flow heads
    trained 1, 2 and 4 times as long. A change closes the gap when its bar reaches flow's band."""
    runs = results["head_study"]["runs"]
    first = min(p["iter"] for r in runs.values() for p in r["points"])
    groups = study_groups(runs, first)
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.4 * len(groups) + 2.5), gridspec_kw=dict(width_ratios=[1.4, 1]))
    ax = axes[0]
    order = sorted(groups, key=lambda k: (not k.startswith("energy (the recipe)"), k.startswith("flow"), k))
    stats = {k: mean_se([p["brier1"] for p in groups[k]]) for k in order}
    flow = stats.get("flow matching (the recipe)")
    if flow:
        ax.axvspan(flow[0] - (flow[1] or 0), flow[0] + (flow[1] or 0), color="C0", alpha=0.15)
    for y, k in enumerate(order):
        m, se = stats[k]
        ax.errorbar([m], [y], xerr=[se or groups[k][0]["brier1_se"]], fmt="o", capsize=3,
                    color="C0" if k.startswith("flow") else "C2")
        ax.text(m + (se or 0) + 0.004, y, f"{m:.3f} ({len(groups[k])} seed{'s' * (len(groups[k]) > 1)})", fontsize=7,
                va="center")
    unigram = baseline(results, "head_study")
    ax.axvline(unigram, color="gray", ls=":", label=f"no skill: unigram bytes ({unigram:.3f})")
    ax.set_yticks(range(len(order)), order, fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel=f"Brier-1 at {first:,} iterations", title="the energy head, one change at a time")
    base = stats.get("energy (the recipe)")
    if flow and base:
        closing = [k for k in order if k.startswith("energy: ") and stats[k][0] + (stats[k][1] or 0) >=
                   flow[0] - (flow[1] or 0)]
        note(ax, ("closes the gap (within 1 s.e.): " + ", ".join(k[8:] for k in closing)) if closing else
             "null result: no single change closes the gap to flow matching", "lower right", 8)
    ax.legend(fontsize=7, loc="upper right")
    ax = axes[1]
    for head, color, style in (("energy", "C2", "-o"), ("flow", "C0", "--s")):
        seeds = [r["points"] for n, r in runs.items() if n.startswith(head + " seed")]
        iters = sorted({p["iter"] for pts in seeds for p in pts})
        ms = [mean_se([p["brier1"] for pts in seeds for p in pts if p["iter"] == it]) for it in iters]
        if iters:
            ax.errorbar(iters, [m for m, _ in ms], yerr=[e or 0.0 for _, e in ms], fmt=style, color=color, capsize=3,
                        label=f"{'flow matching' if head == 'flow' else 'energy'} ({len(seeds)} seeds)")
    ax.axhline(unigram, color="gray", ls=":", label="no skill: unigram bytes")
    note(ax, PAPER["heads"], "lower right", 7)
    ax.set(xscale="log", xlabel="training iterations (16 × 128 bytes)", ylabel="Brier-1", title="training longer")
    ax.legend(fontsize=7, loc="upper left")
    for a in axes:
        a.grid(alpha=0.3)
    fig.tight_layout()
    return fig


ARMS = {"regularised": ("variational + KL clip + dropout + masking", "C2", "-o"),
        "no variational": ("dropout + masking, no variational posterior", "C1", "--^"),
        "plain": ("plain (none of them)", "C3", ":s")}


def autoencoder_noise(results):
    """How robust is the autoencoder's decoder to noise on its latent? Held-out reconstruction accuracy (K = 4,
    Tiny Shakespeare bytes) with Gaussian noise added to the posterior mean, against sigma relative to the latents'
    RMS (left: a plain autoencoder cannot pass by enlarging its latents) and absolute (right), mean ± 1 s.e. over
    seeds, for the regularised autoencoder, the same without the variational posterior, and a plain one."""
    runs = results["autoencoder_noise"]["runs"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for arm, (label, color, style) in ARMS.items():
        points = [r["points"][-1] for n, r in runs.items() if n.startswith(arm + " seed") and r["points"]]
        if not points:
            continue
        rms = np.mean([p["latent_rms"] for p in points])
        for ax, key in ((axes[0], "recon_rel"), (axes[1], "recon_abs")):
            sigmas = sorted(set.intersection(*(set(p[key]) for p in points)), key=float)
            ms = [mean_se([p[key][s] for p in points]) for s in sigmas]
            ax.errorbar([float(s) for s in sigmas], [m for m, _ in ms], yerr=[e or 0.0 for _, e in ms], fmt=style,
                        color=color, capsize=3, label=f"{label} ({len(points)} seeds; latent RMS {rms:.2f})")
    mode = baseline(results, "autoencoder_noise", "mode_accuracy")
    verdict = robustness_verdict(runs)
    for ax in axes:
        ax.axhline(mode, color="gray", ls=":", label=f"no skill: the most frequent byte ({mode:.3f})")
        ax.axvline(0.3, color="gray", lw=0.5)
        ax.set(ylabel="held-out token accuracy", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    axes[0].set(xlabel="σ / latent RMS (noise relative to the latents' scale)", title="noise relative to the latents")
    axes[1].set(xlabel="σ (absolute)", title="absolute noise (the paper's σ ≈ 0.3)")
    axes[1].text(0.5, -0.2, PAPER["autoencoder"], transform=axes[1].transAxes, ha="center", va="top", fontsize=8)
    if verdict:
        axes[0].text(0.5, -0.2, "ours: " + verdict.replace("\n", "\n"), transform=axes[0].transAxes, ha="center",
                     va="top", fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def robustness_verdict(runs, sigmas=("0.3", "1")):
    """One line on the regularised against the plain autoencoder at relative sigmas (None without both): the
    paper's sigma ~0.3, and where the noise is as large as the latents."""
    parts = []
    for sigma in sigmas:
        get = lambda arm: [r["points"][-1]["recon_rel"][sigma] for n, r in runs.items()  # noqa: E731
                           if n.startswith(arm + " seed") and r["points"] and sigma in r["points"][-1]["recon_rel"]]
        reg, plain = get("regularised"), get("plain")
        if not reg or not plain:
            continue
        (a, sa), (b, sb) = mean_se(reg), mean_se(plain)
        se = float(np.hypot(sa or 0.0, sb or 0.0))
        same = abs(a - b) <= 2 * se
        parts.append(f"σ = {sigma} × RMS: regularised {a:.3f} vs plain {b:.3f}" +
                     (" (null result: within 2 s.e.)" if same else f" ({a - b:+.3f} ± {se:.3f})"))
    return "\n".join(parts) or None


FIGURES = {"performance_vs_compute": performance_vs_compute, "ratio_to_ntp": ratio_to_ntp, "heads": heads,
           "temperature": temperature, "recipe_sweep": recipe_sweep, "scaling": scaling,
           "recipe_pystdlib": recipe_pystdlib, "head_study": head_study, "autoencoder_noise": autoencoder_noise}
