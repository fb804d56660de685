"""Key figures of tutorials/overview.ipynb, from the committed report of `python -m bench table` (results/bench_<preset>
.json: rows [{objective, status, curve: [{train_flops, brierlm, brierlm_se, brier1}], brierlm, gen_tok_s,
fwd_per_tok}], preset, hardware). The notebook draws its figures with these functions (figs.brierlm_vs_flops(report))."""
import matplotlib.pyplot as plt

RESULTS = ["results/bench_gpu_cuda.json", "results/bench_cpu.json"]


def ok_rows(report):
    return [r for r in report["rows"] if r["status"] == "ok"]


def pretty(label):
    """A table row's label for a slide: 'mtp n=2' -> 'MTP n = 2', 'dispersion l=0.1' -> 'dispersion λ = 0.1'."""
    name, _, setting = label.partition(" ")
    name = {"ntp": "NTP", "mtp": "MTP", "calm": "CALM"}.get(name, name)
    return f"{name} {setting.replace('l=', 'λ = ').replace('=', ' = ').replace('  ', ' ')}".strip()


def brierlm_vs_flops(report):
    """Every objective on one training-FLOPs budget (same data and backbone): BrierLM (left, ± 1 s.e.) and Brier-1
    (right) after each quarter of each run, against the training FLOPs spent. CALM dashed."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.3))
    for r in ok_rows(report):
        xs = [p["train_flops"] for p in r["curve"]]
        style = "--" if r["objective"].startswith("calm") else "-"
        se = [p["brierlm_se"] if isinstance(p.get("brierlm_se"), (int, float)) else 0.0 for p in r["curve"]]
        axes[0].errorbar(xs, [p["brierlm"] for p in r["curve"]], yerr=se, marker="o", ls=style, capsize=3,
                         label=pretty(r["objective"]))
        axes[1].plot(xs, [p["brier1"] for p in r["curve"]], marker="o", ls=style, label=pretty(r["objective"]))
    axes[0].axhline(0, color="gray", ls=":", label="no skill (BrierLM 0)")
    unigram = report.get("baselines", {}).get("unigram_brier1")
    if unigram is not None:  # a model that knows only byte frequencies, computed exactly from the splits
        axes[1].axhline(unigram, color="gray", ls=":", label=f"no skill: unigram bytes ({unigram:.3f})")
        axes[1].legend(fontsize=8)
    axes[0].text(0.02, 0.97, "paper: CALM-M (K = 4) matches Transformer-S\nwith 44% fewer training FLOPs",
                 transform=axes[0].transAxes, va="top", fontsize=8)
    axes[0].set_ylabel("BrierLM (0..100)")
    axes[1].set_ylabel("Brier-1 (-1..1)")
    for ax in axes:
        ax.set_xlabel("training FLOPs")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"quality vs training FLOPs ({report['preset']} preset, {report['hardware'].split(',')[0]})")
    fig.tight_layout()
    return fig


def speed_vs_quality(report):
    """What each objective buys at generation time: batch-1 generated tokens per second (left) and backbone
    forward passes per token (right) against the final BrierLM. MTP decodes self-speculatively, CALM one K-token
    chunk per pass."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in ok_rows(report):
        for ax, key in ((axes[0], "gen_tok_s"), (axes[1], "fwd_per_tok")):
            ax.scatter(r["brierlm"], r[key], s=60)
            ax.annotate(pretty(r["objective"]), (r["brierlm"], r[key]), textcoords="offset points", xytext=(5, 4))
    axes[0].set_ylabel("generated tokens / s (batch 1)")
    axes[1].set_ylabel("backbone forward passes per token")
    for ax in axes:
        ax.set_xlabel("BrierLM")
        ax.grid(alpha=0.3)
    fig.suptitle("generation speed vs BrierLM")
    fig.tight_layout()
    return fig


FIGURES = {"brierlm_vs_flops": brierlm_vs_flops, "speed_vs_quality": speed_vs_quality}
