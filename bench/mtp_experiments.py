"""The multi-token-prediction paper's scale findings, at small scale: sweeps that write results/mtp_<sweep>.json.

    python -m bench mtp sweep size|induction|polynomial|bytes|speedup|all [--scale cpu|smoke] [--out results]

Every run trains through train.py (trainer.run_quietly; checkpoints in out/mtp_sweeps/<scale>/<sweep>/<run>, resumed
with --resume when a sweep was cut) and is evaluated the same way afterwards. Each sweep rewrites its JSON after
every run, so a cut sweep keeps what it finished and a second call only runs what is missing. tutorials/mtp.ipynb
reads these files at cpu scale and runs the smoke scale itself.

  size        n = 1, 2, 4 at four model sizes (34x in non-embedding parameters), the same training tokens of code
              bytes: head 1's validation loss, exact Brier-1 and BrierLM (variance-reduced estimator) relative to
              n = 1 (the paper: the benefit of n > 1 grows with size; small models are neutral or worse)
  induction   n = 1, 2, 4 at three sizes on data.py's induction task: accuracy on a recurring name's 2nd token
  polynomial  n = 1, 2, 4 on F_7[X]/(X^5): exact match in distribution (1..5 operations) and out of it (6..8)
  bytes       n = 2, 4, 8 byte-level, code and text: accepted tokens per forward (the paper: 6.4x faster at n = 8)
  speedup     a model wide and deep enough (16 x 384, bfloat16) that a verify forward costs little more than the
              L / (L - n + 1) greedy steps of its blocks, trained on code and on a counting stream where drafts are
              easy: tokens/s of self-speculative vs cached greedy decoding, same model, same output, interleaved
"""
import copy
import json
import math
import os
import platform
import time
from types import SimpleNamespace

import numpy as np
import torch

import brierlm
import objectives
import trainer
import runtime
from bench.flops import train_flops_per_token
from bench.mtp_bench import speculative_benchmark, verify_costs
from data import load_data
from runtime import OneLineParser, UserError, mean_se
from mtp import speculative_generate
from objectives import load_model

SWEEPS = ("size", "induction", "polynomial", "bytes", "speedup")
SCALES = {  # models are (n_layer, n_embd, n_head); `recipe` is what a finished run must match to be kept
    "cpu": dict(
        size=dict(sizes=[((6, 32, 2), [1, 2, 4], 2), ((6, 64, 2), [1, 2, 4], 2), ((8, 112, 4), [1, 2, 4], 1),
                         ((10, 144, 4), [1, 2, 4, 8], 1)],  # (model, n values, seeds); 'bytes' reuses the last
                  recipe=dict(data="pystdlib", iters=800, batch=8, block=128, lr=2e-3, warmup=40, evals=4,
                              eval_batches=40, brier_positions=1024)),
        induction=dict(models=[(4, 32, 2), (4, 64, 4), (4, 128, 4)], n=[1, 2, 4], seeds=2,
                       recipe=dict(iters=1500, batch=32, lr=3e-3, warmup=30, evals=4)),
        polynomial=dict(models=[(4, 64, 4)], n=[1, 2, 4], seeds=1,  # 800 iterations stayed at chance for every n
                        recipe=dict(iters=3000, batch=32, lr=2e-3, warmup=100, evals=4)),
        bytes=dict(data=["pystdlib", "shakespeare"], n=[2, 4, 8], recipe=dict(prompts=16, new_tokens=128)),
        speedup=dict(recipe=dict(runs=dict(code=dict(data="pystdlib", iters=500), counting=dict(data="counting", iters=250)),
                                 model=(16, 384, 6), n=4, batch=8, block=128, lr=1e-3, warmup=40, evals=2,
                                 dtype="bfloat16", prompts=8, new_tokens=96, rounds=5))),
    "smoke": dict(
        size=dict(sizes=[((4, 16, 2), [1, 2, 4], 2), ((8, 32, 2), [1, 2, 8], 1)],
                  recipe=dict(data="pystdlib", iters=3, batch=2, block=32, lr=2e-3, warmup=1, evals=1,
                              eval_batches=2, brier_positions=8)),
        induction=dict(models=[(4, 16, 2), (4, 32, 2)], n=[1, 2], seeds=2,
                       recipe=dict(iters=2, batch=4, lr=3e-3, warmup=1, evals=1)),
        polynomial=dict(models=[(4, 16, 2)], n=[1, 2], seeds=1, recipe=dict(iters=2, batch=4, lr=3e-3, warmup=1,
                                                                              evals=1)),
        bytes=dict(data=["pystdlib", "shakespeare"], n=[2, 8], recipe=dict(prompts=2, new_tokens=12)),
        speedup=dict(recipe=dict(runs=dict(code=dict(data="pystdlib", iters=2), counting=dict(data="counting", iters=2)),
                                 model=(4, 32, 2), n=4, batch=2, block=32, lr=1e-3, warmup=1, evals=1,
                                 dtype="bfloat16", prompts=2, new_tokens=12, rounds=2))),
}
HARDWARE = (f"{platform.machine()} CPU, {os.cpu_count()} cores shared with other jobs, "
            f"{torch.get_num_threads()} thread(s), torch {torch.__version__}")




def non_embedding_params(model):
    return sum(p.numel() for name, p in model.named_parameters() if "wte" not in name and "wpe" not in name)


# ----------------------------------------------------------------------------- bookkeeping

class Results:
    """<out>/mtp_<sweep>.json: {'sweep', 'scale', 'hardware', 'protocol', 'recipe', 'runs': {name: metrics}},
    rewritten atomically after every run; finished runs of an earlier call are kept when its recipe was the same."""

    def __init__(self, path, sweep, scale, protocol, recipe):
        self.path = path
        self.report = dict(sweep=sweep, scale=scale, hardware=HARDWARE, protocol=protocol, recipe=recipe, runs={})
        if os.path.exists(path):
            with open(path) as f:
                old = json.load(f)
            if old.get("recipe") == json.loads(json.dumps(recipe)):
                self.report["runs"] = old["runs"]

    def __contains__(self, name):
        return name in self.report["runs"]

    def add(self, name, metrics):
        self.report["runs"][name] = metrics
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.report, f, indent=1)
        os.replace(tmp, self.path)


def train_model(out_dir, model, n, r, seed=1337, extra=(), log=print):
    """Train one MTP model (n_layer, n_embd, n_head) with train.py on recipe r (iters, batch, block, lr, warmup,
    evals: checkpoints a cut run resumes from), resuming a cut run and reusing a finished one; returns (model,
    data, seconds spent here)."""
    L, d, heads = model
    ckpt = os.path.join(out_dir, "ckpt.pt")
    argv = ["--objective", "mtp", "--device", "cpu", "--out_dir", out_dir, "--n_future", str(n), "--n_layer", str(L),
            "--n_embd", str(d), "--n_head", str(heads), "--block_size", str(r["block"]), "--batch_size",
            str(r["batch"]), "--max_iters", str(r["iters"]), "--eval_interval", str(max(1, r["iters"] // r["evals"])),
            "--eval_iters", "2", "--learning_rate", str(r["lr"]), "--warmup_iters", str(r["warmup"]), "--seed",
            str(seed), "--brier_positions", "0", "--sample_tokens", "0", *extra]
    t, resume = time.time(), []
    if os.path.exists(ckpt):  # a finished or cut run of the same recipe is reused; another recipe's is replaced
        saved = runtime.load_checkpoint(ckpt)
        want = dict(n_future=n, n_layer=L, n_embd=d, n_head=heads, block_size=r["block"], batch_size=r["batch"],
                    learning_rate=r["lr"], warmup_iters=r["warmup"], seed=seed)
        resume = ["--resume"] if all(saved["args"].get(k) == v for k, v in want.items()) else ["--overwrite"]
        if resume == ["--resume"] and saved["iter"] >= r["iters"]:
            resume = None
    if resume is not None:
        log(f"  training {out_dir} ...")
        trainer.run_quietly(argv + resume)
    net, _, saved, _ = load_model(ckpt)
    return net, load_data(saved.dataset, saved.tokenizer), time.time() - t


@torch.no_grad()
def head1_quality(model, data, block, batches, positions, seed=0):
    """Head 1 (model.trunk, an ordinary GPT) on fixed validation data: mean cross-entropy over `batches` windows of
    16 x block tokens, exact Brier-1 and the variance-reduced Brier-2..4 / BrierLM at `positions` positions."""
    gpt, gen = model.trunk, torch.Generator().manual_seed(seed)
    ce = [gpt(*data.get_batch("val", 16, block, gen))[1].item() for _ in range(batches)]
    per = objectives.brier_scores(gpt, objectives.NTP, data, SimpleNamespace(block_size=block), positions, seed,
                                  variance_reduced=True)
    out = dict(val_loss_h1=float(np.mean(ce)), brier1=float(per["exact1"].mean()),
               brier1_se=float(per["exact1"].std(ddof=1) / math.sqrt(positions)),
               brierlm=brierlm.summarize(per["reduced"])["brierlm"], brierlm_se=brierlm.brierlm_stderr(per["reduced"]))
    out.update({f"brier{i + 1}": float(v) for i, v in enumerate(per["reduced"].mean(0))})
    return out


@torch.no_grad()
def task_accuracy(model, data, split, block):
    """Head 1's teacher-forced argmax on the scored tokens of every episode of a synthetic-task split (what
    data.TaskDataset.accuracy computes): 'acc' = the task's own metric (induction: per scored token; polynomial:
    exact match of the whole answer, = greedy decoding after '='), 'token_acc' = per scored token, and for the
    polynomial task 'acc_ops<m>' = exact match among the episodes with m operations."""
    episodes, scored = data.episodes[split], data.scored[split]
    right, mask = [], []
    for lo in range(0, len(episodes), 250):
        ix = torch.arange(lo, min(lo + 250, len(episodes)))
        x, y = data.batch_at(split, ix, block)
        right.append(model.trunk(x)[0].argmax(-1) == y)
        mask.append(torch.from_numpy(scored[lo:lo + 250, 1:block + 1]))
    right, mask = torch.cat(right), torch.cat(mask)
    exact = (right | ~mask).all(1)
    out = dict(token_acc=right[mask].float().mean().item())
    out["acc"] = exact.float().mean().item() if data.metric == "exact" else out["token_acc"]
    if data.name == "polynomial":
        ops = np.array([sum(data.tokenizer.decode(e).split("=")[0].count(c) for c in "+*o-") for e in episodes])
        for m in sorted(set(ops.tolist())):
            out[f"acc_ops{m}"] = exact[torch.from_numpy(ops == m)].float().mean().item()
    return out


# ----------------------------------------------------------------------------- the sweeps

def size_run(r, model, n, seed, work, data=None, log=print):
    """One run of the size sweep's recipe r, on r['data'] or another byte-level dataset (the bytes sweep reuses the
    code models): (name, model, data, seconds)."""
    data = data or r["data"]
    name = f"{model[0]}x{model[1]}_n{n}_s{seed}"
    out_dir = os.path.join(work, "size", name) if data == r["data"] else os.path.join(work, "bytes", f"{data}_{name}")
    return (name, *train_model(out_dir, model, n, r, 1337 + seed, ["--dataset", data, "--tokenizer", "bytes"], log))


def sweep_size(p, res, work, log):
    r = p["recipe"]
    tokens = r["iters"] * r["batch"] * r["block"]
    for seed in range(max(k for _, _, k in p["sizes"])):  # seed-major: a cut sweep still has every size
        for model, ns, n_seeds in p["sizes"]:
            for n in ns:
                if seed >= n_seeds or f"{model[0]}x{model[1]}_n{n}_s{seed}" in res:
                    continue
                name, net, data, secs = size_run(r, model, n, seed, work, log=log)
                m = head1_quality(net, data, r["block"], r["eval_batches"], r["brier_positions"])
                m.update(n_layer=model[0], n_embd=model[1], n=n, seed=seed, params_non_embedding=non_embedding_params(net),
                         tokens=tokens, train_flops=train_flops_per_token(net, r["block"]) * tokens, seconds=secs)
                res.add(name, m)
                log(f"  {name}: val_loss_h1 {m['val_loss_h1']:.4f} | Brier-1 {m['brier1']:.4f} | "
                    f"BrierLM {m['brierlm']:.2f} | {secs:.0f}s")


def sweep_task(task, p, res, work, log):
    r, block = p["recipe"], 64 if task == "induction" else 80
    for n in p["n"]:  # n = 1 and 2 at every size and seed first: n = 4 is the extra
        for model in p["models"]:
            for seed in range(p["seeds"]):
                name = f"{model[0]}x{model[1]}_n{n}_s{seed}"
                if name in res:
                    continue
                net, data, secs = train_model(os.path.join(work, name), model, n, dict(r, block=block), 1337 + seed,
                                              ["--dataset", task], log)
                m = {}
                for split in (s for s in data.splits if s != "train"):
                    m.update({f"{k}_{split.replace(':', '_')}": v
                              for k, v in task_accuracy(net, data, split, block).items()})
                m.update(n_layer=model[0], n_embd=model[1], n=n, seed=seed, params_non_embedding=non_embedding_params(net),
                         seconds=secs)
                res.add(name, m)
                log(f"  {name}: " + " | ".join(f"{k} {v:.3f}" for k, v in m.items() if k.startswith(("acc", "tok"))))


def sweep_bytes(p, res, work, log, size):
    """Accepted tokens per forward of the size sweep's largest model (its recipe, on code and on text) at each n."""
    r, model = p["recipe"], size["sizes"][-1][0]
    for ds in p["data"]:
        for n in p["n"]:
            name = f"{ds}_n{n}"
            if name in res:
                continue
            _, net, data, secs = size_run(size["recipe"], model, n, 0, work, ds, log)
            greedy = speculative_benchmark(net, data, r["prompts"], 32, r["new_tokens"])
            sampled = speculative_benchmark(net, data, r["prompts"], 32, r["new_tokens"], temperature=1.0)
            gen = torch.Generator().manual_seed(0)
            ce = [net.trunk(*data.get_batch("val", 16, size["recipe"]["block"], gen))[1].item() for _ in range(10)]
            m = dict(dataset=ds, n=n, n_layer=model[0], n_embd=model[1], tokens_per_forward=greedy["tokens_per_forward"],
                     per_prompt=greedy["per_prompt"], identical=greedy["identical"],
                     tokens_per_forward_t1=sampled["tokens_per_forward"], val_loss_h1=float(np.mean(ce)), seconds=secs)
            res.add(name, m)
            log(f"  {name}: {m['tokens_per_forward']:.2f} tokens/forward (greedy, identical {m['identical']}), "
                f"{m['tokens_per_forward_t1']:.2f} at T = 1 | val_loss_h1 {m['val_loss_h1']:.3f}")


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


def sweep_speedup(p, res, work, log):
    """The wide model of the recipe, trained on each of r['runs'] (code bytes, and the counting stream where
    acceptance is high), decoded in r['dtype'] by cached greedy and self-speculative decoding (interleaved_speedup;
    the float32 model's greedy decoding is timed alongside), plus the verify / step cost of the model."""
    r = p["recipe"]
    for name, run in r["runs"].items():
        if name in res:
            continue
        ds = run["data"] if run["data"] != "counting" else "file:" + os.path.abspath(counting_file(work))
        fp32, data, secs = train_model(os.path.join(work, name), r["model"], r["n"], dict(r, iters=run["iters"]), 1337,
                                       ["--dataset", ds, "--tokenizer", "bytes"], log)
        model = copy.deepcopy(fp32).to(getattr(torch, r["dtype"]))  # what we decode with; fp32 is the reference
        prompts, _ = data.get_batch("val", r["prompts"], 32, torch.Generator().manual_seed(0))
        m = interleaved_speedup(model, [x[None] for x in prompts], r["new_tokens"], r["rounds"], reference=fp32)
        step, verify = verify_costs(model, repeats=20)
        gen = torch.Generator().manual_seed(0)
        ce = [fp32.trunk(*data.get_batch("val", 8, r["block"], gen))[1].item() for _ in range(10)]
        sample = model.generate(prompts[:1], r["new_tokens"], temperature=0.0)[0, 32:].tolist()
        m.update(data=run["data"], iters=run["iters"], step_s=step, verify_s=verify, verify_over_step=verify / step,
                 n_layer=r["model"][0], n_embd=r["model"][1], n=r["n"], dtype=r["dtype"], seconds=secs,
                 params_non_embedding=non_embedding_params(model), val_loss_h1=float(np.mean(ce)),
                 prompt=data.tokenizer.decode(prompts[0].tolist()), sample=data.tokenizer.decode(sample))
        res.add(name, m)
        log(f"  {name}: {m['speedup']:.2f} +- {m['speedup_se']:.2f}x tokens/s over cached greedy "
            f"({m['speedup_vs_reference']:.2f}x over float32 greedy) | {m['tokens_per_forward']:.2f} tokens/forward | "
            f"verify/step {m['verify_over_step']:.2f} | identical {m['identical']}")


def run(sweep, scale="cpu", out="results", work=None, log=print):
    """Run one sweep (or 'all') at a scale; returns {sweep: report}. Files: <out>/mtp_<sweep>.json."""
    if scale not in SCALES:
        raise UserError(f"unknown scale {scale!r}: choose from {', '.join(SCALES)}")
    if sweep not in SWEEPS + ("all",):
        raise UserError(f"unknown sweep {sweep!r}: choose from {', '.join(SWEEPS)} or all")
    work = work or os.path.join("out", "mtp_sweeps", scale)
    reports = {}
    for s in SWEEPS if sweep == "all" else (sweep,):
        p, size = SCALES[scale][s], SCALES[scale]["size"]
        recipe = dict(p["recipe"], model=size["sizes"][-1][0], **size["recipe"]) if s == "bytes" else p["recipe"]
        res = Results(os.path.join(out, f"mtp_{s}.json"), s, scale, p, recipe)
        log(f"sweep {s} ({scale}): {len(res.report['runs'])} run(s) already in {res.path}")
        if s in ("induction", "polynomial"):
            sweep_task(s, p, res, os.path.join(work, s), log)
        elif s == "speedup":
            sweep_speedup(p, res, os.path.join(work, s), log)
        elif s == "size":
            sweep_size(p, res, work, log)
        else:
            sweep_bytes(p, res, work, log, size)
        reports[s] = res.report
    return reports


def main(argv=None):
    """python -m bench mtp sweep size|induction|polynomial|bytes|speedup|all [--scale cpu|smoke] [--out DIR]"""
    p = OneLineParser(prog="python -m bench mtp sweep", description=__doc__.splitlines()[0])
    p.add_argument("sweep", nargs="?", default="all", help="size|induction|polynomial|bytes|speedup|all")
    p.add_argument("--scale", default="cpu", help="cpu or smoke")
    p.add_argument("--out", default="results", help="folder of mtp_<sweep>.json")
    a = p.parse_args(argv)
    run(a.sweep, a.scale, a.out)
