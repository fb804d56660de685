"""Key figures of tutorials/mtp.ipynb, drawn from the files that `python -m bench mtp sweep <sweep>` writes
(bench/mtp_experiments.py). `results` is a dict of them by part, {"size": ..., "induction": ..., "polynomial": ...,
"bytes": ..., "speedup": ...}, holding the parts that exist; each is bench/records.py's format {experiment, module,
description, runs: {run_id: {config, metrics, provenance}}} with
  config      {sweep, model: [L, d, heads], n, seed, data, iters, batch, ...}
  size        metrics {val_loss_h1, brier1, brierlm (and their _se), params_non_embedding, trunk_blocks, tokens, ..}
  induction   metrics {acc_val, n_scored_val, curve: [{iter, acc_val, ..}], no_skill: {val: {chance, guess_seen}}, ..}
  polynomial  metrics {acc_val, acc_val_ood, token_acc_*, acc_m<m>_val(_ood), acc_m1_<op>_val, curve,
              no_skill: {val: {chance, chance_per_digit, common_digit, common_digit_per_digit}, val_ood: {..}}, ..}
  bytes       metrics {dataset, n, tokens_per_forward (greedy), tokens_per_forward_t1, per_prompt, ..}
  speedup     metrics {n, n_layer, n_embd, verify_over_step, per_prompt: [{tokens_per_forward, speedup}], speedup, ..}
A sweep still running has fewer runs: what exists is drawn (one seed: no error bar); a figure whose part has no file
is skipped (NEEDS). The memory figure and the verify-cost table of the notebook are measured in the notebook itself
and are not key figures."""
import re

import matplotlib.pyplot as plt
import numpy as np

RESULTS = {part: f"results/mtp_{part}.json" for part in ("size", "induction", "polynomial", "bytes", "speedup")}
NEEDS = {"accepted_tokens": ["bytes"], "speedup": ["speedup"], "benefit_vs_size": ["size"],
         "induction_vs_size": ["induction"], "polynomial": ["polynomial"]}
FORMED = 0.5  # an induction run "formed induction" when its final accuracy reaches this (guessing scores 1/names)
N_STYLE = {1: ("C0", "o"), 2: ("C1", "s"), 4: ("C2", "^"), 8: ("C3", "D")}


def mean_se(values):
    """(mean, standard error over the values); se None for a single value (no error bar)."""
    v = np.asarray(values, dtype=float)
    return float(v.mean()), (float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else None)


def flat(report):
    """{run_id: config and metrics in one dict (n_layer, n_embd from the model)}: what the summaries read."""
    out = {}
    for name, rec in report["runs"].items():
        cfg = rec.get("config", {})
        row = dict(cfg, **rec.get("metrics", {}))
        if "model" in cfg:
            row.update(n_layer=cfg["model"][0], n_embd=cfg["model"][1])
        out[name] = row
    return out


def size_label(params):
    return f"{params / 1e6:.2f}M" if params >= 1e6 else f"{params / 1e3:.0f}k"


def size_summary(report):
    """Per model size and n (sizes by L d^2): non-embedding parameters, training tokens and, paired by seed against
    the n = 1 run of the same size, mean and se of head 1's val loss, Brier-1 and BrierLM and of their change from
    n = 1 (d_<key>)."""
    runs, rows = flat(report), []
    for L, d in sorted({(r["n_layer"], r["n_embd"]) for r in runs.values()}, key=lambda s: s[0] * s[1] ** 2):
        for n in sorted({r["n"] for r in runs.values()}):
            group = [r for r in runs.values() if (r["n_layer"], r["n_embd"], r["n"]) == (L, d, n)]
            pairs = [(r, next((b for b in runs.values() if (b["n_layer"], b["n_embd"], b["n"], b["seed"]) ==
                               (L, d, 1, r["seed"])), None)) for r in group]
            pairs = [(r, base) for r, base in pairs if base is not None]
            if not pairs:
                continue
            row = dict(n_layer=L, n_embd=d, n=n, seeds=len(pairs), params=pairs[0][0]["params_non_embedding"],
                       tokens=pairs[0][0].get("tokens"), trunk_blocks=pairs[0][0].get("trunk_blocks"))
            for k in ("val_loss_h1", "brier1", "brierlm"):
                row[k], row[k + "_se"] = mean_se([r[k] for r, _ in pairs])
                row["d_" + k], row["d_" + k + "_se"] = mean_se([r[k] - base[k] for r, base in pairs])
            rows.append(row)
    return rows


def task_summary(report):
    """Per model size and n: mean and se over seeds of every accuracy (acc_*, token_acc_*), the number of seeds,
    and (induction) the fraction of seeds whose final accuracy reached FORMED."""
    runs, rows = flat(report), []
    for L, d, n in sorted({(r["n_layer"], r["n_embd"], r["n"]) for r in runs.values()},
                          key=lambda k: (k[0] * k[1] ** 2, k[2])):
        group = [r for r in runs.values() if (r["n_layer"], r["n_embd"], r["n"]) == (L, d, n)]
        row = dict(n_layer=L, n_embd=d, n=n, seeds=len(group), params=group[0]["params_non_embedding"],
                   formed=float(np.mean([r["acc_val"] >= FORMED for r in group])))
        for k in sorted(k for k in group[0] if k.startswith(("acc", "token_acc"))):
            row[k], row[k + "_se"] = mean_se([r.get(k, np.nan) for r in group])
        rows.append(row)
    return rows


def no_skill(report, split="val"):
    """The no-skill baselines stored with the runs ({chance, guess_seen} or {chance, common_digit, ..})."""
    for r in report["runs"].values():
        if split in r.get("metrics", {}).get("no_skill", {}):
            return r["metrics"]["no_skill"][split]
    return {}


def errorbar(ax, rows, x, key, **style):
    """One curve of summary rows; error bars only where there are two seeds or more."""
    se = [r.get(key + "_se") or 0.0 for r in rows]
    ax.errorbar([r[x] for r in rows], [r[key] for r in rows], yerr=se if any(se) else None, capsize=3, **style)


def seeds(rows):
    lo, hi = min(r["seeds"] for r in rows), max(r["seeds"] for r in rows)
    return f"{lo}" + (f"-{hi}" if hi > lo else "") + f" seed{'s' * (hi > 1)}"


def accepted_tokens(results):
    """Byte-level self-speculative decoding: accepted tokens per forward against the number of heads n (10 blocks
    × 144, byte models of code and of text), greedy (solid; its output is plain greedy decoding's) and speculative
    sampling at T = 1 (dashed). Gray: 1 token per forward, what heads that never draft right give; dotted: the upper
    bound n. The paper: 6.4× faster decoding at n = 8 (7B, bytes)."""
    runs = list(flat(results["bytes"]).values())
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for ds, label in (("pystdlib", "code"), ("shakespeare", "text")):
        rs = sorted((r for r in runs if r["dataset"] == ds), key=lambda r: r["n"])
        if rs:
            line, = ax.plot([r["n"] for r in rs], [r["tokens_per_forward"] for r in rs], "o-", label=f"{label}, greedy")
            ax.plot([r["n"] for r in rs], [r["tokens_per_forward_t1"] for r in rs], "s--", color=line.get_color(),
                    label=f"{label}, sampling T = 1")
    ns = sorted({r["n"] for r in runs})
    ax.plot(ns, ns, ":", color="gray", label="upper bound: n")
    ax.axhline(1, color="gray", lw=1, label="no skill: 1 (no draft accepted)")
    ax.set(xlabel="n (heads)", ylabel="accepted tokens per forward", xticks=ns,
           title="byte-level self-speculative decoding\n(paper, 7B bytes, n = 8: 6.4× faster on GPU)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def speedup(results):
    """Where self-speculative decoding pays on a CPU: wall-clock speed-up over cached greedy decoding of the same
    model (bfloat16, n = 4, batch 1) against accepted tokens per forward, one point per prompt, for a model trained
    on code and one on a counting stream (drafts easy). Dotted: tokens per forward / (verify forward / greedy step),
    the speed-up the measured costs predict; gray: 1 = break-even (no gain). The paper: ~3× on code at n = 4 (7B,
    GPU)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for i, (name, sp) in enumerate(flat(results["speedup"]).items()):
        ax.scatter([q["tokens_per_forward"] for q in sp["per_prompt"]], [q["speedup"] for q in sp["per_prompt"]],
                   color=f"C{i}", label=f"{name}: {sp['speedup']:.2f}× on average")
        xs = [1, sp["n"]]
        ax.plot(xs, [x / sp["verify_over_step"] for x in xs], ":", color=f"C{i}",
                label=f"{name}: predicted (verify costs {sp['verify_over_step']:.2f} steps)")
    ax.axhline(1, color="gray", lw=1, label="break-even")
    ax.set(xlabel="accepted tokens per forward", ylabel="speed-up over cached greedy\n(wall clock)",
           title="paper: ~3× on code, n = 4 (7B, GPU)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def benefit_vs_size(results):
    """Benefit of n heads vs model size, every size trained on the same number of code bytes per non-embedding
    parameter: head 1's val loss (nats/byte; below 0: MTP better), Brier-1 and BrierLM (above 0: MTP better) of
    n = 2, 4 minus those of n = 1 of the same size and seed, against non-embedding parameters (mean ± 1 s.e. over
    paired seeds). Gray: 0, no benefit. The paper (0.3B-13B, code): n = 4 loses below about 1B and wins more and
    more above."""
    rows = size_summary(results["size"])
    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    keys = (("d_val_loss_h1", "head-1 val loss, n minus n = 1\n(nats/byte; below 0: MTP better)"),
            ("d_brier1", "Brier-1, n minus n = 1\n(above 0: MTP better)"),
            ("d_brierlm", "BrierLM, n minus n = 1\n(above 0: MTP better)"))
    for n in sorted({r["n"] for r in rows} - {1}):
        rs = [r for r in rows if r["n"] == n]
        color, marker = N_STYLE.get(n, ("C5", "v"))
        for a, (k, _) in zip(ax, keys):
            errorbar(a, rs, "params", k, marker=marker, color=color, label=f"n = {n} ({seeds(rs)})")
    for a, (_, label) in zip(ax, keys):
        a.axhline(0, color="gray", ls=":", label="no benefit (n = 1)")
        a.set(xscale="log", xlabel="non-embedding parameters", ylabel=label)
    tpp = {round(r["tokens"] / r["params"], 1) for r in rows if r.get("tokens")}
    ax[0].set_title(f"{'/'.join(map(str, sorted(tpp)))} training bytes per parameter", fontsize=10)
    ax[1].set_title("paper: worse below ~1B, better above", fontsize=10)
    ax[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def induction_vs_size(results):
    """Induction vs model size: head 1's accuracy on the symbols of a recurring 12-symbol name after its first (mean
    ± 1 s.e. over seeds; the fraction of seeds that formed induction, accuracy >= 0.5, is written at each point) for
    n = 1, 2 at three widths of 4 blocks (left), and the accuracy during training of every seed of the smallest width
    that formed it in some seed (right). Dashed: a model without induction that guesses among the symbols already
    seen in the episode; dotted: chance (1/62). The paper (1M-1B parameters): n = 2 forms induction where n = 1 does
    not for the smallest models; the advantage vanishes with size."""
    report = results["induction"]
    rows = task_summary(report)
    base = no_skill(report)
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for n in sorted({r["n"] for r in rows}):
        rs = [r for r in rows if r["n"] == n]
        color, marker = N_STYLE.get(n, ("C5", "v"))
        errorbar(ax[0], rs, "params", "acc_val", marker=marker, color=color, label=f"n = {n} ({seeds(rs)})")
    sizes = sorted({r["params"] for r in rows})
    for p in sizes:  # the seeds that formed induction, under each size
        text = "\n".join(f"n = {r['n']}: {r['formed']:.0%}" for r in rows if r["params"] == p)
        ax[0].text(p, 0.1, "formed\n" + text, ha="center", va="bottom", fontsize=7,
                   bbox=dict(boxstyle="round", fc="white", ec="0.8", alpha=0.8))
    formed = [r for r in rows if r["formed"] > 0]
    small = min(formed or rows, key=lambda r: r["params"]) if rows else None
    for r in flat(report).values():
        if small and (r["n_layer"], r["n_embd"]) == (small["n_layer"], small["n_embd"]):
            color, _ = N_STYLE.get(r["n"], ("C5", "v"))
            ax[1].plot([p["iter"] for p in r["curve"]], [p["acc_val"] for p in r["curve"]], "-", color=color,
                       alpha=0.8, label=f"n = {r['n']}")
    for a in ax:
        if "guess_seen" in base:
            a.axhline(base["guess_seen"], color="gray", ls="--",
                      label=f"no induction: guess among seen ({base['guess_seen']:.3f})")
        a.axhline(base.get("chance", 1 / 62), color="gray", ls=":", label=f"chance ({base.get('chance', 1 / 62):.3f})")
        a.set_ylim(0, 1.02)
    handles, labels = ax[1].get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax[1].legend(unique.values(), unique.keys(), fontsize=8)
    ax[0].set(xscale="log", xlabel="non-embedding parameters", ylabel="accuracy of head 1 on recurring names",
              title="paper: n = 2 helps the smallest models, not larger ones")
    ax[0].set_xticks(sizes, [size_label(p) for p in sizes])  # only the trained sizes: no crowded minor labels
    ax[0].minorticks_off()
    if sizes:
        ax[0].set_xlim(sizes[0] / 1.6, sizes[-1] * 1.3)
    ax[0].title.set_fontsize(10)
    if small:
        ax[1].set(xlabel="training iteration", ylabel="accuracy", title=f"during training, "
                  f"{size_label(small['params'])} parameters, every seed")
        ax[1].title.set_fontsize(10)
    ax[0].legend(fontsize=8, loc="center right")
    fig.tight_layout()
    return fig


def polynomial(results):
    """Polynomial arithmetic in F_7[X]/(X^5): exact match of the whole answer (greedy decoding) in distribution, by
    operation (one-operation expressions: +, ×, negation), and out of distribution (more operations than in
    training), for n = 1, 2, 4 at each model size (mean ± 1 s.e. over seeds), left; accuracy per answer digit, right.
    Dotted: chance (7^-5 exact, 1/7 per digit); dashed: the most common digit of training at each answer position.
    The paper: n = 2 and 4 beat n = 1, in and out of distribution, by more than tripling the model size does."""
    report = results["polynomial"]
    rows = task_summary(report)
    ms = sorted({int(m[1]) for r in rows for k in r for m in [re.fullmatch(r"acc_m(\d+)_val(_ood)?", k)] if m})
    ops = [(op, sym) for op, sym in (("add", "+"), ("mul", "×"), ("neg", "−"), ("compose", "∘"))
           if rows and f"acc_m1_{op}_val" in rows[0]]
    groups = [(f"{sym}, 1 operation\nin distribution", f"acc_m1_{op}_val") for op, sym in ops]
    for m in ms:
        key = next(k for k in (f"acc_m{m}_val", f"acc_m{m}_val_ood") if k in rows[0])
        if not (m == 1 and ops):
            where = "in distribution" if key.endswith("_val") else "out of distribution"
            groups.append((f"{m} operation{'s' * (m > 1)}\n{where}", key))
    base, ood_base = no_skill(report, "val"), no_skill(report, "val_ood")
    sizes = sorted({(r["n_layer"], r["n_embd"], r["params"]) for r in rows}, key=lambda s: s[2])
    fig, ax = plt.subplots(1, 2, figsize=(13, 4.2), gridspec_kw=dict(width_ratios=[1.6, 1]))
    width = 0.8 / max(len(rows), 1)
    for j, r in enumerate(rows):
        color, _ = N_STYLE.get(r["n"], ("C5", "v"))
        shade = 0.55 + 0.45 * sizes.index((r["n_layer"], r["n_embd"], r["params"])) / max(len(sizes) - 1, 1)
        label = f"n = {r['n']}, {size_label(r['params'])} params ({r['seeds']} seed{'s' * (r['seeds'] > 1)})"
        xs = [i + (j - (len(rows) - 1) / 2) * width for i in range(len(groups))]
        ax[0].bar(xs, [r.get(k, np.nan) for _, k in groups], width, yerr=[r.get(k + "_se") or 0 for _, k in groups],
                  color=color, alpha=shade, label=label, capsize=2)
        xs = [i + (j - (len(rows) - 1) / 2) * width for i in range(2)]
        ax[1].bar(xs, [r.get("token_acc_val", np.nan), r.get("token_acc_val_ood", np.nan)], width,
                  yerr=[r.get("token_acc_val_se") or 0, r.get("token_acc_val_ood_se") or 0], color=color,
                  alpha=shade, capsize=2)
    ax[0].set_xticks(range(len(groups)), [g for g, _ in groups], fontsize=8)
    ax[0].axhline(base.get("common_digit", 0), color="gray", ls="--",
                  label=f"most common digit ({base.get('common_digit', 0):.3f})")
    ax[0].axhline(base.get("chance", 7 ** -5), color="gray", ls=":", label="chance (7^-5)")
    ax[0].set(ylabel="exact match of the answer", ylim=(0, 1.05),
              title="paper: n = 2, 4 > n = 1, in and out of distribution")
    ax[0].title.set_fontsize(10)
    ax[0].legend(fontsize=7)
    ax[1].set_xticks([0, 1], ["in distribution", "out of distribution"])
    for x0, b in ((0, base), (1, ood_base)):
        ax[1].hlines(b.get("common_digit_per_digit", np.nan), x0 - 0.45, x0 + 0.45, colors="gray", linestyles="--")
        ax[1].hlines(1 / 7, x0 - 0.45, x0 + 0.45, colors="gray", linestyles=":")
    ax[1].set(ylabel="accuracy per answer digit", ylim=(0, 1), title="dashed: most common digit; dotted: 1/7")
    ax[1].title.set_fontsize(10)
    fig.tight_layout()
    return fig


FIGURES = {"accepted_tokens": accepted_tokens, "speedup": speedup, "benefit_vs_size": benefit_vs_size,
           "induction_vs_size": induction_vs_size, "polynomial": polynomial}
