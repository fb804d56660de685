"""Experiments for dispersion.py (tutorials/dispersion.ipynb reads what they write; nothing here is asserted by a
test's clock). Each part writes results/dispersion_<part>.json (cpu scale; _gpu for gpu; smoke writes nothing) row by
row, so an interrupted run resumes where it stopped; checkpoints go to --out_dir.

    python -m bench dispersion sweep      [--scale smoke|cpu|gpu]  lambda x scope x seed grid, single vs cross-domain
    python -m bench dispersion arithmetic [--scale ...]  gap G vs accuracy over 12 models; label-free accuracy sets
    python -m bench dispersion layers_knn [--scale ...]  per-layer Spearman(dispersion, ppl); kNN-LM key spaces

The arithmetic task (a digit-heavy text domain, byte tokens): lines 'a+b=c' / 'a-b=c' with 1- to 3-digit operands,
mixed half and half with Shakespeare (--dataset shakespeare+file:<cache>/dispersion/arithmetic.txt). Accuracy is
exact match: a question (three solved held-out problems as context, then 'a+b=') counts as right when the model's
argmax is the answer's every byte and the closing newline, i.e. exactly when greedy decoding writes the answer.
"""
import json
import os
import sys
import time

import numpy as np
import torch

import dispersion as dp
import runtime
import trainer
from data import cache_dir, load_data
from objectives import load_model
from runtime import OneLineParser, UserError, correlation, mean_se

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPERATORS = "+-="
DIGITS = "0123456789"


# ----------------------------------------------------------------------------- training drivers

def run_training(argv, quiet=True):
    """trainer.main(argv), its printout captured when quiet; returns the checkpoint path. UserError if it fails."""
    trainer.run_quietly(argv) if quiet else trainer.main(argv)
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


def arithmetic_file(n_problems=120_000, seed=0):
    """The task's training text (one solved problem per line), written once into the cache; returns its path."""
    path = cache_dir() / "dispersion" / f"arithmetic_{n_problems}_{seed}.txt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"{q}{a}\n" for q, a in arithmetic_problems(n_problems, seed)))
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


# ----------------------------------------------------------------------------- shared set-up

SCALES = {  # model, run length, grid and measurement sizes per scale
    "smoke": dict(model=dict(n_layer=2, n_head=2, n_embd=32, block_size=32), batch_size=4, iters=12,
                  lams=[0, 0.1], seeds=[1, 2], extra=[], eval_chunks=8,
                  family=dict(sizes=[(1, 16)], snaps=[4, 8, 12], problems=40), seg_chunks=48, group=4, n_groups=6,
                  store_chunks=4, tune_chunks=1, test_chunks=1, share_sets=2, set_size=4),
    "cpu": dict(model=dict(n_layer=4, n_head=4, n_embd=128, block_size=128), batch_size=8, iters=1000,
                lams=[0, 0.001, 0.01, 0.1], seeds=[1, 2, 3],
                extra=[("cross", "batch", 0.1), ("cross", "cross_domain", 1.0)],
                eval_chunks=512, family=dict(sizes=[(2, 64), (3, 96), (4, 128)], snaps=[500, 1000, 2000, 3000],
                                             problems=6003),
                seg_chunks=6400, group=50, n_groups=40, store_chunks=512, tune_chunks=16, test_chunks=32,
                share_sets=10, set_size=100),
}
SCALES["gpu"] = dict(SCALES["cpu"], model=dict(n_layer=6, n_head=6, n_embd=384, block_size=256), batch_size=32,
                     iters=3000, eval_chunks=1024, store_chunks=2048, tune_chunks=32, test_chunks=64,
                     family=dict(sizes=[(2, 128), (4, 256), (6, 384)], snaps=[500, 1000, 2000, 4000], problems=6003))
# (the gpu scale has not been run: no GPU in the session that wrote this)
DATASETS = {"single": "shakespeare", "cross": "shakespeare+pystdlib"}


def model_flags(S, device="cpu"):
    m = S["model"]
    return ["--tokenizer", "bytes", "--batch_size", str(S["batch_size"]), "--n_layer", str(m["n_layer"]),
            "--n_head", str(m["n_head"]), "--n_embd", str(m["n_embd"]), "--block_size", str(m["block_size"]),
            "--eval_interval", "1000000", "--eval_iters", "2", "--sample_tokens", "0", "--brier_positions", "0",
            "--device", device]


class Results:
    """results/dispersion_<part>.json as a dict of rows, written after every row (an interrupted run resumes)."""

    def __init__(self, part, scale, out=None):
        suffix = "" if scale == "cpu" else f"_{scale}"
        self.path = out or os.path.join(ROOT, "results", f"dispersion_{part}{suffix}.json")
        self.rows = {}
        if scale != "smoke" and os.path.exists(self.path):
            with open(self.path) as f:
                self.rows = json.load(f)["rows"]
        self.part, self.scale = part, scale

    def get(self, key, compute):
        if key not in self.rows:
            t = time.time()
            self.rows[key] = dict(compute(), seconds=round(time.time() - t, 1))
            if self.scale != "smoke":
                os.makedirs(os.path.dirname(self.path), exist_ok=True)
                with open(self.path + ".tmp", "w") as f:
                    json.dump(dict(part=self.part, scale=self.scale, hardware=HARDWARE, rows=self.rows), f, indent=1)
                os.replace(self.path + ".tmp", self.path)
        return self.rows[key]


HARDWARE = "2-core x86-64 CPU sandbox, shared with other jobs, OMP_NUM_THREADS=1, torch " + torch.__version__


# ----------------------------------------------------------------------------- part 2: the lambda sweep

def domain_eval(model, data, n_chunks, block_size):
    """{domain: {'ppl', 'disp'}} on the same n_chunks non-overlapping val chunks of every domain."""
    out = {}
    for domain in data.domains:
        split = "val" if len(data.domains) == 1 else f"val:{domain}"
        batches = dp.chunk_batches(data, split, n_chunks, 64, block_size, seed=0)
        out[domain] = dp.perplexity_and_dispersion(model, batches)
    return out


def sweep_runs(S):
    """(setting, scope, lambda, seed) of every run: lambda 0 is plain NTP (its scope is irrelevant)."""
    runs = [(setting, "batch" if setting == "single" or lam == 0 else "cross_domain", lam, seed)
            for seed in S["seeds"] for setting in ("single", "cross") for lam in S["lams"]]  # seed by seed
    return runs + [(setting, scope, lam, seed) for seed in S["seeds"] for setting, scope, lam in S["extra"]]


def sweep(scale="cpu", out_dir="out/dispersion", results=None, device="cpu", log=print):
    """Part 2: every run of sweep_runs, trained with train.py, evaluated per domain on fixed val chunks."""
    S, R = SCALES[scale], Results("sweep", scale, results)
    for setting, scope, lam, seed in sweep_runs(S):
        name = f"{setting}_{scope}_{lam}_{seed}"

        def run():
            argv = ["--objective", "dispersion", "--dataset", DATASETS[setting], "--dispersion_weight", str(lam),
                    "--dispersion_scope", scope, "--seed", str(seed), "--max_iters", str(S["iters"]),
                    "--out_dir", os.path.join(out_dir, "sweep", name), "--overwrite"] + model_flags(S, device)
            path = os.path.join(out_dir, "sweep", name, "ckpt.pt")
            if not (os.path.exists(path) and runtime.load_checkpoint(path)["iter"] == S["iters"]):  # else: finished
                run_training(argv)
            model = load_model(path, device)[0]
            return dict(setting=setting, scope=scope, lam=lam, seed=seed,
                        domains=domain_eval(model, load_data(DATASETS[setting], "bytes"), S["eval_chunks"],
                                            S["model"]["block_size"]))
        row = R.get(name, run)
        log(f"{name}: " + ", ".join(f"{d} ppl {v['ppl']:.3f} disp {v['disp']:.3f}" for d, v in row["domains"].items()))
    return R.rows




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


# ----------------------------------------------------------------------------- parts 1 and 5: arithmetic

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


def arithmetic(scale="cpu", out_dir="out/dispersion", results=None, device="cpu", log=print):
    """Parts 1 and 5: models of several sizes trained on Shakespeare + arithmetic, measured at several
    iterations: accuracy, the dispersion gap G of their output matrix, and the label-free accuracy sets."""
    S, R = SCALES[scale], Results("arithmetic", scale, results)
    fam = S["family"]
    path = arithmetic_file(2000 if scale == "smoke" else 120_000)
    windows = arithmetic_windows(arithmetic_problems(fam["problems"], seed=1))
    for n_layer, n_embd in fam["sizes"]:
        name = f"{n_layer}x{n_embd}"

        def run():
            argv = ["--objective", "ntp", "--dataset", f"shakespeare+file:{path}", "--seed", "1",
                    "--out_dir", os.path.join(out_dir, "arithmetic", name)] + model_flags(S, device) + \
                   ["--n_layer", str(n_layer), "--n_embd", str(n_embd), "--n_head", str(max(1, n_embd // 32)),
                    "--block_size", str(max(64, S["model"]["block_size"]))]  # a question with its context fits
            rows = train_with_snapshots(argv, fam["snaps"], lambda m: measure_arithmetic(m, windows, S), device)
            return dict(snapshots=[{k: v for k, v in r.items() if k != "model"} for r in rows])
        for r in R.get(name, run)["snapshots"]:
            log(f"{name} iter {r['iter']}: accuracy {r['acc']:.3f}, G {r['gap']:.4f} (within {r['within']:.4f}, "
                f"between {r['between']:.4f}), arithmetic ppl {r['ppl']:.3f}")
    return R.rows


def family(rows):
    """The models of the arithmetic part as one list of dicts with their name ('4x128 @ 600')."""
    return [dict(r, name=f"{size} @ {r['iter']}") for size, row in rows.items() for r in row["snapshots"]]


# ----------------------------------------------------------------------------- parts 3 and 4: layers, kNN-LM

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


def layers_knn(scale="cpu", out_dir="out/dispersion", results=None, device="cpu", log=print):
    """Parts 3 and 4 on the single-domain lambda = 0 model of the sweep (seed 1; trained here when absent) and its
    initialisation: per layer and sub-layer Spearman(dispersion, perplexity) over perplexity-sampled groups of
    chunks of the training text (the authors use 100k chunks of their corpus: our val split is too small for groups
    of 50); kNN-LM perplexity with keys from the last layer's sub-layers beside each key space's dispersion."""
    S, R = SCALES[scale], Results("layers_knn", scale, results)
    T, L, m = S["model"]["block_size"], S["model"]["n_layer"], {}

    def setup():  # models and text, only when a row is missing
        if not m:
            data = load_data("shakespeare", "bytes")
            path = os.path.join(out_dir, "sweep", "single_batch_0_1", "ckpt.pt")
            if not os.path.exists(path):
                run_training(["--objective", "dispersion", "--dataset", "shakespeare", "--dispersion_weight", "0",
                              "--seed", "1", "--max_iters", str(S["iters"]), "--out_dir", os.path.dirname(path),
                              "--overwrite"] + model_flags(S, device))
            m["trained"] = load_model(path, device)[0]
            torch.manual_seed(1)
            m["init"] = type(m["trained"])(m["trained"].config).eval()                  # a fresh initialisation
            m["segments"] = dp.chunk_batches(data, "train", S["seg_chunks"], 64, T, seed=0, device=device)
            m["store"] = dp.chunk_batches(data, "train", S["store_chunks"], 64, T, seed=1, device=device)
            x, y = (torch.cat(t) for t in zip(*dp.chunk_batches(data, "val", S["tune_chunks"] + S["test_chunks"],
                                                                 64, T, seed=2, device=device)))
            m["tune"], m["test"] = [(x[:S["tune_chunks"]], y[:S["tune_chunks"]])], [(x[S["tune_chunks"]:],
                                                                                     y[S["tune_chunks"]:])]
        return m

    def layerwise():
        out = {}
        for label in ("init", "trained"):
            corr, g_ppl = dp.layer_correlations(setup()[label], m["segments"], S["group"], S["n_groups"])
            out[label] = dict(spearman=corr, group_ppl=g_ppl.tolist())
        return out
    lw = R.get("layerwise", layerwise)
    for label in ("init", "trained"):
        log(f"{label}: " + "  ".join(f"{k} {v:+.2f}" for k, v in lw[label]["spearman"].items()))
    for layer in (f"attn.{L - 1}", f"ffn_in.{L - 1}", f"mlp.{L - 1}", f"layers.{L}", "final"):
        r = R.get(f"knn {layer}", lambda: knn_grid(setup()["trained"], m["store"], m["tune"], m["test"], layer))
        log(f"kNN-LM keys {layer}: ppl {r['knn_ppl']:.3f} (LM {r['lm_ppl']:.3f}), dispersion {r['disp_segments']:.3f} "
            f"within segments, {r['disp_store']:.3f} over the datastore")
    return R.rows


# ----------------------------------------------------------------------------- command line

PARTS = {"sweep": sweep, "arithmetic": arithmetic, "layers_knn": layers_knn}


def main(argv=None):
    p = OneLineParser(description=__doc__.splitlines()[0])
    p.add_argument("part", choices=list(PARTS) + ["all"])
    p.add_argument("--scale", choices=list(SCALES), default="cpu")
    p.add_argument("--out_dir", default="out/dispersion")
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    for name in (PARTS if a.part == "all" else [a.part]):
        PARTS[name](a.scale, os.path.join(a.out_dir, a.scale), None, a.device)


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
