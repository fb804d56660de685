"""Experiments for dispersion.py (tutorials/dispersion.ipynb reads what they write; nothing here is asserted by a
test's clock). Each part is one experiment in bench/records.py's format, results/dispersion_<part>.json (cpu scale;
_gpu for gpu): {"experiment", "module", "description", "runs": {run_id: {"config", "metrics", "provenance"}}},
rewritten under a file lock after every run, so a cut part keeps what it finished and two shards (--shard 0/2, 1/2)
can share it; a finished run is reused only when the same code and configuration made it. Checkpoints go to
--work. `python -m bench verify results/dispersion_<part>.json <run-id>` re-runs one run and compares.

    python -m bench dispersion sweep [--scale smoke|tutorial|cpu|gpu]  lambda x scope x seed, single vs cross-domain
    python -m bench dispersion gap   [--scale ...]  model selection by the dispersion gap G: models of three sizes
                                                    trained on three arithmetic shares, compared at equal iterations,
                                                    beside the trivial predictors; label-free accuracy sets
    python -m bench dispersion knn   [--scale ...]  per model (two seeds): per-layer Spearman(dispersion, ppl) at
                                                    initialisation and trained; kNN-LM perplexity with keys from every
                                                    layer and sub-layer, the most dispersed one against the best one

The arithmetic task (a digit-heavy text domain, byte tokens): lines 'a+b=c' / 'a-b=c' with 1- to 3-digit operands,
inserted line by line into Tiny Shakespeare so that a given share of the bytes is arithmetic (one file,
<cache>/dispersion/mixed_<share>_0.txt; --dataset file:<it>). Accuracy is exact match: a question (three solved
held-out problems as context, then 'a+b=') counts as right when the model's argmax is the answer's every byte and the
closing newline, i.e. exactly when greedy decoding writes the answer.
"""
import os
import re
import sys

import numpy as np
import torch

import dispersion as dp
import trainer
from bench import records
from data import cache_dir, load_data
from objectives import load_model
from runtime import OneLineParser, UserError, correlation, mean_se

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPERATORS = "+-="
DIGITS = "0123456789"


# ----------------------------------------------------------------------------- training

def run_training(argv):
    """trainer.main(argv), its printout captured; returns the checkpoint path. UserError if it fails."""
    trainer.run_quietly(argv)
    return os.path.join(argv[argv.index("--out_dir") + 1], "ckpt.pt")


def train_with_snapshots(argv, snapshot_iters, measure, device="cpu"):
    """Train one run in stages (train.py --resume) and call measure(model) on the checkpoint at every iteration of
    snapshot_iters (the lr schedule spans the whole run). Returns [{'iter', 'model', **measure(model)}]."""
    final, rows = max(snapshot_iters), []
    for n, it in enumerate(sorted(snapshot_iters)):
        stage = argv + ["--max_iters", str(it), "--lr_decay_iters", str(final)] + (["--resume"] if n else
                                                                                 ["--overwrite"])
        model = load_model(run_training(stage), device)[0]
        rows.append(dict(iter=it, model=model, **measure(model)))
    return rows


# ----------------------------------------------------------------------------- scales and results files

SCALES = {  # model, run length, grid and measurement sizes per scale
    "smoke": dict(model=dict(n_layer=2, n_head=2, n_embd=32, block_size=32), batch_size=4, iters=12,
                  lams=[0, 0.1], seeds=[1, 2], extra=[], eval_chunks=8,
                  gap=dict(sizes=[(1, 16), (2, 16)], shares=[0.2, 0.5], seeds=[1], iters=8, problems=40),
                  knn=dict(seeds=[1, 2]), seg_chunks=48, group=4, n_groups=6, store_chunks=4, tune_chunks=1,
                  test_chunks=1, share_sets=2, set_size=4),
    "cpu": dict(model=dict(n_layer=4, n_head=4, n_embd=128, block_size=128), batch_size=8, iters=1000,
                lams=[0, 0.001, 0.01, 0.1], seeds=[1, 2, 3],
                extra=[("cross", "batch", 0.1), ("cross", "cross_domain", 1.0)], eval_chunks=512,
                gap=dict(sizes=[(2, 64), (3, 96), (4, 128)], shares=[0.2, 0.35, 0.5], seeds=[1], iters=4000,
                         problems=6003),
                knn=dict(seeds=[1, 2]), seg_chunks=6400, group=50, n_groups=40, store_chunks=512, tune_chunks=16,
                test_chunks=32, share_sets=10, set_size=100),
}
SCALES["tutorial"] = dict(  # what tutorials/dispersion.ipynb runs live at cpu scale: a few minutes in all
    SCALES["cpu"], iters=300, lams=[0, 0.1], seeds=[1], extra=[], eval_chunks=64,
    gap=dict(sizes=[(2, 64), (3, 96)], shares=[0.25, 0.5], seeds=[1], iters=400, problems=1003),
    knn=dict(seeds=[1]), seg_chunks=1600, group=25, n_groups=20, store_chunks=128, tune_chunks=8, test_chunks=16,
    share_sets=5, set_size=50)
SCALES["gpu"] = dict(SCALES["cpu"], model=dict(n_layer=6, n_head=6, n_embd=384, block_size=256), batch_size=32,
                     iters=3000, eval_chunks=1024, store_chunks=2048, tune_chunks=32, test_chunks=64,
                     gap=dict(sizes=[(2, 128), (4, 256), (6, 384)], shares=[0.2, 0.35, 0.5], seeds=[1, 2],
                              iters=4000, problems=6003))
# (the gpu scale has not been run: no GPU in the session that wrote this)
DATASETS = {"single": "shakespeare", "cross": "shakespeare+pystdlib"}
PARTS = ("sweep", "gap", "knn")
DESCRIPTIONS = {
    "sweep": "lambda x scope x seed: byte GPTs (4 x 128) trained with L_CE + lambda L_aux on Shakespeare (single "
             "domain, loss over the batch) and on Shakespeare + Python (cross-domain loss); per-domain perplexity "
             "and dispersion on 512 fixed val chunks",
    "gap": "model selection by the dispersion gap G = within(T) + between(T, T') of the output matrix: byte GPTs of "
           "three sizes, each trained on Shakespeare with 20%, 35% or 50% of its bytes arithmetic, measured at equal "
           "iterations (and half-way): exact-match arithmetic accuracy, G, the trivial predictors (iteration, "
           "parameters, arithmetic share, arithmetic perplexity) and label-free accuracy sets",
    "knn": "layer choice for the kNN-LM: Shakespeare byte GPTs (4 x 128, lambda = 0), one per seed: for every layer "
           "and sub-layer, its dispersion and the kNN-LM perplexity with keys from it (temperature and weight tuned "
           "per key space); the authors' rule (the most dispersed) against the best found by search; and the "
           "per-layer Spearman(dispersion, perplexity) at initialisation and trained",
}


def model_flags(S, device="cpu"):
    m = S["model"]
    return ["--tokenizer", "bytes", "--batch_size", str(S["batch_size"]), "--n_layer", str(m["n_layer"]),
            "--n_head", str(m["n_head"]), "--n_embd", str(m["n_embd"]), "--block_size", str(m["block_size"]),
            "--eval_interval", "1000000", "--eval_iters", "2", "--sample_tokens", "0", "--brier_positions", "0",
            "--device", device]


def results_path(part, scale, out):
    return os.path.join(out, f"dispersion_{part}{'' if scale == 'cpu' else '_' + scale}.json")


def results_file(part, scale, out):
    return records.Results(results_path(part, scale, out), f"dispersion_{part}", __name__, DESCRIPTIONS[part])


def flat(report):
    """{run_id: config and metrics in one dict}: what the tables and figures read."""
    return {k: dict(r["config"], **r["metrics"]) for k, r in report["runs"].items()}


# ----------------------------------------------------------------------------- the arithmetic task

def arithmetic_problems(n, seed):
    """n (question, answer) pairs: 'a+b=' or 'a-b=' (a >= b), operands of 1 to 3 digits, answer without '='."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a, b = (int(rng.integers(0, 10 ** int(rng.integers(1, 4)))) for _ in range(2))
        if rng.random() < 0.5:
            out.append((f"{a}+{b}=", str(a + b)))
        else:
            a, b = max(a, b), min(a, b)
            out.append((f"{a}-{b}=", str(a - b)))
    return out


def mixed_file(share, seed=0):
    """Tiny Shakespeare with solved problems ('a+b=c' lines, arithmetic_problems) inserted after its lines so that
    `share` of the bytes is arithmetic, evenly through the text; written once into the cache; returns its path."""
    path = cache_dir() / "dispersion" / f"mixed_{share:g}_{seed}.txt"
    if not path.exists():
        text = load_data("shakespeare", "bytes")
        lines = (bytes(text.split("train").tolist()) + bytes(text.split("val").tolist())).decode().splitlines(True)
        ratio = share / (1 - share)
        problems = iter(arithmetic_problems(int(ratio * sum(map(len, lines)) / 7) + 1000, seed))
        out, prose, arith = [], 0, 0
        for line in lines:
            out.append(line)
            prose += len(line)
            while arith < ratio * prose:
                q, a = next(problems)
                out.append(f"{q}{a}\n")
                arith += len(q) + len(a) + 1
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(out))
    return str(path)


def arithmetic_windows(problems, context=3):
    """One row per question after the first `context`: (x (Q, T), y (Q, T), answer mask (Q, T), question mask
    (Q, T)), right-padded (a causal model never sees what follows). The context is the preceding solved problems."""
    rows = []
    for i in range(context, len(problems)):
        prefix = "\n" + "".join(q + a + "\n" for q, a in problems[i - context:i])
        q, a = problems[i]
        rows.append((prefix, q, a + "\n"))
    T = max(len(p + q + a) for p, q, a in rows) - 1
    x = torch.zeros(len(rows), T, dtype=torch.long)
    y = torch.full((len(rows), T), -1, dtype=torch.long)
    answer, question = torch.zeros(len(rows), T, dtype=torch.bool), torch.zeros(len(rows), T, dtype=torch.bool)
    for r, (p, q, a) in enumerate(rows):
        ids = torch.tensor(list((p + q + a).encode()))
        x[r, :len(ids) - 1], y[r, :len(ids) - 1] = ids[:-1], ids[1:]
        answer[r, len(p + q) - 1:len(p + q + a) - 1] = True   # positions whose next byte is the answer's
        question[r, len(p):len(p + q)] = True                 # the question's own bytes 'a+b='
    return x, y, answer, question


@torch.no_grad()
def arithmetic_correct(model, windows, batch_size=256):
    """(Q,) bool: the question is answered right (argmax = every answer byte and the newline)."""
    x, y, answer, _ = windows
    model.eval()
    out = []
    for lo in range(0, len(x), batch_size):
        logits = model(x[lo:lo + batch_size])[0]
        right = (logits.argmax(-1) == y[lo:lo + batch_size]) | ~answer[lo:lo + batch_size]
        out.append(right.all(1))
    return torch.cat(out)


# ----------------------------------------------------------------------------- measurements

def domain_eval(model, data, n_chunks, block_size):
    """{domain: {'ppl', 'disp'}} on the same n_chunks non-overlapping val chunks of every domain."""
    out = {}
    for domain in data.domains:
        split = "val" if len(data.domains) == 1 else f"val:{domain}"
        batches = dp.chunk_batches(data, split, n_chunks, 64, block_size, seed=0)
        out[domain] = dp.perplexity_and_dispersion(model, batches)
    return out


def sweep_table(rows):
    """[(setting, scope, lambda, domain, n seeds, ppl mean, ppl se, paired change vs lambda 0 mean, se, disp mean)]:
    the change is measured seed by seed against the lambda = 0 run of the same seed (same initialisation and data
    order), so the seed-to-seed spread cancels out of it."""
    base = {(r["setting"], r["seed"]): r for r in rows.values() if r["lam"] == 0}
    groups = {}
    for r in rows.values():
        groups.setdefault((r["setting"], r["scope"] if r["lam"] else "-", r["lam"]), []).append(r)
    table = []
    for (setting, scope, lam), rs in sorted(groups.items(), key=lambda kv: (kv[0][0] != "single", kv[0][2], kv[0][1])):
        for domain in rs[0]["domains"]:
            ppl = [r["domains"][domain]["ppl"] for r in rs]
            delta = [r["domains"][domain]["ppl"] - base[(setting, r["seed"])]["domains"][domain]["ppl"] for r in rs
                     if (setting, r["seed"]) in base]
            table.append((setting, scope, lam, domain, len(rs), *mean_se(ppl), *mean_se(delta),
                          mean_se([r["domains"][domain]["disp"] for r in rs])[0]))
    return table


TASK_TOKENS = [ord(c) for c in DIGITS + OPERATORS]                                     # T: digits and operators
EVERYDAY_TOKENS = [ord(c) for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ ,.'"]  # T': prose bytes


@torch.no_grad()
def question_states(model, windows, batch_size=256):
    """Per question: the dispersion of its own bytes' final-layer states ('a+b=', the paper's segment measure) and
    the final-layer state at its '=' (the state the answer is read from). Returns ((Q,), (Q, d))."""
    x, _, _, question = windows
    model.eval()
    within, last = [], []
    for lo in range(0, len(x), batch_size):
        h = model.hidden_states(x[lo:lo + batch_size])["final"]                         # (b, T, d)
        for row, mask in zip(h, question[lo:lo + batch_size]):
            states = row[mask]                                                          # (n_q, d)
            within.append(dp.dispersion(states))
            last.append(states[-1])
    return torch.stack(within), torch.stack(last)


def accuracy_sets(correct, within, last, set_size, n_sets, seed=0):
    """App. 1, label-free accuracy prediction: sets of set_size questions whose share answered correctly goes
    0, 0.1, .., 1 (n_sets random draws per share), each with two dispersions: the mean of its questions' own
    dispersion ('within') and the dispersion of its questions' '=' states ('across'). None when the model has
    fewer than set_size right or wrong answers."""
    right, wrong = correct.nonzero().flatten(), (~correct).nonzero().flatten()
    if min(len(right), len(wrong)) < set_size:
        return None
    gen, rows = torch.Generator().manual_seed(seed), []
    for share in [i / 10 for i in range(11)]:
        k = round(share * set_size)
        for _ in range(n_sets):
            pick = torch.cat([right[torch.randperm(len(right), generator=gen)[:k]],
                              wrong[torch.randperm(len(wrong), generator=gen)[:set_size - k]]])
            rows.append((share, within[pick].mean().item(), dp.dispersion(last[pick]).item()))
    shares, w, a = zip(*rows)
    return dict(sets=rows, within=correlation(w, shares), across=correlation(a, shares))


def measure_arithmetic(model, windows, S):
    """Accuracy, the dispersion gap, perplexity of the arithmetic windows, and the label-free accuracy sets: over all
    questions, and (a control: right answers are more often short questions) over questions of one length only."""
    correct = arithmetic_correct(model, windows)
    within, last = question_states(model, windows)
    nll = dp.scored_segments(model, [(windows[0], windows[1])])                       # teacher-forced, all bytes
    length = windows[3].sum(1)                                                         # bytes of 'a+b='
    same = length == length.mode().values                                             # the commonest length
    return dict(acc=correct.float().mean().item(), **dp.dispersion_gap(model, TASK_TOKENS, EVERYDAY_TOKENS),
                hidden_disp=within.mean().item(), ppl=(nll[0] * nll[2]).sum().div(nll[2].sum()).exp().item(),
                label_free=accuracy_sets(correct, within, last, S["set_size"], S["share_sets"]),
                label_free_one_length=accuracy_sets(correct[same], within[same], last[same], S["set_size"] // 2,
                                                    S["share_sets"]))


def knn_grid(model, store, tune, test, layer, k=16, scales=(0.1, 0.3, 1, 3, 10), weights=(0.1, 0.25, 0.5)):
    """kNN-LM with keys from `layer`: the temperature (a multiple of the median squared distance to the nearest
    key, so that every key space gets a fair scale) and the interpolation weight are chosen on the tune batches,
    then the perplexity is measured on the test batches, beside the LM's own. Also the dispersion of the key
    space: within test segments (the paper's measure) and over 4096 keys of the datastore as one set."""
    store = dp.build_datastore(model, store, layer)
    tuned, tested = (dp.knn_neighbours(model, b, store, layer, k) for b in (tune, test))
    unit = tuned[0][:, 0].median().clamp_min(1e-12).item()                              # median nearest distance
    w, tau = min(((w, s * unit) for s in scales for w in weights), key=lambda p: dp.knn_mix_perplexity(tuned, *p))
    sample = store[0][torch.randperm(len(store[0]), generator=torch.Generator().manual_seed(0))[:4096]]
    return dict(knn_ppl=dp.knn_mix_perplexity(tested, w, tau), lm_ppl=dp.knn_mix_perplexity(tested, 0.0), tau=tau,
                weight=w, disp_segments=dp.layer_dispersion(model, test)[layer],
                disp_store=dp.dispersion(sample).item(), n_keys=len(store[0]))


def run_knn(cfg, out_dir, S, device="cpu"):
    """A Shakespeare model (lambda = 0): for every layer and sub-layer, the kNN-LM with keys from it (knn_grid) and
    its dispersion; the authors' choice (the most dispersed key space) against the best by kNN-LM perplexity; and
    the layer-wise Spearman(dispersion, perplexity) over perplexity-sampled groups of training chunks, at the run's
    initialisation and trained."""
    data, T = load_data("shakespeare", "bytes"), cfg["block_size"]
    trained = load_model(run_training(train_argv(cfg, out_dir, device)), device)[0]
    torch.manual_seed(cfg["seed"])
    init = type(trained)(trained.config).eval()                                   # a fresh initialisation
    store = dp.chunk_batches(data, "train", S["store_chunks"], 64, T, seed=1, device=device)
    x, y = (torch.cat(t) for t in zip(*dp.chunk_batches(data, "val", S["tune_chunks"] + S["test_chunks"], 64, T,
                                                         seed=2, device=device)))
    tune, test = [(x[:S["tune_chunks"]], y[:S["tune_chunks"]])], [(x[S["tune_chunks"]:], y[S["tune_chunks"]:])]
    with dp.eval_mode(trained):
        names = dp.layer_names(trained.hidden_states(x[:1]))
    layers = {name: knn_grid(trained, store, tune, test, name) for name in names if name != "layers.0"}
    chosen = max(layers, key=lambda k: layers[k]["disp_segments"])
    best = min(layers, key=lambda k: layers[k]["knn_ppl"])
    segments = dp.chunk_batches(data, "train", S["seg_chunks"], 64, T, seed=0, device=device)
    layerwise = {}
    for label, model in (("init", init), ("trained", trained)):
        corr, g_ppl = dp.layer_correlations(model, segments, S["group"], S["n_groups"])
        layerwise[label] = dict(spearman=corr, group_ppl=g_ppl.tolist())
    ranks = correlation([v["disp_segments"] for v in layers.values()], [v["knn_ppl"] for v in layers.values()])
    return dict(layers=layers, most_dispersed=chosen, best=best, lm_ppl=layers[best]["lm_ppl"],
                spearman_disp_vs_knn_ppl=ranks["spearman"], layerwise=layerwise)


def gap_family(report, final_only=True):
    """The measured models of the gap part, one dict per (run, snapshot): {name, iter, params, share, seed, acc, gap,
    within, between, hidden_disp, ppl, label_free ...}; final_only: the snapshots at the run's last iteration."""
    out = []
    for run_id, r in flat(report).items():
        for snap in r["snapshots"][-1:] if final_only else r["snapshots"]:
            out.append(dict(snap, name=f"{run_id} @ {snap['iter']}", params=r["params_non_embedding"],
                            share=r["share"], seed=r["seed"], n_layer=r["n_layer"], n_embd=r["n_embd"]))
    return out


PREDICTORS = {"gap": "dispersion gap G (no labels)", "within": "within(T) alone", "between": "between(T, T') alone",
              "hidden_disp": "question-state dispersion (no labels)", "iter": "training iteration",
              "params": "parameters", "share": "arithmetic share of the training data",
              "neg_ppl": "minus the arithmetic perplexity (uses the answers)"}


def predictor_table(models):
    """{predictor: Spearman with accuracy} over the models (None where the predictor is constant over them)."""
    acc = [m["acc"] for m in models]
    out = {}
    for key in PREDICTORS:
        values = [-m["ppl"] if key == "neg_ppl" else m[key] for m in models]
        out[key] = None if len(set(values)) < 2 or len(set(acc)) < 2 else correlation(values, acc)["spearman"]
    return out


# ----------------------------------------------------------------------------- the parts

def sweep_runs(S, scale):
    """[(run_id, config)]: lambda 0 is plain NTP (its scope is irrelevant); seed by seed."""
    runs = [(setting, "batch" if setting == "single" or lam == 0 else "cross_domain", lam, seed)
            for seed in S["seeds"] for setting in ("single", "cross") for lam in S["lams"]]
    runs += [(setting, scope, lam, seed) for seed in S["seeds"] for setting, scope, lam in S["extra"]]
    return [(f"{setting}_{scope}_{lam}_{seed}",
             dict(part="sweep", scale=scale, setting=setting, scope=scope, lam=lam, seed=seed, iters=S["iters"],
                  batch_size=S["batch_size"], **S["model"], eval_chunks=S["eval_chunks"]))
            for setting, scope, lam, seed in runs]


def gap_runs(S, scale):
    g = S["gap"]
    return [(f"{L}x{d}_share{share:g}_s{seed}",
             dict(part="gap", scale=scale, n_layer=L, n_embd=d, n_head=max(1, d // 32), share=share, seed=seed,
                  iters=g["iters"], snapshots=[g["iters"] // 2, g["iters"]], batch_size=S["batch_size"],
                  block_size=max(64, S["model"]["block_size"]), problems=g["problems"]))
            for seed in g["seeds"] for share in g["shares"] for L, d in g["sizes"]]


def knn_runs(S, scale):
    return [(f"shakespeare_{S['model']['n_layer']}x{S['model']['n_embd']}_s{seed}",
             dict(part="knn", scale=scale, seed=seed, iters=S["iters"], batch_size=S["batch_size"], **S["model"]))
            for seed in S["knn"]["seeds"]]


RUNS = {"sweep": sweep_runs, "gap": gap_runs, "knn": knn_runs}


def train_argv(cfg, out_dir, device="cpu"):
    """train.py flags of a run (every part trains byte GPTs; the sweep's with the dispersion loss)."""
    S = dict(model={k: cfg[k] for k in ("n_layer", "n_head", "n_embd", "block_size")}, batch_size=cfg["batch_size"])
    argv = ["--objective", "dispersion" if cfg["part"] != "gap" else "ntp", "--seed", str(cfg["seed"]), "--out_dir",
            out_dir] + model_flags(S, device)
    if cfg["part"] == "sweep":
        return argv + ["--dataset", DATASETS[cfg["setting"]], "--dispersion_weight", str(cfg["lam"]),
                       "--dispersion_scope", cfg["scope"], "--max_iters", str(cfg["iters"]), "--overwrite"]
    if cfg["part"] == "gap":
        return argv + ["--dataset", f"file:{mixed_file(cfg['share'])}"]
    return argv + ["--dataset", "shakespeare", "--dispersion_weight", "0", "--max_iters", str(cfg["iters"]),
                   "--overwrite"]


def run_sweep(cfg, out_dir, S, device="cpu"):
    model = load_model(run_training(train_argv(cfg, out_dir, device)), device)[0]
    return dict(domains=domain_eval(model, load_data(DATASETS[cfg["setting"]], "bytes"), cfg["eval_chunks"],
                                    cfg["block_size"]))


def run_gap(cfg, out_dir, S, device="cpu"):
    """The run's snapshots (half-way and the end), each measured on the held-out arithmetic questions."""
    windows = arithmetic_windows(arithmetic_problems(cfg["problems"], seed=1))
    rows = train_with_snapshots(train_argv(cfg, out_dir, device), cfg["snapshots"],
                                lambda m: measure_arithmetic(m, windows, S), device)
    params = sum(p.numel() for n, p in rows[-1]["model"].named_parameters() if "wte" not in n and "wpe" not in n)
    return dict(params_non_embedding=params, snapshots=[{k: v for k, v in r.items() if k != "model"} for r in rows])


def run_one(part, run_id, cfg, S, out, work, device="cpu", log=print, reuse_stale=False):
    """Train and measure one run unless the part's results file already holds it for this code and config."""
    code = records.code_hash([__name__])
    if results_file(part, cfg["scale"], out).reusable(run_id, cfg, code, reuse_stale) is not None:
        return False
    prov = records.provenance(cfg, [__name__], device)
    out_dir = os.path.join(work, part, run_id)
    log(f"{part} {run_id}: training into {out_dir}")
    metrics = {"sweep": run_sweep, "gap": run_gap, "knn": run_knn}[part](cfg, out_dir, S, device)
    record = dict(config=cfg, metrics=metrics, provenance=records.finish(prov))
    with records.Locked(results_path(part, cfg["scale"], out)):
        results_file(part, cfg["scale"], out).add(run_id, record)
    log(f"{part} {run_id}: done in {record['provenance']['wall_seconds']:.0f}s")
    return True


def run(part, scale="cpu", out=None, work=None, device="cpu", log=print, shard=(0, 1), only=None,
        reuse_stale=False):
    """Run (this shard of) one part, or 'all'; returns {part: the results file's data}."""
    if scale not in SCALES:
        raise UserError(f"unknown scale {scale!r}: choose from {', '.join(SCALES)}")
    if part not in PARTS + ("all",):
        raise UserError(f"unknown part {part!r}: choose from {', '.join(PARTS)} or all")
    S, out = SCALES[scale], out or os.path.join(ROOT, "results")
    work = work or os.path.join(ROOT, "out", "dispersion", scale)
    reports = {}
    for p in PARTS if part == "all" else (part,):
        runs = [(i, c) for i, c in RUNS[p](S, scale) if only is None or re.search(only, i)][shard[0]::shard[1]]
        for run_id, cfg in runs:
            try:
                run_one(p, run_id, cfg, S, out, work, device, log, reuse_stale)
            except UserError as e:  # say so and go on with the next run
                log(f"{p} {run_id}: failed: {e}")
        reports[p] = results_file(p, scale, out).data
    return reports


# ----------------------------------------------------------------------------- bench verify

def rerun(experiment, run_id, record, work):
    """bench verify: the run again, from nothing, in `work` (its results file there too); returns its record."""
    part, cfg = experiment.removeprefix("dispersion_"), record["config"]
    run_one(part, run_id, cfg, SCALES[cfg["scale"]], work, work, log=lambda *a: None)
    return results_file(part, cfg["scale"], work).data["runs"][run_id]


def compared(record):
    """What bench verify compares, each with the noise allowed when the thread count differs (1% of a perplexity,
    0.02 of a dispersion or an accuracy): sweep, every domain's perplexity and dispersion; gap, the last snapshot's
    accuracy, G and arithmetic perplexity; knn, every key space's kNN-LM perplexity and dispersion."""
    m, part = record["metrics"], record["config"]["part"]
    if part == "sweep":
        return dict({f"ppl {d}": (v["ppl"], 0.01 * v["ppl"]) for d, v in m["domains"].items()},
                    **{f"disp {d}": (v["disp"], 0.02) for d, v in m["domains"].items()})
    if part == "gap":
        last = m["snapshots"][-1]
        return {"acc": (last["acc"], 0.02), "gap": (last["gap"], 0.02), "ppl": (last["ppl"], 0.01 * last["ppl"])}
    return dict({f"knn ppl {k}": (v["knn_ppl"], 0.01 * v["knn_ppl"]) for k, v in m["layers"].items()},
                **{f"disp {k}": (v["disp_segments"], 0.02) for k, v in m["layers"].items()})


# ----------------------------------------------------------------------------- command line

def main(argv=None):
    p = OneLineParser(prog="python -m bench dispersion", description=__doc__.splitlines()[0])
    p.add_argument("part", choices=list(PARTS) + ["all"])
    p.add_argument("--scale", choices=list(SCALES), default="cpu")
    p.add_argument("--out", default=os.path.join(ROOT, "results"), help="folder of dispersion_<part>.json")
    p.add_argument("--work", default=None, help="folder of the checkpoints (default out/dispersion/<scale>)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--shard", default="0/1", help="I/N: every N-th run starting at run I")
    p.add_argument("--only", default=None, help="only the runs whose id matches this regular expression")
    p.add_argument("--reuse_stale", action="store_true", help="keep finished runs of other code, marked stale")
    a = p.parse_args(argv)
    m = records.shard(a.shard)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    run(a.part, a.scale, a.out, a.work, a.device, lambda s: print(s, flush=True), m, a.only,
        a.reuse_stale)


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
