"""One table for all four papers: every objective trained on the same data, with the same backbone and the same
training-FLOPs budget, then measured the same way.

    python -m bench table [--preset tiny|cpu|gpu] [--out results] [--device auto|cpu|cuda] [--no_core]

Protocol. Bytes tokenizer on Tiny Shakespeare for everyone (CALM's autoencoder needs it, see calm.py). The NTP run
gets `ntp_iters` iterations of batch_size x block_size tokens; that is the FLOPs budget, and every other objective
gets max_iters = round(budget / (its FLOPs per token x batch_size x block_size)), same learning rate and schedule.
Each run is trained in `stages` resumed pieces (train.py --resume: the same run as one go) and scored after each,
which gives BrierLM against training FLOPs (the report's "curve"). Rows: ntp; mtp n=2, n=4 (the heads replace trunk
blocks, mtp.py); calm K=2, K=4 with calm.py's recipe (objectives.RECIPE: its learning rate, constant after warm-up, and
its head; an autoencoder is trained first, its FLOPs reported apart in ae_flops, not charged to the budget);
dispersion with lambda = 0.1 (the best value of tutorials/dispersion.ipynb). An objective that fails gets a row that
says so; the others still run. Results: out/bench_<preset>[_cuda].json and .csv.

Columns
  params          trainable parameters (CALM: not counting its frozen autoencoder)
  train_flops     FLOPs per token (table below) x tokens trained
  head_share      CALM: the generative head's share of those FLOPs (bench.flops.calm_flops_parts); others n/a
  train_tok_s     tokens/s of full training steps (forward, backward, AdamW), median of timed steps after 2 warm-up
  peak_mem_mib    CPU: peak resident set of one training step minus the process before the model existed (weights,
                  gradients, AdamW state, activations), in a child process with glibc's mmap threshold at 64 KiB
                  (bench/mtp_bench.py's method: freed tensors go back to the OS); CUDA: torch.cuda.max_memory_allocated
  val_ce          next-token cross-entropy (nats/token) on fixed val windows (MTP: head 1); CALM has none
  brier1          Brier-1 alone (-1..1): it separates models whose Brier-3/4 are ~0, so whose BrierLM is 0
  brierlm         BrierLM (0..100, brierlm.py, two samples per position) at the same val positions for everyone,
  brierlm_se      and its standard error over positions (delta method; n/a when a Brier-n estimate is <= 0)
  disp_last       dispersion of the last layer (ln_f output; CALM: one vector per chunk), mean over val segments
  gen_tok_s       batch-1 generation from a 16-token val prompt up to the window, KV cache: ntp/dispersion greedy,
                  mtp self-speculative greedy (same tokens as greedy), calm sampling at T=1 (one head sample)
  fwd_per_tok     backbone forward passes per generated token (counted by a hook on the first block)
The core GPT's training throughput, RoPE and learned positions side by side (bench/core.py), with --compile off and
on (and MFU on CUDA), is printed below the table.

Training FLOPs per token: bench/flops.py.
"""
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

import brierlm
import objectives
import calm
import dispersion
import trainer
import runtime
from data import load_data
from runtime import UserError
from mtp import MTP, speculative_generate
from runtime import to_argv
from objectives import load_model

from bench import core
from bench.flops import ae_flops_per_token, calm_flops_parts, train_flops_per_token
from bench.mtp_bench import rss_kib
from bench import records
from bench.common import architecture, sync

PRESETS = {
    "tiny": dict(model=dict(n_layer=4, n_head=2, n_embd=32, block_size=32), batch_size=8, ntp_iters=30, stages=2,
                 ae_iters=60, brier_positions=32, eval_batches=2, timing_steps=3, core=False),
    "live": dict(model=dict(n_layer=4, n_head=4, n_embd=128, block_size=128), batch_size=16, ntp_iters=100, stages=2,
                 ae_iters=200, brier_positions=512, eval_batches=4, timing_steps=2, core=False),  # overview.ipynb
    "cpu": dict(model=dict(n_layer=4, n_head=4, n_embd=128, block_size=128), batch_size=16, ntp_iters=1200, stages=4,
                ae_iters=1000, brier_positions=2048, eval_batches=10, timing_steps=8, core=True),
    "gpu": dict(model=dict(n_layer=8, n_head=8, n_embd=512, block_size=256), batch_size=64, ntp_iters=3000, stages=6,
                ae_iters=2000, brier_positions=8192, eval_batches=50, timing_steps=20, core=True),
}
ROWS = [("ntp", "ntp", {}), ("mtp n=2", "mtp", {"n_future": 2}), ("mtp n=4", "mtp", {"n_future": 4}),
        ("calm K=2", "calm", {"chunk_size": 2}), ("calm K=4", "calm", {"chunk_size": 4}),
        ("dispersion l=0.1", "dispersion", {"dispersion_weight": 0.1})]
COLUMNS = ["objective", "status", "params", "train_iters", "train_flops", "head_share", "ae_flops", "train_tok_s",
           "peak_mem_mib",
           "val_ce", "brier1", "brierlm", "brierlm_se", "disp_last", "gen_tok_s", "fwd_per_tok"]
NOT_MEASURED = "not measured (no GPU in this run)"


# ----------------------------------------------------------------------------- the protocol

def common_flags(p, device):
    flags = dict(dataset="shakespeare", tokenizer="bytes", device=device, batch_size=p["batch_size"],
                 eval_iters=2, brier_positions=0, sample_tokens=0, **p["model"])
    return flags


def iters_for_budget(flags, p):
    """Iterations that spend the NTP run's FLOPs: budget / (FLOPs per token x tokens per iteration)."""
    T = p["model"]["block_size"]
    ntp = architecture({**common_flags(p, "cpu"), "objective": "ntp"})[0]
    model, args, _ = architecture(flags)
    budget = train_flops_per_token(ntp, T) * p["ntp_iters"]
    per_token = train_flops_per_token(model, T, getattr(args, "num_samples", 8))
    return max(1, round(budget / per_token)), per_token


class ForwardCounter:
    """Counts forward passes of a module (the backbone's first block = one backbone pass)."""

    def __init__(self, module):
        self.n, self.handle = 0, module.register_forward_pre_hook(self.hook)

    def hook(self, *_):
        self.n += 1


def first_block(model):
    if isinstance(model, calm.CALM):
        return model.backbone.blocks[0]
    return (model.trunk if isinstance(model, MTP) else model).blocks[0]



@torch.no_grad()
def generation(model, prompt, n_tokens, device):
    """(tokens/s, backbone forwards per token) for batch-1 generation of n_tokens after prompt (1, P)."""
    counter = ForwardCounter(first_block(model))
    gen = torch.Generator(device).manual_seed(0)
    sync(device)
    t = time.perf_counter()
    if isinstance(model, calm.CALM):
        out = calm.generate_chunks(model, prompt, n_tokens // model.K, gen, 1.0)
    elif isinstance(model, MTP):
        out = speculative_generate(model, prompt, n_tokens, temperature=0.0)[0]
    else:
        out = model.generate(prompt, n_tokens, temperature=0.0)
    sync(device)
    seconds = time.perf_counter() - t
    counter.handle.remove()
    new = out.size(1) - prompt.size(1)
    return new / seconds, counter.n / new


def training_speed(model, objective, args, data, steps, device):
    """Median tokens/s of full training steps (after 2 warm-up steps); the model is left trained further."""
    model.train()
    opt = trainer.make_optimizer(model, objective, args, device)
    gen, times = torch.Generator().manual_seed(1), []
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if str(device).startswith("cuda") else contextlib.nullcontext()
    for i in range(steps + 2):
        x, y = data.get_batch("train", args.batch_size, args.block_size, gen, device)
        sync(device)
        t = time.perf_counter()
        trainer.forward_backward(model, objective, x, y, args, 1.0, ctx)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if i >= 2:
            times.append(time.perf_counter() - t)
    model.eval()
    return args.batch_size * args.block_size / statistics.median(times)


@torch.no_grad()
def val_cross_entropy(model, batches):
    if isinstance(model, calm.CALM):
        return "n/a"  # no likelihood
    gpt = model.trunk if isinstance(model, MTP) else model               # MTP's trunk is trunk + head 1
    return statistics.fmean(gpt(x, y)[1].item() for x, y in batches)


def brier_and_ce(model, objective, args, data, p, device):
    """BrierLM (and its standard error) at the preset's fixed val positions, and val cross-entropy."""
    T = p["model"]["block_size"]
    est = objectives.brier_scores(model, objective, data, args, p["brier_positions"], 0)["sampled"]
    se = brierlm.brierlm_stderr(est)
    ce = val_cross_entropy(model, dispersion.fixed_batches(data, "val", p["eval_batches"], p["batch_size"], T, 1,
                                                           device))
    return dict(**brierlm.summarize(est), brierlm_se=se if se == se else "n/a (a Brier-n <= 0)", val_ce=ce)


def train_autoencoder(K, p, device, work):
    """CALM's autoencoder for chunk size K, trained before CALM as calm.py trains it (calm.autoencoder_flags), for
    p["ae_iters"] iterations (its FLOPs are reported apart, in ae_flops)."""
    ae_dir = os.path.join(work, f"autoencoder K={K}")
    args, _ = trainer.parse_args(to_argv({**common_flags(p, device), "objective": "calm", "chunk_size": K,
                                          "ae_iters": p["ae_iters"]}))
    flags = objectives.autoencoder_flags(args, out_dir=ae_dir, eval_iters=2, overwrite=True,
                                         warmup_iters=min(30, p["ae_iters"] // 10))
    trainer.run_quietly(to_argv(flags))
    return os.path.join(ae_dir, "ckpt.pt")


def run_row(label, objective_name, extra, p, device, work, ae_paths, data):
    """Train one objective on the FLOPs budget in p["stages"] resumed stages (train.py --resume: the same run as
    one go, with one lr schedule), scoring BrierLM after each stage: the curve of BrierLM vs training FLOPs."""
    flags = {**common_flags(p, device), "objective": objective_name, "out_dir": os.path.join(work, label), **extra}
    row = {"objective": label, "ae_flops": 0}
    if objective_name == "calm":
        K = extra["chunk_size"]
        if K not in ae_paths:  # one autoencoder per K, shared by the rows that use it
            ae_paths[K] = train_autoencoder(K, p, device, work)
        flags["autoencoder"] = ae_paths[K]
    iters, flops_per_token = iters_for_budget(flags, p)
    T, B = p["model"]["block_size"], p["batch_size"]
    flags.update(lr_decay_iters=iters, warmup_iters=min(30, iters // 10), log_interval=iters)
    if objective_name == "calm":  # CALM's own recipe (constant after warm-up: objectives.CALM's min_lr_ratio)
        flags.update(learning_rate=objectives.RECIPE["learning_rate"], warmup_iters=min(objectives.RECIPE["warmup_iters"],
                                                                                   iters // 10))
    ends = sorted({max(1, round(iters * (i + 1) / p["stages"])) for i in range(p["stages"])})
    curve = []
    for i, end in enumerate(ends):
        resume = ["--resume"] if i else ["--overwrite"]
        metrics = trainer.run_quietly(to_argv({**flags, "max_iters": end, "eval_interval": end}) + resume)
        model, objective, args, _ = load_model(os.path.join(flags["out_dir"], "ckpt.pt"), device)
        curve.append(dict(iter=end, train_flops=flops_per_token * end * B * T,
                          **brier_and_ce(model, objective, args, data, p, device)))
    row["head_share"] = "n/a"
    if isinstance(model, calm.CALM):
        parts = calm_flops_parts(model, args.num_samples)
        row["head_share"] = parts["head"] / sum(parts.values())
        row["ae_flops"] = ae_flops_per_token(model.ae) * p["ae_iters"] * B * T
        row["ae_recon_acc"] = metrics["ae_recon_acc"]  # held-out; CALM decodes no better than its autoencoder
    windows = dispersion.fixed_batches(data, "val", p["eval_batches"], B, T - 4, seed=0, device=device)
    prompt = data.get_batch("val", 1, 16, torch.Generator().manual_seed(0), device)[0]
    gen_tok_s, fwd = generation(model, prompt, T - 16, device)
    row.update(status="ok", params=sum(q.numel() for q in model.parameters() if q.requires_grad),
               train_iters=iters, train_flops=curve[-1]["train_flops"],
               **{k: curve[-1][k] for k in ("val_ce", "brier1", "brierlm", "brierlm_se")},
               disp_last=dispersion.layer_dispersion(model, windows)["final"],
               gen_tok_s=gen_tok_s, fwd_per_tok=fwd, curve=curve,
               train_tok_s=training_speed(model, objective, args, data, p["timing_steps"], device))
    return row, flags


# ----------------------------------------------------------------------------- memory (child process on CPU)

def step_memory(flags, device):
    """Peak bytes of one training step (weights, gradients, AdamW state, activations) on random tokens."""
    cuda = str(device).startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_kib("VmRSS")
    torch.manual_seed(0)
    model, args, objective = architecture({**flags, "device": "cpu"})
    model = model.to(device).train()
    opt = trainer.make_optimizer(model, objective, args, str(device))
    V = 256
    x = torch.randint(V, (args.batch_size, args.block_size), device=device)
    y = torch.randint(V, (args.batch_size, args.block_size), device=device)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    def step():
        trainer.forward_backward(model, objective, x, y, args, 1.0, ctx)
        opt.step()
        opt.zero_grad(set_to_none=True)
    step()  # warm-up: AdamW state exists from here on
    if cuda:
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set (VmHWM) to the current one
    step()
    return (rss_kib("VmHWM") - base) * 1024


def memory_table(all_flags, device):
    """{label: MiB} for every row's flags; on CPU one fresh child process per row (pinned mmap threshold)."""
    if str(device).startswith("cuda"):
        return {label: step_memory(f, device) / 2 ** 20 for label, f in all_flags.items()}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    root, res = os.path.dirname(os.path.dirname(os.path.abspath(__file__))), {}
    for label, flags in all_flags.items():
        out = subprocess.run([sys.executable, "-m", "bench.table", "memory-child", json.dumps(flags)],
                             env=env, capture_output=True, text=True, cwd=root)
        res[label] = (float(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else
                      f"failed: {out.stderr.strip().splitlines()[-1:]}")
    return res


def memory_child(spec):
    """One row's step memory, after a throw-away step of a tiny GPT (torch's one-time initialisation)."""
    warm = {**json.loads(spec), "objective": "ntp", "n_layer": 1, "n_head": 1, "n_embd": 8, "batch_size": 1}
    for k in ("n_future", "chunk_size", "dispersion_weight"):
        warm.pop(k, None)
    step_memory(warm, "cpu")
    print(step_memory(json.loads(spec), "cpu") / 2 ** 20)


# ----------------------------------------------------------------------------- throughput of the shared core

def core_throughput(p, device, compile_blocks, steps=None, rounds=5):
    """Training tokens/s of the preset's plain GPT with RoPE and with learned positions, side by side in one process
    (bench/core.py: interleaved rounds of full AdamW steps, bytes vocabulary; bf16 autocast on CUDA as train.py
    uses); on CUDA also MFU = FLOPs per token (the ntp formula) x tokens/s / the GPU's bf16 peak."""
    r = core.compare(p["model"], p["batch_size"], rounds, steps or max(1, p["timing_steps"] // 2), device,
                     torch.bfloat16 if str(device).startswith("cuda") else None, compile_blocks)
    return dict(compile=compile_blocks, device=str(device), tok_s=r["tok_s"]["rope"],
                tok_s_learned=r["tok_s"]["learned"], rope_vs_learned=r["ratio"], mfu=r["mfu"]["rope"],
                mfu_learned=r["mfu"]["learned"])


# ----------------------------------------------------------------------------- the table

def fmt(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if v == int(v) and abs(v) < 1e7:
        return str(int(v))
    return f"{v:.3g}" if abs(v) >= 1e4 or abs(v) < 1e-2 else f"{v:.3f}"


def render(rows):
    table = [COLUMNS] + [[fmt(r.get(c, "")) for c in COLUMNS] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    return "\n".join(" | ".join(cell.ljust(w) for cell, w in zip(line, widths)) for line in table)


def write_results(report, out, name):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    with open(os.path.join(out, f"{name}.csv"), "w") as f:
        f.write(",".join(COLUMNS) + "\n")
        for r in report["rows"]:
            f.write(",".join(json.dumps(v) if isinstance(v, str) else repr(v)  # full precision
                             for v in (r.get(c, "") for c in COLUMNS)) + "\n")


def run(preset="tiny", out="results", device="auto", core=None, rows=ROWS, work=None, log=print):
    """The whole protocol; returns the report (also written to out/bench_<preset>[_cuda].json and .csv)."""
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}: choose from {', '.join(PRESETS)}")
    device = runtime.pick_device(device)
    cuda = device.startswith("cuda")
    if preset == "gpu" and not cuda:
        raise UserError("--preset gpu needs a CUDA GPU and none was found: use --preset cpu or --preset tiny")
    p = PRESETS[preset]
    core = p["core"] if core is None else core
    t0 = time.time()
    prov = records.provenance(dict(preset=preset, rows=[label for label, _, _ in rows], core=bool(core)),
                              [__name__], device)
    data = load_data("shakespeare", "bytes")
    results, all_flags, ae_paths = [], {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, name, extra in rows:
            t = time.time()
            try:
                row, flags = run_row(label, name, extra, p, device, work or tmp, ae_paths, data)
                all_flags[label] = {k: v for k, v in flags.items() if k != "autoencoder"}
            except Exception as e:  # noqa: BLE001 (the table says so; the other rows still run)
                msg = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
                row = {"objective": label, "status": f"failed: {msg}"[:200], **{c: "failed" for c in COLUMNS[2:]}}
            row["config"] = dict(preset=preset, row=label, objective=name, **extra)
            results.append(row)
            log(f"{label}: {row['status']} ({time.time() - t:.0f}s)")
    mem = memory_table(all_flags, device) if all_flags else {}
    for row in results:
        if row["status"] == "ok":
            row["peak_mem_mib"] = mem[row["objective"]]
    core_rows = []
    for c in ((False, True) if core else ()):
        try:
            core_rows.append(core_throughput(p, device, c))
        except Exception as e:  # noqa: BLE001 (e.g. no C++ compiler for torch.compile): say so, keep the table
            core_rows.append(dict(compile=c, device=device, tok_s=f"failed: {type(e).__name__}", mfu="failed"))
    memory = ("torch.cuda.max_memory_allocated of one training step" if cuda else
              "peak resident set of one training step minus the process before the model (CPU)")
    prov = records.finish(prov)
    for row in results:
        row["provenance"] = dict(prov, config=row["config"])
    baselines = dict(unigram_brier1=unigram_brier1(data),
                     note="what a model that knows only the train split's byte frequencies scores on val, exactly")
    report = dict(experiment=f"bench_{preset}", module=__name__, baselines=baselines, description=__doc__.split("\n\n")[0],
                  preset=preset, protocol=p, device=device, hardware=prov["hardware"], memory=memory,
                  seconds=time.time() - t0, command=f"python -m bench table --preset {preset}", provenance=prov,
                  rows=results, core=core_rows, core_gpu=None if cuda else NOT_MEASURED)
    log(f"{preset} preset on {report['hardware']}; memory: {memory}")
    log(render(results))
    for c in core_rows:
        log(f"core GPT {p['model']}, batch {p['batch_size']}, compile={c['compile']}: training tok/s RoPE "
            f"{fmt(c['tok_s'])} | learned {fmt(c.get('tok_s_learned', 'failed'))} | RoPE / learned "
            f"{fmt(c.get('rope_vs_learned', 'n/a'))} | MFU {fmt(c['mfu'])}")
    if out:
        name = f"bench_{preset}" + ("_cuda" if cuda else "")
        write_results(report, out, name)
        log(f"wrote {out}/{name}.json and .csv ({time.time() - t0:.0f}s)")
    return report


def unigram_brier1(data):
    """Brier-1 of the unigram model q (the train split's token frequencies) on the val split, exactly:
    E_y[2 q(y) - sum_x q(x)^2] = 2 sum_x q(x) q_val(x) - sum_x q(x)^2."""
    q, q_val = (np.bincount(data.split(s), minlength=data.vocab_size) / len(data.split(s)) for s in ("train", "val"))
    return float(2 * (q * q_val).sum() - (q * q).sum())


def runs_of(report):
    """bench verify: the table's rows by their label."""
    return {row["objective"]: row for row in report["rows"]}


def rerun(experiment, run_id, row, work):
    """bench verify: one row of the table again, at the preset it was made with, in `work`."""
    spec = next((r for r in ROWS if r[0] == run_id), None)
    if spec is None:
        raise UserError(f"{run_id!r} is not a row of today's table ({', '.join(r[0] for r in ROWS)})")
    report = run(row["config"]["preset"], out=None, device="cpu", core=False, rows=[spec], work=work)
    return report["rows"][0]


def compared(row):
    """What bench verify compares: the quality columns (timings and memory vary with the machine's load)."""
    se = row["brierlm_se"] if isinstance(row.get("brierlm_se"), float) else 1.0
    out = {"brier1": (row["brier1"], 0.05), "brierlm": (row["brierlm"], 3 * se)}
    if isinstance(row.get("val_ce"), float):
        out["val_ce"] = (row["val_ce"], 0.02)
    return out


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["memory-child"]:
        return memory_child(argv[1])
    parser = runtime.OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu",
                        help="tiny (< 1 min, the tests), cpu (45-65 min measured, one thread of a 2-core CPU), gpu")
    parser.add_argument("--out", default="results", help="folder for bench_<preset>.json and .csv")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no_core", action="store_true", help="skip the core GPT's compile on/off throughput")
    try:
        a = parser.parse_args(argv)
        return run(a.preset, a.out, a.device, False if a.no_core else None)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
