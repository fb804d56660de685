"""The BrierLM tutorial's study (tutorials/brierlm.ipynb): the estimator against closed forms, BrierLM against
cross-entropy over checkpoints of small next-token models, how many positions make BrierLM stable, and why
accuracy is not a proper score. Not the metric itself: that is brierlm.py.

    python -m bench brierlm [--scale cpu|gpu|live|smoke] [--out results]      writes <out>/brierlm_<scale>.json

The notebook runs the `live` scale (a few minutes on 2 cores) in front of the reader and draws the stored `cpu`
study beside it; `bench verify results/brierlm_cpu.json study` re-runs the stored study and compares.
"""
import contextlib
import io
import os
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

import brierlm
import objectives
import trainer
from bench import records
from data import load_data
from runtime import OneLineParser, UserError, pearson, spearman

# model sizes (n_layer, n_head, n_embd) x checkpoints (training iterations) of plain next-token models
SCALES = {
    "smoke": dict(tokenizer="bytes", sizes=[(1, 2, 32), (1, 2, 64)], stages=[4, 12], block=32, batch=4, positions=32,
                  ce_batches=2, pool=64, var_positions=[16, 32], warmup=2, estimator_draws=4000),
    "live": dict(tokenizer="bytes", sizes=[(1, 2, 32), (2, 4, 64), (4, 4, 128)], stages=[25, 100, 300], block=64,
                 batch=16, positions=512, ce_batches=10, pool=4096, var_positions=[128, 256, 512, 1024], warmup=20,
                 estimator_draws=20000),
    "cpu": dict(tokenizer="bytes", sizes=[(1, 2, 32), (2, 4, 64), (4, 4, 128)], stages=[25, 50, 100, 200, 400],
                block=64, batch=16, positions=1024, ce_batches=20, pool=8192, var_positions=[128, 256, 512, 1024, 2048],
                warmup=20, estimator_draws=20000),
    "gpu": dict(tokenizer="gpt2", sizes=[(2, 4, 128), (4, 4, 256), (6, 6, 384)], stages=[250, 500, 1000, 2000, 4000],
                block=256, batch=32, positions=4096, ce_batches=50, pool=16384, var_positions=[256, 1024, 4096],
                warmup=200, estimator_draws=20000),
}


def num(x):
    """A float for the JSON results; None where it is undefined (nan)."""
    return float(x) if x is not None and np.isfinite(x) else None


def estimator_check(draws, seed=0):
    """The two-sample estimator's mean over `draws` draws against the exact Brier score, on categorical
    distributions with known probabilities (flat or peaked; the observed y the mode or a rare outcome)."""
    g, rows = torch.Generator().manual_seed(seed), []
    for V, kind in [(2, "flat"), (10, "peaked"), (1000, "peaked"), (1000, "flat")]:
        p = torch.full((V,), 1 / V) if kind == "flat" else torch.softmax(3 * torch.randn(V, generator=g), 0)
        for which, y in (("mode", int(p.argmax())), ("rare", int(p.argmin()))):
            x1, x2 = (torch.multinomial(p, draws, replacement=True, generator=g).view(draws, 1) for _ in range(2))
            est = brierlm.two_sample_estimates(x1, x2, torch.full((draws, 1), y), max_n=1)[:, 0].double()
            exact = 2 * p[y].item() - (p.double() ** 2).sum().item()
            rows.append(dict(dist=f"{kind} ({which})", V=V, y=y, exact=exact, mean=est.mean().item(),
                             se=est.std().item() / draws ** 0.5))
    return rows


def train_stage(cfg, size, iters, first, out, device):
    """One stage of one size's run (each stage resumes the last; the cosine ends at the last stage, so the
    checkpoints lie on one run)."""
    L, H, D = size
    out = os.path.join(out, f"ntp_L{L}_D{D}")
    argv = ["--dataset", "shakespeare", "--tokenizer", cfg["tokenizer"], "--n_layer", str(L), "--n_head", str(H),
            "--n_embd", str(D), "--block_size", str(cfg["block"]), "--batch_size", str(cfg["batch"]),
            "--max_iters", str(iters), "--lr_decay_iters", str(cfg["stages"][-1]), "--warmup_iters", str(cfg["warmup"]),
            "--eval_interval", str(10 ** 9), "--eval_iters", "1", "--brier_positions", "0", "--sample_tokens", "0",
            "--device", device, "--out_dir", out] + (["--overwrite"] if first else ["--resume"])
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.main(argv)
    return os.path.join(out, "ckpt.pt")


def checkpoints(cfg, out, device, log=print):
    """BrierLM (from samples, and variance-reduced), the exact Brier-1 and val cross-entropy of every checkpoint."""
    rows, t0 = [], time.time()
    for size in cfg["sizes"]:
        for i, iters in enumerate(cfg["stages"]):
            ckpt = train_stage(cfg, size, iters, i == 0, out, device)
            r = objectives.score_checkpoint(ckpt, cfg["positions"], seed=0, ce_batches=cfg["ce_batches"], device=device)
            rows.append(dict(size=list(size), iters=iters, seconds=time.time() - t0, **{
                k: num(r[k]) for k in ("val_loss", "brierlm", "brierlm_se", "brierlm_vr", "brierlm_vr_se",
                                       "exact_brier1", "brier1", "brier2", "brier3", "brier4")}))
            log(f"L{size[0]} d{size[2]} iter {iters}: val CE {rows[-1]['val_loss']:.3f} | BrierLM "
                f"{rows[-1]['brierlm_vr']:.2f} (variance-reduced) | {rows[-1]['seconds']:.0f}s")
    return rows


def correlations(rows):
    """Pearson and Spearman of BrierLM (samples, variance-reduced) and of the exact Brier-1 against val CE."""
    ce = np.array([r["val_loss"] for r in rows])
    out = {}
    for key in ("brierlm", "brierlm_vr", "exact_brier1"):
        v = np.array([r[key] for r in rows])
        out[key] = dict(pearson=num(pearson(v, ce)), spearman=num(spearman(v, ce)))  # None: v is constant
    return out


def positions_pool(cfg, out, device):
    """The last (largest, fully trained) model on one pool of positions, cut into disjoint groups of N: the spread
    of BrierLM across groups against the delta-method standard error."""
    L, H, D = cfg["sizes"][-1]
    model, objective, saved, _ = objectives.load_model(os.path.join(out, f"ntp_L{L}_D{D}", "ckpt.pt"), device)
    saved.device = device
    data = load_data(saved.dataset, saved.tokenizer)
    pool = objectives.brier_scores(model, objective, data, saved, cfg["pool"], 100, variance_reduced=True)
    summary = dict(model=f"L{L} d{D}", positions=cfg["pool"])
    for key in ("sampled", "reduced"):
        e = pool[key]
        summary[key] = dict(brier=e.mean(0).tolist(), se=(e.std(0, ddof=1) / len(e) ** 0.5).tolist(),
                            brierlm=brierlm.summarize(e)["brierlm"], brierlm_se=num(brierlm.brierlm_stderr(e)),
                            sigma=num(brierlm.brierlm_stderr(e) * np.sqrt(len(e))))  # per-position spread
    spread = []
    for N in cfg["var_positions"]:
        row = dict(N=N)
        for key in ("sampled", "reduced"):
            groups = pool[key][:len(pool[key]) // N * N].reshape(-1, N, 4)
            scores = np.array([brierlm.summarize(g)["brierlm"] for g in groups])
            row["groups"] = len(groups)
            row[key] = dict(spread=num(np.std(scores, ddof=1)), zero_share=float((scores == 0).mean()),
                            delta=num(brierlm.brierlm_stderr(pool[key]) * np.sqrt(len(pool[key]) / N)))
        spread.append(row)
    return summary, spread, (model, data, saved)


@torch.no_grad()
def temperature_sweep(model, data, args, temperatures, n_batches=10, batch_size=16, seed=0, split="val"):
    """Why accuracy is not a proper score: scale a token model's logits by 1/T and measure, exactly from its
    probabilities, the accuracy of a sample (E 1{x=y} = P_T(y)), the Brier-1 score 2 P_T(y) - sum P_T^2 and the
    cross-entropy. Sharpening (T < 1) raises sample accuracy; the proper scores are best near the model's own
    (T = 1) distribution. Returns {T: {'sample_acc', 'brier1', 'cross_entropy'}}."""
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    batches = [data.get_batch(split, batch_size, args.block_size, gen, device) for _ in range(n_batches)]
    logits = [model(x)[0].flatten(0, 1).float() for x, _ in batches]  # (B*T, V) each
    ys = [y.flatten() for _, y in batches]
    out = {}
    for T in temperatures:
        acc, b1, ce = [], [], []
        for lg, y in zip(logits, ys):
            p = F.softmax(lg / T, -1)
            acc.append(p.gather(1, y.view(-1, 1)).mean().item())
            b1.append(brierlm.exact_brier1(lg / T, y).mean().item())
            ce.append(F.cross_entropy(lg / T, y).item())
        out[T] = dict(sample_acc=float(np.mean(acc)), brier1=float(np.mean(b1)), cross_entropy=float(np.mean(ce)))
    return out


TEMPERATURES = [0.25, 0.5, 0.7, 0.85, 1.0, 1.2, 1.5, 2.0]


def study(scale, out, device="cpu", log=print):
    """The whole study at one scale, its checkpoints under `out`; returns the results dict (with provenance)."""
    if scale not in SCALES:
        raise UserError(f"unknown scale {scale!r}: choose from {', '.join(SCALES)}")
    cfg = SCALES[scale]
    prov = records.provenance(dict(scale=scale, **cfg), [__name__], device)
    results = dict(experiment=f"brierlm_{scale}", module=__name__, description=__doc__.split("\n\n")[0],
                   meta=dict(scale=scale, config=cfg, hardware=prov["hardware"], torch=torch.__version__))
    results["estimator"] = estimator_check(cfg["estimator_draws"])
    results["checkpoints"] = checkpoints(cfg, out, device, log)
    results["correlations"] = correlations(results["checkpoints"])
    results["pool"], results["spread"], (model, data, saved) = positions_pool(cfg, out, device)
    sweep = temperature_sweep(model, data, saved, TEMPERATURES, n_batches=cfg["ce_batches"], seed=0)
    results["temperature"] = [dict(T=T, **sweep[T]) for T in TEMPERATURES]
    results["provenance"] = records.finish(prov)
    results["config"] = prov["config"]
    results["meta"]["minutes"] = results["provenance"]["wall_seconds"] / 60
    return results


def runs_of(results):
    """bench verify: the study is one run, 'study'."""
    return {"study": results}


def rerun(experiment, run_id, rec, work):
    return study(rec["meta"]["scale"], work, log=lambda *a: None)


def compared(rec):
    """What bench verify compares: the correlations, the last checkpoint's scores, the pool's BrierLM."""
    last = rec["checkpoints"][-1]
    out = {f"{k} {c}": (rec["correlations"][k][c], 0.05) for k in ("brierlm_vr", "exact_brier1")
           for c in ("pearson", "spearman")} if "correlations" in rec else {}
    out.update({"last val_loss": (last["val_loss"], 0.02), "last exact_brier1": (last["exact_brier1"], 0.01),
                "pool brierlm (variance-reduced)": (rec["pool"]["reduced"]["brierlm"],
                                                    3 * (rec["pool"]["reduced"]["brierlm_se"] or 1.0))})
    return out


def main(argv=None):
    p = OneLineParser(prog="python -m bench brierlm", description=__doc__.splitlines()[0])
    p.add_argument("--scale", default="cpu", help="smoke, live, cpu or gpu")
    p.add_argument("--out", default=records.RESULTS, help="folder of brierlm_<scale>.json")
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        results = study(a.scale, work, a.device)
    records.write_json(os.path.join(a.out, f"brierlm_{a.scale}.json"), results)
    print(f"wrote {os.path.join(a.out, f'brierlm_{a.scale}.json')} ({results['meta']['minutes']:.1f} min)")
