"""CALM's experiments at `cpu` scale: the recipe sweep, the performance-compute curves, the generative heads and
temperature. Every run is train.py in resumed stages, scored after each stage; every point is appended at once to
results/calm_<experiment>.json (so a cut run keeps what it measured) and a run already there is skipped.

    python -m bench calm run EXPERIMENT [--shard I/N] [--only REGEX] [--dry]     (EXPERIMENT: see EXPERIMENTS)
    python -m bench calm list                                                  what each experiment trains

Runs go to out/calm_runs/<experiment>/<run>/ (checkpoints, git-ignored); --shard I/N takes every N-th run, so two
processes (OMP_NUM_THREADS=1 each) split one experiment. Autoencoders are shared by every run with the same K
(out/calm_runs/autoencoders/K<K>/, trained once under a file lock).
"""
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import fields
from types import SimpleNamespace

import torch

import brierlm
import calm
import objectives
import trainer
from data import load_data
from objectives import load_model
from runtime import OneLineParser, UserError, load_checkpoint, to_argv

from bench import calm_experiments, records
from bench.common import architecture
from bench.flops import ae_flops_per_token, train_flops_per_token

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORK = os.path.join(ROOT, "out", "calm_runs")
RESULTS = os.path.join(ROOT, "results")
DATA = dict(dataset="shakespeare", tokenizer="bytes", block_size=128, batch_size=16)
SIZES = {"4x128": dict(n_layer=4, n_head=4, n_embd=128), "6x192": dict(n_layer=6, n_head=6, n_embd=192),
         "1x32": dict(n_layer=1, n_head=2, n_embd=32, block_size=32)}


def flags_for(size, objective, seed=0, **extra):
    return {"objective": objective, "seed": 1337 + seed, **DATA, **SIZES[size], **extra}


def schedule(lr, kind, warmup=100):
    """'const': linear warm-up then constant (the authors' schedule); 'cos': cosine to lr / 10 at the end."""
    return dict(learning_rate=lr, warmup_iters=warmup, min_lr=lr if kind == "const" else lr / 10)


def architecture_of(flags):
    """(model with random weights, args, objective) of a run's flags, as train.py builds them (no data, no AE)."""
    return architecture(flags)


def iters_for(flags, budget):
    """Iterations of the run `flags` that spend `budget` training FLOPs (bench.train_flops_per_token)."""
    model, args, _ = architecture_of(flags)
    per_iter = train_flops_per_token(model, args.block_size, getattr(args, "num_samples", 8)) * args.batch_size * \
        args.block_size
    return max(4, round(budget / per_iter))


def ntp_flops(size, iters):
    """Training FLOPs of `iters` NTP iterations at a backbone size: the budget every run of a comparison gets."""
    flags = flags_for(size, "ntp")
    T = flags["block_size"]
    return train_flops_per_token(architecture_of(flags)[0], T) * iters * flags["batch_size"] * T


def on_budget(name, flags, budget, fractions=(0.25, 0.5, 1.0)):
    iters = iters_for(flags, budget)
    return name, flags, sorted({max(1, round(f * iters)) for f in fractions})


def recipe_sweep():
    """The sweep behind the recipe, at 4 x 128, K = 4, each run scored at 3.5e12 and 7e12 training FLOPs (what 300
    and 600 NTP iterations spend): the head's width w / blocks H / samples N at lr 1e-3 constant; then, with the
    w = 64, H = 2, N = 8 head, the learning rate, the head's own learning rate (x3, x10), the schedule (cosine to
    lr / 10) and a smaller latent (16, its own autoencoder); NTP's learning rate beside it (cosine, its default)."""
    budget = ntp_flops("4x128", 600)
    const = schedule(1e-3, "const")
    runs = [on_budget(f"calm K=4 head w={w} H={H} N={N}", flags_for("4x128", "calm", chunk_size=4, head_dim=w,
                                                                     head_layers=H, num_samples=N, **const),
                      budget, (0.5, 1.0)) for w, H, N in ((128, 2, 8), (64, 2, 8), (64, 1, 8), (64, 2, 4))]
    head = dict(head_dim=64, head_layers=2, num_samples=8)
    for lr, kind in ((2e-3, "const"), (5e-4, "const")):
        runs.append(on_budget(f"calm K=4 lr={lr:g} {kind}", flags_for("4x128", "calm", chunk_size=4, **head,
                                                                       **schedule(lr, kind)), budget, (0.5, 1.0)))
    for scale, kind in ((3.0, "const"), (10.0, "const"), (3.0, "cos")):
        runs.append(on_budget(f"calm K=4 head lr x{scale:g}" + (" cos" if kind == "cos" else ""), flags_for(
            "4x128", "calm", chunk_size=4, **head, **schedule(1e-3, kind), head_lr_scale=scale), budget, (0.5, 1.0)))
    runs.append(on_budget("calm K=4 head lr x3 latent 16", flags_for("4x128", "calm", chunk_size=4, **head, **const,
                                                                     head_lr_scale=3.0, latent_dim=16), budget,
                          (0.5, 1.0)))
    for lr in (1e-3, 3e-3):
        runs.append(on_budget(f"ntp lr={lr:g} cos", flags_for("4x128", "ntp", **schedule(lr, "cos")), budget,
                              (0.5, 1.0)))
    return runs


def recipe_6x192():
    """Is the 4 x 128 recipe what 6 x 192 needs? CALM K = 4, seed 0, on curves_6x192's budget (400 NTP iterations),
    at learning rates 2.5e-4, 5e-4 and 2e-3 beside the recipe's 1e-3 (curves_6x192, seeds 0-2); 5e-4 with 3 seeds."""
    budget = ntp_flops("6x192", 400)
    runs = [(lr, 0) for lr in (5e-4, 2e-3, 2.5e-4)] + [(5e-4, 1), (5e-4, 2)]
    return [on_budget(f"calm K=4 lr={lr:g} const" + (f" seed {seed}" if seed else ""), flags_for(
        "6x192", "calm", seed, **{**CALM_RECIPE, **schedule(lr, "const")}), budget, (0.5, 1.0)) for lr, seed in runs]


# the recipe (chosen by the sweep above; calm.py's defaults and train.py's `--objective calm` use the same values)
CALM_RECIPE = dict(chunk_size=4, **schedule(objectives.RECIPE["learning_rate"], "const",
                                            objectives.RECIPE["warmup_iters"]),
                   **{k: getattr(calm.HeadConfig, k) for k in ("head_dim", "head_layers", "num_samples")},
                   head_lr_scale=objectives.CALMFlags.head_lr_scale)
NTP_RECIPE = schedule(3e-3, "cos")  # the better of 1e-3 and 3e-3 in the sweep
FRACTIONS = (1 / 8, 1 / 4, 1 / 2, 1)
CURVES = {"4x128": dict(ntp_iters=600, seeds={4: 3, 2: 3, 1: 3}),
          "6x192": dict(ntp_iters=400, seeds={4: 3}),
          "1x32": dict(ntp_iters=8, seeds={4: 2, 1: 1}, fractions=(1 / 2, 1))}  # smoke: the notebook in the tests


def curves(size):
    """NTP and CALM (K and seeds: CURVES[size]) at one backbone size, on the budget of ntp_iters NTP iterations.
    CALM (constant rate) is scored at 1/8, 1/4, 1/2 and all of it along one run per seed; NTP (cosine) gets one
    run per budget, each annealed to its end, so that every NTP point is its best at that compute."""
    c = CURVES[size]
    budget, fractions = ntp_flops(size, c["ntp_iters"]), c.get("fractions", FRACTIONS)
    runs = [(f"ntp {f:g}", flags_for(size, "ntp", **NTP_RECIPE), [max(1, round(f * c["ntp_iters"]))])
            for f in fractions]
    for seed in range(max(c["seeds"].values())):
        for K, n in c["seeds"].items():
            if seed < n:
                runs.append(on_budget(f"calm K={K} seed {seed}", flags_for(size, "calm", seed, **{
                    **CALM_RECIPE, "chunk_size": K}), budget, fractions))
    return runs


def head_runs(size, seeds=2):
    """Flow matching and diffusion heads (and the MSE ablation, seed 0) on the same backbone, data and iterations
    as the energy head of curves_<size> (its seeds 0, 1, ..), K = 4: the paper's generative-head comparison."""
    energy = flags_for(size, "calm", 0, **CALM_RECIPE)
    iters = iters_for(energy, ntp_flops(size, CURVES[size]["ntp_iters"]))
    points = sorted({max(1, round(f * iters)) for f in FRACTIONS})
    return [(f"{head} seed {s}", flags_for(size, "calm", s, **CALM_RECIPE, head=head), points)
            for s in range(seeds) for head in ("flow", "diffusion")] + \
        [("mse seed 0", flags_for(size, "calm", 0, **CALM_RECIPE, head="mse"), points)]


def head_steps(name, spec):
    """After training: Brier-n at several sampling-step counts (a flow midpoint step is 2 network calls)."""
    flow = name.startswith("flow")
    steps = spec["steps"]["flow" if flow else "diffusion"] if name.startswith(("flow", "diffusion")) else []

    def measure(model, args, data):
        out = {}
        for n in steps:
            model.head.steps = n
            out[str(n)] = dict(calls=n * (1 + flow), **calm_experiments.brier_scores(model, data, args,
                                                                                     spec["post_positions"]))
        return {"steps": out, "samples": calm_experiments.continuations(model, args), "distinct2":
                calm_experiments.distinct_ngrams(model, data, args, n_prompts=spec["prompts"])}
    return measure


TEMPERATURES = [1.0, 0.8, 0.6, 0.5, 0.4, 0.3, 0.25]


def temperature_curve(name, spec):
    """After training (the last NTP; CALM K = 4 seeds 0 and 1): quality and diversity of samples across T (CALM:
    the batch sampler at every T, the exact one at T = 0.5; at T = 0.8 the exact sampler's Bernoulli factory needs
    about p^(a - 1) coin flips for a chunk of probability p (1/T = 1 + a), far too many for 4-byte chunks)."""
    if name not in ("ntp 1", "calm K=4 seed 0", "calm K=4 seed 1"):
        return None

    def measure(model, args, data):
        out = {}
        for T in spec["temperatures"]:
            for sampler in ("batch", "exact") if name.startswith("calm") and T == 0.5 else ("batch",):
                out[f"{T:g}" + ("" if sampler == "batch" else " exact")] = dict(
                    T=T, sampler=sampler, distinct2=calm_experiments.distinct_ngrams(
                        model, data, args, T, n_prompts=spec["prompts"], sampler=sampler),
                    **calm_experiments.tempered_accuracy(model, data, args, T, spec["post_positions"], sampler=sampler))
        return {"temperature": out, "samples": calm_experiments.continuations(model, args)}
    return measure


# ----------------------------------------------------------------------------- issue 23: the headline on a large corpus

# The 4 x 128 recipe on Python source (pystdlib bytes): chosen by recipe_pystdlib (CALM's learning rate, NTP's)
CALM_CODE = dict(CALM_RECIPE)
NTP_CODE = dict(NTP_RECIPE)
# budgets are multiples of the base: ntp_iters NTP iterations (4 x 128: 1,200 iterations of 16 x 128 = 1.4e13 FLOPs)
SCALING = {"4x128": dict(dataset="pystdlib", ntp_iters=1200, budgets=(1 / 8, 1 / 4, 1 / 2, 1, 2, 4, 8), seeds=2),
           "1x32": dict(dataset="shakespeare", ntp_iters=64, budgets=(1 / 4, 1 / 2, 1), seeds=1)}  # smoke: the tests


def check_budgets(budgets):
    """The budgets as a list: positive, finite and increasing, or a one-line UserError."""
    b = list(budgets)
    if not b or not all(isinstance(x, (int, float)) and math.isfinite(x) and x > 0 for x in b) or \
            any(y <= x for x, y in zip(b, b[1:])):
        raise UserError(f"--budgets must be increasing positive multiples of the base budget, got "
                        f"{','.join(f'{x:g}' if isinstance(x, (int, float)) else repr(x) for x in b) or 'none'}")
    return b


def scaling(size, budgets=None, dataset=None):
    """CALM K = 4 against NTP at equal training FLOPs on a corpus neither model repeats much (Python source,
    pystdlib bytes), at budgets from 1/8 to 8 times the base (1.4e13 FLOPs at 4 x 128): per seed, one CALM run
    (the recipe's constant learning rate) scored and checkpointed at every budget, and one NTP run per budget, each
    annealed (cosine) to its end. Seeds pair CALM and NTP; NTP is scored with its exact Brier-1, CALM from two
    samples per position, both at 4,096 held-out positions; every point records the epochs seen."""
    s = SCALING[size]
    budgets, dataset = check_budgets(budgets or s["budgets"]), dataset or s["dataset"]
    base = ntp_flops(size, s["ntp_iters"])
    runs = []
    for seed in range(s["seeds"]):
        energy = flags_for(size, "calm", seed, dataset=dataset, **CALM_CODE)
        runs.append((f"calm K=4 seed {seed}", energy, sorted({iters_for(energy, b * base) for b in budgets})))
        runs += [(f"ntp x{b:g} seed {seed}", flags_for(size, "ntp", seed, dataset=dataset, **NTP_CODE),
                  [max(1, round(b * s["ntp_iters"]))]) for b in budgets]
    return runs


def recipe_pystdlib():
    """Is the Shakespeare recipe right for code? CALM K = 4 (head lr x3, constant rate) at learning rates 5e-4,
    1e-3 and 2e-3, and NTP (cosine) at 1e-3 and 3e-3, on pystdlib bytes at 4 x 128, each scored at 1/2 and all of
    the scaling experiment's base budget (1.4e13 FLOPs); seeds 0 and 1 for the settings that decide the recipe."""
    budget, runs = ntp_flops("4x128", SCALING["4x128"]["ntp_iters"]), []
    for seed in range(2):
        for lr in (1e-3, 2e-3, 5e-4)[:3 if seed == 0 else 2]:
            runs.append(on_budget(f"calm K=4 lr={lr:g} seed {seed}", flags_for(
                "4x128", "calm", seed, dataset="pystdlib", **{**CALM_RECIPE, **schedule(lr, "const")}), budget, (0.5, 1)))
        for lr in (3e-3, 1e-3):
            runs.append(on_budget(f"ntp lr={lr:g} seed {seed}", flags_for(
                "4x128", "ntp", seed, dataset="pystdlib", **schedule(lr, "cos")), budget, (0.5, 1)))
    return runs


HEAD_CHANGES = {"head width 128": dict(head_dim=128), "4 head blocks": dict(head_layers=4),
                "N=16": dict(num_samples=16), "M=100": dict(num_target_samples=100),
                "head lr x10": dict(head_lr_scale=10.0), "head lr x1": dict(head_lr_scale=1.0)}


def head_study(size="4x128", seeds=2, longer=4, changes=tuple(HEAD_CHANGES)):
    """Why does the energy head trail flow matching at our scale? CALM K = 4 on Tiny Shakespeare bytes with the
    energy head of the recipe and with one change each (HEAD_CHANGES: the head as wide as the backbone, 4 blocks,
    N = 16 model samples, M = 100 target samples (the paper's), the head's learning rate x10 and x1 instead of x3),
    all at the iterations of the heads experiment (7e12 FLOPs of the recipe); and the recipe's energy and flow heads
    trained 2 and 4 times longer. Seeds 0 and 1 of each."""
    iters = iters_for(flags_for(size, "calm", 0, **CALM_RECIPE), ntp_flops(size, CURVES[size]["ntp_iters"]))
    longer = sorted({iters, 2 * iters, longer * iters})
    runs = [(f"energy seed {s}", flags_for(size, "calm", s, **CALM_RECIPE), longer) for s in range(seeds)]
    runs += [(f"energy {name} seed {s}", flags_for(size, "calm", s, **{**CALM_RECIPE, **change}), [iters])
             for s in range(seeds) for name, change in HEAD_CHANGES.items() if name in changes]
    return runs + [(f"flow seed {s}", flags_for(size, "calm", s, **CALM_RECIPE, head="flow"), longer)
                   for s in range(seeds)]


AE_ARMS = {"regularised": {}, "no variational": dict(variational=False),
           "plain": dict(variational=False, latent_dropout=0.0, mask_prob=0.0)}
SIGMAS = [0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5]


def ae_noise(seeds=3, iters=1000):
    """Is the regularised autoencoder more robust to noise on its latent than a plain one, when the noise is measured
    against the latents' own scale (sigma / latent RMS)? K = 4 autoencoders of the recipe (1,000 iterations, Tiny
    Shakespeare bytes, latent 32): regularised (variational, KL clip, latent dropout, input masking), without the
    variational posterior (dropout and masking kept), and plain (none); held-out reconstruction accuracy with
    Gaussian noise of sigma relative to the latent RMS and absolute, seeds 0-2."""
    return [(f"{arm} seed {s}", {"objective": "autoencoder", "seed": 1337 + s, **DATA, "chunk_size": 4,
                                 "learning_rate": 3e-3, "warmup_iters": 30, **change}, [iters])
            for s in range(seeds) for arm, change in AE_ARMS.items()]


STEPS = {"flow": [1, 2, 5, 10, 20], "diffusion": [1, 5, 10, 25, 50, 100, 200]}
SMOKE = dict(positions=16, post_positions=8, prompts=2, ae_iters=10)  # seconds: the notebook under the tests
EXPERIMENTS = {
    "recipe": dict(runs=recipe_sweep, positions=2048),
    "curves_4x128": dict(runs=lambda: curves("4x128"), positions=2048, post=temperature_curve, post_positions=1024,
                         prompts=16, temperatures=TEMPERATURES),
    "curves_6x192": dict(runs=lambda: curves("6x192"), positions=2048),
    "recipe_6x192": dict(runs=recipe_6x192, positions=2048),
    "heads": dict(runs=lambda: head_runs("4x128", 2), positions=2048, post=head_steps, post_positions=1024,
                  prompts=16, steps=STEPS),
    "smoke_curves": dict(runs=lambda: curves("1x32"), post=temperature_curve, temperatures=[1.0, 0.5], **SMOKE),
    "smoke_heads": dict(runs=lambda: head_runs("1x32", 1), post=head_steps, steps={"flow": [1, 2],
                                                                                     "diffusion": [1, 5]}, **SMOKE),
    # issue 23
    "recipe_pystdlib": dict(runs=recipe_pystdlib, positions=2048),
    "scaling_4x128": dict(runs=lambda budgets=None, dataset=None: scaling("4x128", budgets, dataset),
                          description=scaling.__doc__, options=("budgets", "dataset"), positions=4096,
                          exact_ntp=True, save_every=2000, keep=True),
    "head_study": dict(runs=lambda: head_study("4x128"), description=head_study.__doc__, positions=2048),
    "autoencoder_noise": dict(runs=ae_noise, kind="autoencoder", sigmas=SIGMAS, ae_batches=16),
    "smoke_scaling": dict(runs=lambda budgets=None, dataset=None: scaling("1x32", budgets, dataset),
                          description=scaling.__doc__, options=("budgets", "dataset"), exact_ntp=True, save_every=5,
                          keep=True, **SMOKE),
    "smoke_head_study": dict(runs=lambda: head_study("1x32", 1, 2, ["N=16"]), description=head_study.__doc__,
                             **SMOKE),
    "smoke_autoencoder_noise": dict(runs=lambda: ae_noise(1, 10), description=ae_noise.__doc__, kind="autoencoder",
                                    sigmas=[0.0, 0.5, 1.0], ae_batches=2)}
CONFIG_KEYS = ("positions", "exact_ntp", "save_every", "sigmas", "ae_batches")  # what a spec adds to a run's config


# ----------------------------------------------------------------------------- running and recording


def read_results(path):
    if not os.path.exists(path):
        return {"runs": {}}
    with open(path) as f:
        return json.load(f)


def record(path, exp, name, flags, config, prov, point=None, post=None, fresh=False, corpus=None):
    """Add one point (or the post-training measurements) of run `name` to the results file (read-modify-write
    under the lock, atomic replace). fresh: the run starts over (a record of other code or settings is dropped).
    corpus: corpus_facts of the run's data, kept in the file's "corpus" by dataset."""
    with records.Locked(path):
        res = read_results(path)
        if corpus is not None:
            res.setdefault("corpus", {})[corpus["dataset"]] = corpus
        spec = EXPERIMENTS[exp]
        res.update(experiment=f"calm_{exp}", module=__name__,
                   description=" ".join((spec.get("description") or spec["runs"].__doc__ or "").split()))
        if fresh:
            res["runs"].pop(name, None)
        run = res["runs"].setdefault(name, {"flags": flags, "config": config, "points": []})
        run["provenance"] = records.finish(prov)
        if point is not None:
            run["points"] = sorted([p for p in run["points"] if p["iter"] != point["iter"]] + [point],
                                   key=lambda p: p["iter"])
        if post is not None:
            run["post"] = post
        res["updated"] = time.strftime("%Y-%m-%d %H:%M:%S")
        records.write_json(path, res)


def autoencoder(K, work=WORK, ae_iters=None, latent_dim=None, dataset=DATA["dataset"]):
    """Path of the shared autoencoder for chunk size K (calm.py's recipe) of a dataset, trained under a lock when
    missing or made by other code or settings (its provenance.json, written once training has finished)."""
    prefix = "" if dataset == DATA["dataset"] else re.sub(r"[^\w.=-]+", "_", dataset) + "_"
    out = os.path.join(work, "autoencoders", prefix + f"K{K}" + (f"_l{latent_dim}" if latent_dim else ""))
    path = os.path.join(out, "ckpt.pt")
    args = SimpleNamespace(**{f.name: f.default for f in fields(calm.AEConfig)}, device="cpu", seed=1337,
                           ae_iters=ae_iters or objectives.CALMFlags.ae_iters, out_dir=out, **{**DATA, "dataset": dataset})
    args.chunk_size, args.latent_dim = K, latent_dim or args.latent_dim
    flags = objectives.autoencoder_flags(args, out_dir=out)
    if ae_iters:  # smoke: a few iterations, a short evaluation
        flags.update(block_size=32, eval_iters=1)
    config = {**{k: v for k, v in flags.items() if k != "out_dir"}, "threads": torch.get_num_threads()}  # bits
    code = records.code_hash([__name__])
    with records.Locked(path):
        if not records.checkpoint_matches(out, config, code):
            if os.path.exists(os.path.join(out, "provenance.json")):
                os.remove(os.path.join(out, "provenance.json"))  # a cut retraining is not mistaken for a finished one
            trainer.run_quietly(to_argv(flags) + ["--overwrite"])
            records.mark_checkpoint(out, config, code)
    return path


def score(ckpt, data, positions, exact=False):
    """Brier-1..4, BrierLM and their standard errors at `positions` fixed val positions (seed 0: the same
    positions for every run with the same context length), from two samples per position. exact (a token model):
    also its exact Brier-1 (brier1_exact) and the variance-reduced BrierLM (brierlm_vr), from its probabilities."""
    model, objective, args, _ = load_model(ckpt, "cpu")
    args.device = "cpu"
    per = objectives.brier_scores(model, objective, data, args, positions, 0, variance_reduced=exact)
    est = per["sampled"]
    se = est.std(0, ddof=1) / len(est) ** 0.5
    out = {**brierlm.summarize(est), **{f"brier{n + 1}_se": float(se[n]) for n in range(4)}}
    se_lm = brierlm.brierlm_stderr(est)
    out["brierlm_se"] = se_lm if se_lm == se_lm else None  # undefined (NaN) when a Brier-n <= 0
    if "exact1" in per:
        se_vr = brierlm.brierlm_stderr(per["reduced"])
        out.update(brier1_exact=float(per["exact1"].mean()),
                   brier1_exact_se=float(per["exact1"].std(ddof=1) / len(est) ** 0.5),
                   brierlm_vr=brierlm.summarize(per["reduced"])["brierlm"], brierlm_vr_se=se_vr if se_vr == se_vr else None)
    return out, model, args


def measure(ckpt, data, spec):
    """(scores, model, args) of a checkpoint: BrierLM for a language model (score), or an autoencoder's
    reconstruction accuracy under latent noise (spec kind 'autoencoder': calm_experiments.robustness)."""
    if spec.get("kind") != "autoencoder":
        return score(ckpt, data, spec["positions"], spec.get("exact_ntp", False))
    model, _, args, _ = load_model(ckpt, "cpu")
    args.device = "cpu"
    return calm_experiments.robustness(model, data, args, spec["sigmas"], spec["ae_batches"]), model, args


def epochs_seen(iters, batch_size, block_size, corpus_tokens):
    """Passes over the training split: tokens trained (iterations x batch x window) / the split's tokens."""
    if corpus_tokens <= block_size:
        raise UserError(f"the corpus ({corpus_tokens} training tokens) is smaller than one window of {block_size + 1}")
    return iters * batch_size * block_size / corpus_tokens


def check_corpus(data, block_size):
    """A one-line error when a split of the corpus is smaller than one training window (block_size + 1 tokens)."""
    for split in ("train", "val"):
        n = len(data.split(split))
        if n <= block_size + 1:
            raise UserError(f"the corpus {data.name!r} is smaller than one window: its {split} split has {n} tokens, "
                            f"a window of block_size {block_size} needs more than {block_size + 1}")


def corpus_facts(data):
    """What the figures need of a corpus: its size and the scores of models with no skill (no context)."""
    return dict(dataset=data.name, train_tokens=len(data.split("train")), val_tokens=len(data.split("val")),
                **calm_experiments.unigram_baselines(data))


def stages_of(points, save_every=None):
    """Where a run stops to save: its scored points, and every save_every iterations between (checkpoints only)."""
    if not save_every:
        return list(points)
    return sorted(set(points) | set(range(save_every, max(points), save_every)))


def run_one(exp, name, flags, points, spec, data, log, results=RESULTS, work=WORK, reuse_stale=False, stop_after=None):
    """Train run `name` through its points, score each, then spec['post'] if any. What exists is reused only if
    the same code (records.code_hash) and settings made it: a finished record, or a checkpoint to resume; a
    record of other code is trained afresh (reuse_stale: kept, and marked stale). stop_after: stop at that point
    (bench verify --points; the schedule stays the full run's)."""
    path = os.path.join(results, f"calm_{exp}.json")
    out_dir = os.path.join(work, exp, re.sub(r"[^\w.=-]+", "_", name))
    flags = dict(flags)
    if flags["objective"] == "calm" and "autoencoder" not in flags:
        flags["autoencoder"] = autoencoder(flags["chunk_size"], work, spec.get("ae_iters"), flags.get("latent_dim"),
                                           flags["dataset"])
    record_flags = {k: v for k, v in flags.items() if k != "autoencoder"}
    base = dict(out_dir=out_dir, lr_decay_iters=max(points), eval_iters=2, brier_positions=0, sample_tokens=0,
                log_interval=10 ** 9, **flags)
    config = dict(record_flags, lr_decay_iters=max(points), **{k: spec[k] for k in CONFIG_KEYS if k in spec})
    code, prov = records.code_hash([__name__]), records.provenance(config, [__name__])
    saved = read_results(path)["runs"].get(name, {})
    current = saved.get("provenance", {}).get("code") == code and records.same_config(saved.get("config"), config)
    if saved and not current and reuse_stale and records.same_config(saved.get("config"), config):
        with records.Locked(path):
            res = read_results(path)
            res["runs"][name]["stale"] = True
            records.write_json(path, res)
        return
    fresh = not current
    done = {} if fresh else {p["iter"]: p for p in saved.get("points", [])}
    post = spec.get("post") and spec["post"](name, spec)
    need_post = post is not None and (fresh or "post" not in saved)  # decided now: `fresh` changes in the loop
    if set(done) >= set(points) and not need_post:
        return
    ckpt = os.path.join(out_dir, "ckpt.pt")
    at = load_checkpoint(ckpt)["iter"] if records.checkpoint_matches(out_dir, config, code) else 0
    clock = os.path.join(out_dir, "train_seconds.json")  # training time so far, across restarts
    seconds = done[at]["train_seconds"] if at in done else 0.0
    if at and at not in done and os.path.exists(clock):  # cut between two points: the time of the last save
        with open(clock) as f:
            saved_clock = json.load(f)
        seconds = saved_clock["seconds"] if saved_clock.get("iter") == at else 0.0
    for end in stages_of(points, spec.get("save_every")):
        if stop_after is not None and end > stop_after:
            break
        if end < at or (end == at and (end in done or end not in points)):
            continue
        t = time.time()
        if end > at:
            if not at:
                os.makedirs(out_dir, exist_ok=True)
                records.mark_checkpoint(out_dir, config, code)
            resume = ["--resume"] if at else ["--overwrite"]
            trainer.run_quietly(to_argv({**base, "max_iters": end, "eval_interval": end}) + resume)
            at = end
        seconds += time.time() - t
        records.write_json(clock, dict(iter=at, seconds=seconds))
        if end not in points:  # a checkpoint only: a run cut after it resumes here
            continue
        if spec.get("keep"):  # the checkpoint of every point, kept (to score it again, or differently)
            shutil.copyfile(ckpt, os.path.join(out_dir, f"ckpt_{end}.pt"))
        ck = load_checkpoint(ckpt)
        metrics = ck["metrics"]
        scores, model, args = measure(ckpt, data, spec)
        if isinstance(model, calm.Autoencoder):
            per_token = ae_flops_per_token(model)
        else:
            per_token = train_flops_per_token(model, args.block_size, getattr(args, "num_samples", 8))
        point = dict(iter=end, train_flops=per_token * end * args.batch_size * args.block_size,
                     flops_per_token=per_token, train_seconds=seconds, val_loss=metrics.get("val_loss"),
                     threads=torch.get_num_threads(), **scores)
        point.update(train_loss=metrics.get("train_loss"),
                     epochs=epochs_seen(end, args.batch_size, args.block_size, len(data.split("train"))))
        record(path, exp, name, record_flags, config, prov, point, fresh=fresh, corpus=corpus_facts(data))
        fresh = False
        if "recon_acc" in scores:
            log(f"{exp} | {name} | iter {end} | recon {scores['recon_acc']:.4f} | latent RMS "
                f"{scores['latent_rms']:.3f} | {seconds:.0f}s training")
        else:
            log(f"{exp} | {name} | iter {end} | FLOPs {point['train_flops']:.2e} | Brier-1 {scores['brier1']:.3f} "
                f"± {scores['brier1_se']:.3f} | BrierLM {scores['brierlm']:.2f} | {seconds:.0f}s training")
    if need_post:
        if at != max(points):
            raise UserError(f"{name}: the checkpoint is at iteration {at}, not at the last point {max(points)}")
        t = time.time()
        model, _, args, _ = load_model(ckpt, "cpu")
        args.device = "cpu"
        record(path, exp, name, record_flags, config, prov, post=post(model, args, data))
        log(f"{exp} | {name} | post-training measurements ({time.time() - t:.0f}s)")


def rerun(experiment, run_id, rec, work, points=None):
    """bench verify: the run again, from nothing (its autoencoder too), in `work`; returns its new record.
    points=N: only through its N-th point (same schedule, so the same computation as the full run's start)."""
    exp = experiment.removeprefix("calm_")
    spec = {k: v for k, v in EXPERIMENTS[exp].items() if k != "post"}  # the training and its scores, no extras
    iters = [p["iter"] for p in rec["points"]]
    run_one(exp, run_id, rec["flags"], iters, spec, load_data(rec["flags"]["dataset"], rec["flags"]["tokenizer"]),
            print, results=work, work=work, stop_after=None if points is None else iters[points - 1])
    return read_results(os.path.join(work, f"calm_{exp}.json"))["runs"][run_id]


def compared(rec):
    """What bench verify compares: Brier-1..4 (and the exact Brier-1 where recorded) at every point, or an
    autoencoder's accuracies under noise, each with 3 standard errors of its estimate as the noise allowed when
    the thread count differs. A standard error is floored at one count of the sample (one position's estimate
    moving by 1, or one token of the accuracy): at a bound (Brier-3 = -1 exactly) the sample's is 0."""
    floor = 1 / rec.get("config", {}).get("positions", float("inf"))
    out = {}
    for p in rec["points"]:
        if "recon_rel" in p:
            for kind in ("recon_rel", "recon_abs"):
                for sigma, acc in p[kind].items():
                    out[f"{kind} {sigma}@{p['iter']}"] = (acc, 3 * max(acc * (1 - acc), 1 / p["tokens"]) ** 0.5
                                                           / p["tokens"] ** 0.5)
            continue
        out.update({f"brier{n}@{p['iter']}": (p[f"brier{n}"], 3 * max(p[f"brier{n}_se"], floor)) for n in range(1, 5)})
        if "brier1_exact" in p:
            out[f"brier1_exact@{p['iter']}"] = (p["brier1_exact"], 3 * max(p["brier1_exact_se"], floor))
    return out


def run(exp, shard=(0, 1), only=None, dry=False, log=print, results=RESULTS, work=WORK, reuse_stale=False,
        budgets=None, dataset=None):
    """Run (this shard of) an experiment; results go to <results>/calm_<exp>.json, checkpoints under <work>.
    budgets, dataset: the scaling experiments elsewhere (other budgets, another corpus), into other results."""
    if exp not in EXPERIMENTS:
        raise UserError(f"unknown experiment {exp!r}: choose from {', '.join(EXPERIMENTS)}")
    spec = EXPERIMENTS[exp]
    options = {k: v for k, v in dict(budgets=budgets, dataset=dataset).items() if v is not None}
    if options:
        flag = "--" + next(iter(options))
        if not set(options) <= set(spec.get("options", ())):
            raise UserError(f"{flag} applies only to the experiments "
                            f"{', '.join(e for e, s in EXPERIMENTS.items() if s.get('options'))}, not to {exp}")
        if os.path.abspath(results) == os.path.abspath(RESULTS):
            raise UserError(f"{flag} changes the experiment: write it elsewhere with --results DIR (results/ holds "
                            f"the experiment as defined)")
    runs = [r for r in spec["runs"](**options) if only is None or re.search(only, r[0])]
    mine = runs[shard[0]::shard[1]]
    if dry:
        for name, flags, points in mine:
            log(f"{name}: {points} {flags}")
        return
    datasets = {}
    for _, flags, _ in mine:  # every corpus is loaded and checked before anything trains
        if flags["dataset"] not in datasets:
            datasets[flags["dataset"]] = load_data(flags["dataset"], flags["tokenizer"])
            check_corpus(datasets[flags["dataset"]], flags["block_size"])
    for name, flags, points in mine:
        try:
            run_one(exp, name, flags, points, spec, datasets[flags["dataset"]], log, results, work, reuse_stale)
        except UserError as e:  # say so and go on with the next run
            log(f"{exp} | {name} | failed: {e}")


def main(argv):
    p = OneLineParser(prog="python -m bench calm", description=__doc__.splitlines()[0])
    p.add_argument("command", choices=["run", "list"])
    p.add_argument("experiment", nargs="?", default=None)
    p.add_argument("--shard", default="0/1", help="I/N: every N-th run starting at run I")
    p.add_argument("--only", default=None, help="only the runs whose name matches this regular expression")
    p.add_argument("--dry", action="store_true", help="print the runs, train nothing")
    p.add_argument("--reuse_stale", action="store_true", help="keep finished runs of other code, marked stale")
    p.add_argument("--results", default=RESULTS, help="folder of calm_<experiment>.json (default: results/)")
    p.add_argument("--work", default=WORK, help="folder of the runs' checkpoints (default: out/calm_runs)")
    p.add_argument("--budgets", default=None, help="scaling experiments: increasing multiples of the base budget, "
                   "e.g. 0.125,1,8 (with --results elsewhere)")
    p.add_argument("--dataset", default=None, help="scaling experiments: another corpus (with --results elsewhere)")
    a = p.parse_args(argv)
    if a.command == "list" or a.experiment is None:
        for exp in EXPERIMENTS:
            run(exp, dry=True, log=lambda s, e=exp: print(f"{e}: {s}"))
        return
    m = records.shard(a.shard)
    budgets = None
    if a.budgets is not None:
        try:
            budgets = [float(b) for b in a.budgets.split(",")]
        except ValueError:
            raise UserError(f"--budgets must be comma-separated numbers, got {a.budgets!r}") from None
        check_budgets(budgets)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    run(a.experiment, m, a.only, a.dry, log=lambda s: print(s, flush=True),
        results=a.results, work=a.work, reuse_stale=a.reuse_stale, budgets=budgets, dataset=a.dataset)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
