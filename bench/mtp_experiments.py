"""The multi-token-prediction paper's scale findings, at small scale: sweeps that write results/mtp_<sweep>.json.

    python -m bench mtp sweep size|induction|polynomial|bytes|speedup|all [--scale cpu|tutorial|smoke] [--out results]
                              [--work out/mtp_sweeps/<scale>] [--shard I/N] [--only REGEX] [--reuse_stale] [--dry]

Every run trains through train.py (trainer.run_quietly) in stages, resumed with --resume, into
<work>/<sweep>/<run>/, and is measured after each stage (the task sweeps) or at its end. Each results file is one
experiment in bench/records.py's format: {"experiment": "mtp_<sweep>", "module", "description", "runs": {run_id:
{"config": the full configuration (seed included), "metrics", "provenance"}}}, rewritten under a file lock after
every run, so a cut sweep keeps what it finished and two shards (--shard 0/2, 1/2) can share one sweep. A finished
run, or a checkpoint to resume, is reused only when the same code (records.code_hash) and configuration made it;
otherwise it is trained afresh (--reuse_stale keeps a finished run of other code, marked stale).
`python -m bench verify results/mtp_<sweep>.json <run-id>` re-runs one run (rerun) and compares its numbers (compared).

  size        n = 1, 2, 4 at four widths of 6 blocks (36x in non-embedding parameters), each trained on a fixed
              number of code bytes PER non-embedding parameter, 2 seeds: head 1's validation loss, exact Brier-1
              and BrierLM (variance-reduced) against n = 1 of the same size and seed (the paper: the benefit of
              n > 1 grows with size; small models are neutral or worse). With 6 blocks the next-token path of n has
              6 - n + 1 blocks: 6 (n = 1), 5 (n = 2), 3 (n = 4), of which 6 - n are shared by all heads.
  induction   n = 1, 2 at three widths of 4 blocks on data.py's induction task (a 12-symbol name that recurs in
              48 random symbols; loss on those symbols only), 3 seeds: accuracy on the recurring name's symbols
              after its first, during training, beside the score of a model without induction (guessing among the symbols seen, about
              1/27) (the paper: n = 2 helps the smallest models form induction; the difference vanishes with size)
  polynomial  n = 1, 2, 4 on 6 blocks of width 64, on F_7[X]/(X^5) with + * and negation, one operation in training,
              two out of distribution, loss on the answer digits only, fresh episodes every batch, 3 seeds: exact
              match in and out of distribution, by operation (the paper: n = 2, 4 beat n = 1, more than tripling
              the model does)
  bytes       n = 2, 4, 8 byte-level, code and text: accepted tokens per forward (the paper: 6.4x faster at n = 8)
  speedup     a model wide and deep enough (16 x 384, bfloat16) that a verify forward costs little more than the
              L / (L - n + 1) greedy steps of its blocks, trained on code and on a counting stream where drafts are
              easy: tokens/s of self-speculative vs cached greedy decoding, same model, same output, interleaved
"""
import copy
import math
import os
import re
import time
from types import SimpleNamespace

import numpy as np
import torch

import brierlm
import objectives
import trainer
from bench import records
from bench.flops import train_flops_per_token
from bench.mtp_bench import speculative_benchmark, verify_costs
from data import load_data
from mtp import speculative_generate
from objectives import load_model
from runtime import OneLineParser, UserError, load_checkpoint, mean_se

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEPS = ("size", "induction", "polynomial", "bytes", "speedup")
POLYNOMIAL = "polynomial:ops=+*-,m=1,ood=2,loss=answer"     # = data.py's default polynomial task, spelled out
INDUCTION = "induction:names=1,name_len=12,length=48,loss=answer"  # = data.py's default induction task
SCALES = {  # models are (n_layer, n_embd, n_head)
    "cpu": dict(
        size=dict(models=[(6, 24, 2), (6, 48, 2), (6, 96, 4), (6, 144, 4)], n=[1, 2, 4], seeds=2,
                  recipe=dict(data="pystdlib", tokens_per_param=2, batch=8, block=128, lr=2e-3, warmup=40, evals=1,
                              eval_batches=40, brier_positions=1024)),
        induction=dict(models=[(4, 16, 2), (4, 32, 2), (4, 64, 4)], n=[1, 2], seeds=3,
                       recipe=dict(data=INDUCTION, iters=4000, batch=32, lr=2e-3, warmup=100, evals=16)),
        polynomial=dict(models=[(6, 64, 4)], n=[1, 2, 4], seeds=3,
                        recipe=dict(data=POLYNOMIAL, iters=8000, batch=32, lr=2e-3, warmup=200, evals=8)),
        bytes=dict(data=["pystdlib", "shakespeare"], n=[2, 4, 8], model=(10, 144, 4),
                   recipe=dict(iters=800, batch=8, block=128, lr=2e-3, warmup=40, evals=4, prompts=16,
                               new_tokens=128)),
        speedup=dict(runs=dict(code=dict(data="pystdlib", iters=500), counting=dict(data="counting", iters=250)),
                     recipe=dict(model=(16, 384, 6), n=4, batch=8, block=128, lr=1e-3, warmup=40, evals=2,
                                 dtype="bfloat16", prompts=8, new_tokens=96, rounds=5))),
    "tutorial": dict(  # what tutorials/mtp.ipynb trains live at cpu scale, a few minutes in all (no bytes, speedup)
        size=dict(models=[(6, 16, 2), (6, 32, 2)], n=[1, 2], seeds=1,
                  recipe=dict(data="pystdlib", tokens_per_param=2, batch=8, block=128, lr=2e-3, warmup=10, evals=1,
                              eval_batches=10, brier_positions=128)),
        induction=dict(models=[(4, 64, 4)], n=[1, 2], seeds=1,
                       recipe=dict(data=INDUCTION, iters=1000, batch=32, lr=2e-3, warmup=50, evals=4)),
        polynomial=dict(models=[(4, 64, 4)], n=[1, 2], seeds=1,
                        recipe=dict(data=POLYNOMIAL, iters=600, batch=32, lr=2e-3, warmup=50, evals=3))),
    "smoke": dict(
        size=dict(models=[(4, 16, 2), (4, 32, 2)], n=[1, 2, 4], seeds=2,
                  recipe=dict(data="pystdlib", tokens_per_param=0.005, batch=2, block=32, lr=2e-3, warmup=1,
                              evals=1, eval_batches=2, brier_positions=8)),
        induction=dict(models=[(4, 16, 2), (4, 32, 2)], n=[1, 2], seeds=2,
                       recipe=dict(data="induction:name_len=4,length=16", iters=4, batch=4, lr=3e-3, warmup=1,
                                   evals=2)),
        polynomial=dict(models=[(4, 16, 2)], n=[1, 2], seeds=1,
                        recipe=dict(data="polynomial:m=1-2,ood=3", iters=4, batch=4, lr=3e-3, warmup=1, evals=2)),
        bytes=dict(data=["pystdlib", "shakespeare"], n=[2, 4], model=(4, 16, 2),
                   recipe=dict(iters=3, batch=2, block=32, lr=2e-3, warmup=1, evals=1, prompts=2, new_tokens=12)),
        speedup=dict(runs=dict(code=dict(data="pystdlib", iters=2), counting=dict(data="counting", iters=2)),
                     recipe=dict(model=(4, 32, 2), n=4, batch=2, block=32, lr=1e-3, warmup=1, evals=1,
                                 dtype="bfloat16", prompts=2, new_tokens=12, rounds=2))),
}
DESCRIPTIONS = {s: " ".join(block.split()) for s, block in re.findall(
    r"\n  (\w+) +(.*?)(?=\n  \w+ {2,}|\n\"\"\"|\Z)", __doc__, re.S) if s in SWEEPS}
OP_NAMES = {"+": "add", "*": "mul", "o": "compose", "-": "neg"}


def non_embedding_params(model):
    return sum(p.numel() for name, p in model.named_parameters() if "wte" not in name and "wpe" not in name)


def params_of(L, d):
    """Non-embedding parameters of a GPT of L blocks of width d (the same for every n): 12 L d^2 + 13 L d + 2 d."""
    return L * (12 * d * d + 13 * d) + 2 * d


# ----------------------------------------------------------------------------- what each sweep runs

def run_list(sweep, scale):
    """[(run_id, config)] of a sweep at a scale, seed-major (a cut sweep has every size of its first seeds).
    A config holds everything that makes the run: model, n, seed, data, schedule and what is measured."""
    p = SCALES[scale][sweep]
    out = []
    if sweep in ("size", "induction", "polynomial"):
        r = p["recipe"]
        for s in range(p["seeds"]):
            for n in p["n"]:
                for L, d, h in p["models"]:
                    cfg = dict(sweep=sweep, model=[L, d, h], n=n, seed=1337 + s, **r)
                    if sweep == "size":  # a fixed number of training tokens per non-embedding parameter
                        iters = max(2, round(r["tokens_per_param"] * params_of(L, d) / (r["batch"] * r["block"])))
                        cfg.update(iters=iters, warmup=min(r["warmup"], max(1, iters // 10)), tokenizer="bytes")
                    out.append((f"{L}x{d}_n{n}_s{s}", cfg))
    elif sweep == "bytes":
        for ds in p["data"]:
            for n in p["n"]:
                out.append((f"{ds}_n{n}", dict(sweep=sweep, model=list(p["model"]), n=n, seed=1337, data=ds,
                                               tokenizer="bytes", **p["recipe"])))
    else:
        r = p["recipe"]
        for name, run in p["runs"].items():
            out.append((name, dict(sweep=sweep, seed=1337, tokenizer="bytes", **dict(r, model=list(r["model"])),
                                   **run)))
    return out


# ----------------------------------------------------------------------------- training


def results_file(sweep, out):
    return records.Results(os.path.join(out, f"mtp_{sweep}.json"), f"mtp_{sweep}", __name__, DESCRIPTIONS[sweep])


def save_run(sweep, out, run_id, record):
    with records.Locked(os.path.join(out, f"mtp_{sweep}.json")):
        results_file(sweep, out).add(run_id, record)


def dataset_of(cfg, work):
    """The --dataset of a run (the counting stream is a file written once into the work folder)."""
    return "file:" + os.path.abspath(counting_file(work)) if cfg["data"] == "counting" else cfg["data"]


def train_argv(cfg, out_dir, work):
    L, d, heads = cfg["model"]
    argv = ["--objective", "mtp", "--device", "cpu", "--out_dir", out_dir, "--n_future", str(cfg["n"]),
            "--n_layer", str(L), "--n_embd", str(d), "--n_head", str(heads), "--batch_size", str(cfg["batch"]),
            "--learning_rate", str(cfg["lr"]), "--warmup_iters", str(cfg["warmup"]), "--lr_decay_iters",
            str(cfg["iters"]), "--seed", str(cfg["seed"]), "--eval_iters", "2", "--brier_positions", "0",
            "--sample_tokens", "0", "--log_interval", str(10 ** 9), "--dataset", dataset_of(cfg, work)]
    if cfg.get("tokenizer"):
        argv += ["--tokenizer", cfg["tokenizer"]]
    return argv + ["--block_size", str(block_of(cfg))]


def block_of(cfg):
    """Training window: the recipe's, or for a synthetic task one whole episode (its length E - 1)."""
    return cfg["block"] if "block" in cfg else load_data(cfg["data"]).E - 1


def stages(cfg):
    """The iterations at which a run is stopped (checkpointed) and measured: `evals` even steps to the end."""
    return sorted({max(1, round(cfg["iters"] * k / cfg["evals"])) for k in range(1, cfg["evals"] + 1)})


def train_in_stages(cfg, out_dir, work, code, measure=None, log=print):
    """Train run cfg to each of stages(cfg), resuming a matching checkpoint (same code and config), calling
    measure(model, data, iteration) after every stage it trains or finds: returns ([measures], model, data,
    training seconds here)."""
    ckpt = os.path.join(out_dir, "ckpt.pt")
    at = load_checkpoint(ckpt)["iter"] if records.checkpoint_matches(out_dir, cfg, code) else 0
    if not at:  # a checkpoint of other code or settings is not resumed: removed, then trained afresh
        os.makedirs(out_dir, exist_ok=True)
        if os.path.exists(ckpt):
            os.remove(ckpt)
        records.mark_checkpoint(out_dir, cfg, code)
    points, seconds, argv = [], 0.0, train_argv(cfg, out_dir, work)
    for end in stages(cfg):
        if end > at:
            t = time.time()
            trainer.run_quietly(argv + ["--max_iters", str(end), "--eval_interval", str(end)] +
                                (["--resume"] if at else ["--overwrite"]))
            seconds, at = seconds + time.time() - t, end
        if measure is not None or end == stages(cfg)[-1]:
            model, _, saved, _ = load_model(ckpt)
            data = load_data(saved.dataset, saved.tokenizer)
            if measure is not None:
                points.append(dict(iter=end, **measure(model, data, end)))
                log(f"    iter {end}: " + " | ".join(f"{k} {v:.3f}" for k, v in points[-1].items()
                                                     if isinstance(v, float) and not k.startswith("acc_m")))
    return points, model, data, seconds


# ----------------------------------------------------------------------------- measurements

@torch.no_grad()
def head1_quality(model, data, block, batches, positions, seed=0):
    """Head 1 (model.trunk, an ordinary GPT) on fixed validation data: mean cross-entropy over `batches` windows of
    16 x block tokens (and its standard error), exact Brier-1 and the variance-reduced Brier-2..4 / BrierLM at
    `positions` positions."""
    gpt, gen = model.trunk, torch.Generator().manual_seed(seed)
    ce = [gpt(*data.get_batch("val", 16, block, gen))[1].item() for _ in range(batches)]
    per = objectives.brier_scores(gpt, objectives.NTP, data, SimpleNamespace(block_size=block), positions, seed,
                                  variance_reduced=True)
    out = dict(val_loss_h1=float(np.mean(ce)), val_loss_h1_se=float(np.std(ce, ddof=1) / math.sqrt(batches)),
               brier1=float(per["exact1"].mean()), brier1_se=float(per["exact1"].std(ddof=1) / math.sqrt(positions)),
               brierlm=brierlm.summarize(per["reduced"])["brierlm"], brierlm_se=brierlm.brierlm_stderr(per["reduced"]))
    out.update({f"brier{i + 1}": float(v) for i, v in enumerate(per["reduced"].mean(0))})
    return out


def operations(text):
    """The operations of a polynomial episode's expression, in order of appearance."""
    return [c for c in text.split("=")[0] if c in OP_NAMES]


@torch.no_grad()
def task_accuracy(model, data, split, block):
    """Head 1's teacher-forced argmax on the scored tokens of every episode of a synthetic-task split (what
    data.TaskDataset.accuracy computes): 'acc' = the task's own metric (induction: per scored token; polynomial:
    exact match of the whole answer, = greedy decoding after '='), 'token_acc' = per scored token, 'n_scored' =
    how many the metric averages over, and for the polynomial task 'acc_m<m>' = exact match among the episodes
    with m operations and 'acc_m1_<op>' among the one-operation episodes of each operation."""
    episodes, scored = data.episodes[split], data.scored[split]
    right, mask = [], []
    for lo in range(0, len(episodes), 250):
        ep = torch.from_numpy(episodes[lo:lo + 250, :block + 1].astype(np.int64))
        right.append(model.trunk(ep[:, :block])[0].argmax(-1) == ep[:, 1:])
        mask.append(torch.from_numpy(scored[lo:lo + 250, 1:block + 1]))
    right, mask = torch.cat(right), torch.cat(mask)
    exact = (right | ~mask).all(1)
    out = dict(token_acc=right[mask].float().mean().item())
    out["acc"] = exact.float().mean().item() if data.metric == "exact" else out["token_acc"]
    out["n_scored"] = len(episodes) if data.metric == "exact" else int(mask.sum())
    if data.task == "polynomial":
        ops = [operations(data.tokenizer.decode(e)) for e in episodes]
        for m in sorted({len(o) for o in ops}):
            out[f"acc_m{m}"] = exact[torch.tensor([len(o) == m for o in ops])].float().mean().item()
        for op in sorted({o[0] for o in ops if len(o) == 1}):
            out[f"acc_m1_{OP_NAMES[op]}"] = exact[torch.tensor([o == [op] for o in ops])].float().mean().item()
    return out


def task_measure(model, data, iteration):
    """Every val split's task accuracy (keys <metric>_<split>, 'val:ood' written val_ood)."""
    out = {}
    for split in (s for s in data.splits if s != "train"):
        out.update({f"{k}_{split.replace(':', '_')}": v
                    for k, v in task_accuracy(model, data, split, data.E - 1).items()})
    return out


def no_skill(data):
    """The baselines a model without the skill reaches on every val split (data.TaskDataset.no_skill)."""
    return {split.replace(":", "_"): data.no_skill(split) for split in data.splits if split != "train"}


# ----------------------------------------------------------------------------- one run of any sweep

def run_one(sweep, run_id, cfg, out, work, log=print, reuse_stale=False):
    """Train and measure one run unless results/mtp_<sweep>.json already holds it for this code and config."""
    code = records.code_hash([__name__])
    if results_file(sweep, out).reusable(run_id, cfg, code, reuse_stale) is not None:
        return False
    prov = records.provenance(cfg, [__name__])
    out_dir = os.path.join(work, sweep, run_id)
    log(f"  {sweep} {run_id}: training into {out_dir}")
    if sweep in ("induction", "polynomial"):
        points, model, data, secs = train_in_stages(cfg, out_dir, work, code, task_measure, log)
        metrics = dict(points[-1], curve=points, no_skill=no_skill(data))
    else:
        _, model, data, secs = train_in_stages(cfg, out_dir, work, code, log=log)
        metrics = MEASURES[sweep](model, data, cfg, work)
    L, d, _ = cfg["model"]
    tokens = cfg["iters"] * cfg["batch"] * block_of(cfg)
    metrics.update(params_non_embedding=non_embedding_params(model), trunk_blocks=L - cfg["n"],
                   tokens=tokens, train_flops=train_flops_per_token(model, block_of(cfg)) * tokens,
                   train_seconds=secs)
    save_run(sweep, out, run_id, dict(config=cfg, metrics=metrics, provenance=records.finish(prov)))
    log(f"  {sweep} {run_id}: " + " | ".join(f"{k} {v:.4g}" for k, v in metrics.items()
                                              if isinstance(v, float) and not k.startswith(("acc_m", "brier2",
                                                                                            "brier3", "brier4"))))
    return True


def measure_size(model, data, cfg, work):
    return head1_quality(model, data, cfg["block"], cfg["eval_batches"], cfg["brier_positions"])


def measure_bytes(model, data, cfg, work):
    """Accepted tokens per forward of greedy self-speculative decoding (and of speculative sampling at T = 1) on
    validation prompts of 32 bytes, and head 1's validation loss."""
    greedy = speculative_benchmark(model, data, cfg["prompts"], 32, cfg["new_tokens"])
    sampled = speculative_benchmark(model, data, cfg["prompts"], 32, cfg["new_tokens"], temperature=1.0)
    gen = torch.Generator().manual_seed(0)
    ce = [model.trunk(*data.get_batch("val", 16, cfg["block"], gen))[1].item() for _ in range(10)]
    return dict(dataset=cfg["data"], n=cfg["n"], n_layer=cfg["model"][0], n_embd=cfg["model"][1],
                tokens_per_forward=greedy["tokens_per_forward"], per_prompt=greedy["per_prompt"],
                identical=greedy["identical"], tokens_per_forward_t1=sampled["tokens_per_forward"],
                val_loss_h1=float(np.mean(ce)))


def measure_speedup(fp32, data, cfg, work):
    """Decoded in cfg['dtype'] by cached greedy and self-speculative decoding (interleaved_speedup; the float32
    model's greedy decoding is timed alongside), plus the verify / step cost of the model."""
    model = copy.deepcopy(fp32).to(getattr(torch, cfg["dtype"]))  # what we decode with; fp32 is the reference
    prompts, _ = data.get_batch("val", cfg["prompts"], 32, torch.Generator().manual_seed(0))
    m = interleaved_speedup(model, [x[None] for x in prompts], cfg["new_tokens"], cfg["rounds"], reference=fp32)
    step, verify = verify_costs(model, repeats=20)
    gen = torch.Generator().manual_seed(0)
    ce = [fp32.trunk(*data.get_batch("val", 8, cfg["block"], gen))[1].item() for _ in range(10)]
    sample = model.generate(prompts[:1], cfg["new_tokens"], temperature=0.0)[0, 32:].tolist()
    m.update(data=cfg["data"], iters=cfg["iters"], step_s=step, verify_s=verify, verify_over_step=verify / step,
             n_layer=cfg["model"][0], n_embd=cfg["model"][1], n=cfg["n"], dtype=cfg["dtype"],
             val_loss_h1=float(np.mean(ce)), prompt=data.tokenizer.decode(prompts[0].tolist()),
             sample=data.tokenizer.decode(sample))
    return m


MEASURES = {"size": measure_size, "bytes": measure_bytes, "speedup": measure_speedup}


# ----------------------------------------------------------------------------- bench verify

def rerun(experiment, run_id, record, work):
    """bench verify: the run again, from nothing, in `work`; returns its new record."""
    sweep = experiment.removeprefix("mtp_")
    run_one(sweep, run_id, record["config"], work, work, log=lambda *a: None)
    return results_file(sweep, work).data["runs"][run_id]


def binomial(p, n):
    """The standard error of an accuracy p over n items, floored at one item's worth (at p = 0 or 1 it is 0)."""
    n = max(n, 1)
    return math.sqrt(max(p * (1 - p), 1 / n) / n)


def compared(record):
    """What bench verify compares, each with the noise allowed when the thread count differs (3 standard errors
    of the estimate): task sweeps, the final accuracy of every val split (binomial); size, head 1's val loss,
    Brier-1 and BrierLM; bytes, accepted tokens per forward and the val loss; speedup, accepted tokens per
    forward (per prompt) and the float32 val loss (timings are never compared: they vary run to run)."""
    m, sweep = record["metrics"], record["config"]["sweep"]
    if sweep in ("induction", "polynomial"):
        return {k: (m[k], 3 * binomial(m[k], m[k.replace("acc", "n_scored", 1)])) for k in m
                if re.fullmatch(r"acc_val(_ood)?", k)}
    if sweep == "size":  # BrierLM's standard error is undefined (NaN) when a Brier-n <= 0: its Brier-1's, x 100
        se = {k: m.get(k + "_se") or 0.0 for k in ("val_loss_h1", "brier1", "brierlm")}
        if m.get("brierlm_se") is None or m["brierlm_se"] != m["brierlm_se"]:
            se["brierlm"] = 100 * se["brier1"]
        return {k: (m[k], 3 * se[k]) for k in se}
    per = [q["tokens_per_forward"] if isinstance(q, dict) else q for q in m["per_prompt"]]
    se = float(np.std(per, ddof=1) / math.sqrt(len(per))) if len(per) > 1 else 0.0
    return {"tokens_per_forward": (m["tokens_per_forward"], 3 * se), "val_loss_h1": (m["val_loss_h1"], 0.05)}


# ----------------------------------------------------------------------------- the speed-up sweep's pieces

@torch.no_grad()
def interleaved_speedup(model, prompts, new_tokens, rounds, reference=None):
    """Cached greedy (model.generate) vs self-speculative greedy decoding of the same model on the same prompts, in
    one process (the CPU is shared with other jobs, so only ratios within a round mean much): every round decodes
    every prompt with each decoder, rotating which goes first. `reference` (optional): another copy of the model,
    e.g. in float32, decoded both ways in the same rounds. Returns per round the tokens/s of each decoder and the
    speed-up (wall clock; and thread CPU time, which a descheduled process does not accumulate), per prompt the
    tokens per forward and the speed-up, and whether the outputs of the two decoders were identical (on how many
    prompts; for a prompt where they differ, the first position and the gap between the two tokens' logits in a
    full forward of the common prefix: 0 is an exact tie)."""
    greedy = lambda net: lambda x: (net.generate(x, new_tokens, temperature=0.0), None)  # noqa: E731
    speculative = lambda net: lambda x: speculative_generate(net, x, new_tokens)  # noqa: E731
    decoders = {"greedy": greedy(model), "speculative": speculative(model)}
    if reference is not None:
        decoders.update(reference_greedy=greedy(reference), reference_speculative=speculative(reference))
    names, out = list(decoders), []
    per_prompt = [dict(dict.fromkeys(names, 0.0), tokens=0, forwards=0) for _ in prompts]
    outputs = [{} for _ in prompts]
    for r in range(rounds):
        wall, cpu, tokens, forwards = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0), 0, 0
        for j, prompt in enumerate(prompts):
            k = (r + j) % len(names)
            for name in names[k:] + names[:k]:
                t, c = time.perf_counter(), time.thread_time()
                outputs[j][name], stats = decoders[name](prompt)
                dt, dc = time.perf_counter() - t, time.thread_time() - c
                wall[name], cpu[name], per_prompt[j][name] = wall[name] + dt, cpu[name] + dc, per_prompt[j][name] + dt
                if name == "speculative":
                    tokens, forwards = tokens + stats["tokens"], forwards + stats["forwards"]
                    per_prompt[j]["tokens"] += stats["tokens"]
                    per_prompt[j]["forwards"] += stats["forwards"]
        row = {f"{k}_tok_s": len(prompts) * new_tokens / v for k, v in wall.items()}
        row.update(speedup=wall["greedy"] / wall["speculative"], speedup_cpu=cpu["greedy"] / cpu["speculative"],
                   tokens_per_forward=tokens / forwards)
        if reference is not None:
            row["speedup_vs_reference"] = wall["reference_greedy"] / wall["speculative"]
            row["reference_speedup"] = wall["reference_greedy"] / wall["reference_speculative"]
        out.append(row)
    summary = dict(rounds=out, tokens_per_forward=out[-1]["tokens_per_forward"],
                   per_prompt=[dict(tokens_per_forward=q["tokens"] / q["forwards"],
                                    speedup=q["greedy"] / q["speculative"]) for q in per_prompt],
                   identical_prompts=sum(torch.equal(o["greedy"], o["speculative"]) for o in outputs), mismatches=[])
    summary["identical"] = summary["identical_prompts"] == len(prompts)
    if reference is not None:
        summary["reference_identical"] = all(torch.equal(o["reference_greedy"], o["reference_speculative"])
                                             for o in outputs)
    for j, o in enumerate(outputs):
        a, b = o["greedy"][0], o["speculative"][0]
        if not torch.equal(a, b):
            k = int((a != b).nonzero()[0])
            logits = model.trunk(a[None, max(0, k - model.config.block_size):k])[0][0, -1].float()
            summary["mismatches"].append(dict(prompt=j, position=k, logit_gap=abs(logits[a[k]] - logits[b[k]]).item()))
    for k in ("speedup", "speedup_cpu", "speedup_vs_reference", "reference_speedup"):
        if k in out[0]:
            summary[k], summary[k + "_se"] = mean_se([row[k] for row in out])
    return summary


def counting_file(work, n=100000):
    """A regular byte stream on which drafting is easy: the numbers 0 .. n-1, zero-padded to 5 digits, one per line
    (the next line is the previous one plus 1). Written once; train.py reads it as --dataset file:PATH."""
    path = os.path.join(work, "counting.txt")
    if not os.path.exists(path):
        os.makedirs(work, exist_ok=True)
        with open(path, "w") as f:
            f.write("".join(f"{i:05d}\n" for i in range(n)))
    return path


# ----------------------------------------------------------------------------- command line

def run(sweep, scale="cpu", out="results", work=None, log=print, shard=(0, 1), only=None, reuse_stale=False,
        dry=False):
    """Run (this shard of) one sweep, or 'all', at a scale; returns {sweep: the results file's data}."""
    if scale not in SCALES:
        raise UserError(f"unknown scale {scale!r}: choose from {', '.join(SCALES)}")
    if sweep not in SWEEPS + ("all",):
        raise UserError(f"unknown sweep {sweep!r}: choose from {', '.join(SWEEPS)} or all")
    work = work or os.path.join(ROOT, "out", "mtp_sweeps", scale)
    reports = {}
    for s in SWEEPS if sweep == "all" else (sweep,):
        if s not in SCALES[scale]:
            if sweep == "all":
                continue
            raise UserError(f"the {scale} scale has no {s} sweep (it has {', '.join(SCALES[scale])})")
        runs = [(i, c) for i, c in run_list(s, scale) if only is None or re.search(only, i)][shard[0]::shard[1]]
        log(f"sweep {s} ({scale}): {len(runs)} run(s) in this shard; results {os.path.join(out, f'mtp_{s}.json')}")
        for run_id, cfg in runs:
            if dry:
                log(f"  {run_id}: {cfg}")
                continue
            try:
                run_one(s, run_id, cfg, out, work, log, reuse_stale)
            except UserError as e:  # say so and go on with the next run
                log(f"  {s} {run_id}: failed: {e}")
        reports[s] = results_file(s, out).data
    return reports


def main(argv=None):
    """python -m bench mtp sweep SWEEP [--scale cpu|smoke] [--out DIR] [--work DIR] [--shard I/N] [--only RE]"""
    p = OneLineParser(prog="python -m bench mtp sweep", description=__doc__.splitlines()[0])
    p.add_argument("sweep", nargs="?", default="all", help="size|induction|polynomial|bytes|speedup|all")
    p.add_argument("--scale", default="cpu", help="cpu, tutorial (what the notebook trains live) or smoke")
    p.add_argument("--out", default=os.path.join(ROOT, "results"), help="folder of mtp_<sweep>.json")
    p.add_argument("--work", default=None, help="folder of the runs' checkpoints (default out/mtp_sweeps/<scale>)")
    p.add_argument("--shard", default="0/1", help="I/N: every N-th run starting at run I")
    p.add_argument("--only", default=None, help="only the runs whose id matches this regular expression")
    p.add_argument("--reuse_stale", action="store_true", help="keep finished runs of other code, marked stale")
    p.add_argument("--dry", action="store_true", help="list the runs and their configurations, train nothing")
    a = p.parse_args(argv)
    m = records.shard(a.shard)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    run(a.sweep, a.scale, a.out, a.work, lambda s: print(s, flush=True), m, a.only,
        a.reuse_stale, a.dry)
