"""Benchmarks for mtp.py (numbers for the README and the tutorial; nothing here is asserted by a test).

    python -m bench mtp memory [--n 1 2 4 8] [--device cpu|cuda]     peak training memory, memory-efficient vs naive
    python -m bench mtp speculative --ckpt out/mtp/ckpt.pt ...       tokens per forward and speed-up vs greedy
    python -m bench mtp costs [--n 2 4] [--widths 256 512] [--layers 12] [--dtype float32|bfloat16|both]
                                                                     verify-forward cost / greedy-step cost
    python -m bench mtp sweep size|induction|polynomial|bytes|speedup|all [--scale cpu|smoke]
                                                                     the scale findings (bench/mtp_experiments.py)

Memory. On CUDA: torch.cuda.max_memory_allocated() during one training step, minus what was allocated before it
(weights, gradients, optimizer-free). On CPU there is no allocator statistic, so each configuration runs in a fresh
process with glibc's mmap threshold pinned at 64 KiB (every large tensor is its own mmap, returned to the OS when
freed, so the resident set follows live tensors), one warm-up step first (gradient buffers exist), then the peak
resident set (VmHWM, reset through /proc/self/clear_refs) during one more step minus the resident set before it.
Both count everything the step allocates: activations kept for backward, logits, transient buffers.
"""
import json
import os
import statistics
import subprocess
import sys
import time
from types import SimpleNamespace

import torch
import torch.nn as nn

from gpt import GPT, GPTConfig, KVCache
from data import load_data
from runtime import UserError
import objectives
from mtp import MTP, speculative_generate
from runtime import OneLineParser
from bench.common import sync

MEMORY_MODEL = dict(vocab_size=50257, n_layer=8, n_head=4, n_embd=256, block_size=128)  # GPT-2 vocabulary
MEMORY_BATCH = 4


def rss_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def one_step_memory(n_future, naive, device="cpu", batch=MEMORY_BATCH, **model):
    """Extra bytes one training step needs (see the module docstring). n_future = 0 means the plain GPT (NTP)."""
    torch.manual_seed(0)
    cfg = GPTConfig(**{**MEMORY_MODEL, **model})
    net = (GPT(cfg) if n_future == 0 else MTP(cfg, n_future)).to(device)
    x = torch.randint(cfg.vocab_size, (batch, cfg.block_size), device=device)
    y = torch.randint(cfg.vocab_size, (batch, cfg.block_size), device=device)
    args = SimpleNamespace(mtp_naive=naive)

    def step():
        if n_future == 0:
            net(x, y)[1].backward()
        else:
            objectives.mtp_forward_backward(net, x, y, args, 1.0)

    step()  # warm-up: gradient buffers now exist and are not counted
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set (VmHWM) to the current one
    before = rss_kib("VmRSS")
    step()
    return (rss_kib("VmHWM") - before) * 1024


def measure_memory(n_values=(1, 2, 4, 8), device="cpu", **model):
    """{'ntp': bytes, 'efficient': {n: bytes}, 'naive': {n: bytes}}, each configuration in its own process."""
    def child(n, naive):
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
        cmd = [sys.executable, "-m", "bench.mtp_bench", "memory-child", "--n", str(n), "--naive", str(int(naive)),
               "--device", device, "--model", json.dumps(model)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        return int(out.stdout.strip().splitlines()[-1])
    result = {"ntp": child(0, False), "efficient": {}, "naive": {}}
    for n in n_values:
        result["efficient"][n] = child(n, False)
        result["naive"][n] = child(n, True)
    return result


@torch.no_grad()
def verify_costs(model, context=64, repeats=20):
    """Median seconds of (a) one cached greedy step (1 position, trunk + head 1, head 1's logits) and (b) one
    verify forward of self-speculative decoding (n positions through the trunk and all n heads, every head's
    logits), timed alternately on `model` after a cached context of random tokens; on CPU the process's CPU time
    (what other jobs on a shared machine do not inflate), on CUDA wall-clock time. Speculative decoding pays off
    when tokens per forward > (b) / (a)."""
    n, cfg = model.n_future, model.config
    device = next(model.parameters()).device
    context = min(context, cfg.block_size - n)
    idx = torch.randint(cfg.vocab_size, (1, context + n), generator=torch.Generator().manual_seed(0)).to(device)
    cache = KVCache(model.n_layer)
    z = model.trunk_hidden(idx[:, :context], 0, cache)
    for i in range(n):
        model.head_hidden(i, z, 0, cache)

    clock = time.perf_counter if device.type == "cuda" else time.process_time  # CPU: shared, count our own time

    def timed(m):  # m positions through trunk and the first m heads (1: a greedy step; n: a verify forward)
        sync(device)
        t = clock()
        z = model.trunk_hidden(idx[:, context:context + m], context, cache)
        model.trunk.lm_head(torch.stack([model.head_hidden(i, z, context, cache)[0] for i in range(m)]))
        sync(device)
        cache.crop(context)
        return clock() - t

    timed(1), timed(n)  # warm-up
    steps, verifies = zip(*[(timed(1), timed(n)) for _ in range(repeats)])
    return statistics.median(steps), statistics.median(verifies)


def forward_costs(n_future, n_embd, n_layer=12, vocab_size=256, dtype="float32", repeats=20, device="cpu"):
    """verify_costs of a randomly initialised model of this shape in float32 or bfloat16: (greedy step seconds,
    verify forward seconds)."""
    cfg = GPTConfig(vocab_size=vocab_size, n_layer=n_layer, n_head=max(1, n_embd // 64), n_embd=n_embd,
                    block_size=64 + n_future)
    model = MTP(cfg, n_future).to(device=device, dtype=getattr(torch, dtype)).eval()
    return verify_costs(model, repeats=repeats)



def cost_table(widths, ns=(2, 4), n_layer=12, dtypes=("float32", "bfloat16"), repeats=20, device="cpu"):
    """forward_costs over widths x n x dtypes: [{'n_embd', 'n', 'dtype', 'step_s', 'verify_s', 'ratio', 'blocks'}],
    blocks = L / (L - n + 1), the ratio if extra positions cost nothing (the verify forward runs all L blocks, a
    greedy step the L - n + 1 of the trunk and head 1)."""
    rows = []
    for width in widths:
        for n in ns:
            for dtype in dtypes:
                g, v = forward_costs(n, width, n_layer, dtype=dtype, repeats=repeats, device=device)
                rows.append(dict(n_embd=width, n=n, dtype=dtype, step_s=g, verify_s=v, ratio=v / g,
                                 blocks=n_layer / (n_layer - n + 1)))
    return rows


def speculative_report(model, idx, max_new_tokens, temperature=0.0, top_k=None, generator=None):
    """Speculative vs the cached decoder of gpt.py (same temperature / top-k) on one prompt: output, tokens per
    forward, wall-clock of both, speed-up, and (greedy only) whether the two outputs are identical."""
    t = time.perf_counter()
    out, stats = speculative_generate(model, idx, max_new_tokens, temperature, top_k, generator)
    stats["seconds"] = time.perf_counter() - t
    t = time.perf_counter()
    ref = model.generate(idx, max_new_tokens, temperature, top_k, generator=generator)
    stats["baseline_seconds"] = time.perf_counter() - t
    stats["speedup"] = stats["baseline_seconds"] / stats["seconds"]
    stats["identical"] = bool(torch.equal(out, ref)) if temperature == 0 else None
    return out, stats


def speculative_benchmark(model, data, n_prompts=8, prompt_len=32, new_tokens=128, split="val", seed=0,
                          temperature=0.0):
    """Self-speculative vs cached decoding (greedy, or sampling at a temperature) on prompts drawn from a data
    split: accepted tokens per forward (over all prompts, and per prompt), total wall-clock of each, speed-up, and
    (greedy) whether every output was identical to plain greedy decoding."""
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    prompts, _ = data.get_batch(split, n_prompts, prompt_len, gen, device)
    sampler = torch.Generator(device).manual_seed(seed) if temperature > 0 else None
    tokens = forwards = spec_s = greedy_s = 0
    identical, per_prompt = True, []
    for p in prompts:
        _, s = speculative_report(model, p[None], new_tokens, temperature, generator=sampler)
        per_prompt.append(s["tokens_per_forward"])
        tokens, forwards = tokens + s["tokens"], forwards + s["forwards"]
        spec_s, greedy_s = spec_s + s["seconds"], greedy_s + s["baseline_seconds"]
        identical = identical and s["identical"]
    return dict(tokens_per_forward=tokens / max(forwards, 1), speculative_s=spec_s, greedy_s=greedy_s,
                speedup=greedy_s / spec_s, identical=identical, per_prompt=per_prompt)


def main(argv=None):
    p = OneLineParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["memory", "speculative", "costs", "memory-child"])
    p.add_argument("--n", type=int, nargs="+", default=None, help="heads (memory: 1 2 4 8; costs: 2 4)")
    p.add_argument("--widths", type=int, nargs="+", default=[128, 256, 512, 768], help="costs: n_embd values")
    p.add_argument("--layers", type=int, default=12, help="costs: total blocks L")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "both"], default="both", help="costs: weights' dtype")
    p.add_argument("--naive", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="{}", help="JSON overrides of the memory model, e.g. '{\"n_embd\": 128}'")
    p.add_argument("--ckpt", nargs="+", default=[])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (the paper); > 0: speculative sampling")
    a = p.parse_args(argv)
    if a.what == "memory-child":
        print(one_step_memory(a.n[0], bool(a.naive), a.device, **json.loads(a.model)))
        return
    if a.what == "memory":
        model = {**MEMORY_MODEL, **json.loads(a.model)}
        ns = a.n or [1, 2, 4, 8]
        bad = [n for n in ns if not 1 <= n <= model["n_layer"]]
        if bad:
            raise UserError(f"--n {bad[0]}: every n must be in 1..{model['n_layer']} (the memory model's n_layer)")
        r = measure_memory(ns, a.device, **json.loads(a.model))
        print(f"peak extra memory of one training step on {a.device}, {model}, batch {MEMORY_BATCH}")
        print(f"NTP: {r['ntp'] / 2**20:.0f} MiB")
        print("n | memory-efficient MiB (x NTP) | naive MiB (x NTP)")
        for n in ns:
            e, v = r["efficient"][n], r["naive"][n]
            print(f"{n} | {e / 2**20:.0f} ({e / r['ntp']:.2f}x) | {v / 2**20:.0f} ({v / r['ntp']:.2f}x)")
        return
    if a.what == "costs":
        ns = a.n or [2, 4]
        bad = [n for n in ns if not 2 <= n <= a.layers]
        if bad:
            raise UserError(f"--n {bad[0]}: speculative decoding needs 2 <= n <= --layers {a.layers}")
        dtypes = ("float32", "bfloat16") if a.dtype == "both" else (a.dtype,)
        print(f"verify forward (n positions through all L blocks, every head's logits) / cached greedy step (1 "
              f"position, trunk + head 1) on {a.device}: random weights, L = {a.layers} blocks, byte vocabulary, 64 "
              f"cached positions, median of 20 alternating runs of {'CPU' if a.device == 'cpu' else 'wall'} time, "
              f"{torch.get_num_threads()} thread(s); speculative decoding pays when tokens/forward > ratio")
        print("n_embd | n | dtype    | greedy step ms | verify ms | ratio | L/(L-n+1)")
        for r in cost_table(a.widths, ns, a.layers, dtypes, device=a.device):
            print(f"{r['n_embd']:6d} | {r['n']} | {r['dtype']:8s} | {r['step_s'] * 1e3:14.2f} | "
                  f"{r['verify_s'] * 1e3:9.2f} | {r['ratio']:5.2f} | {r['blocks']:.2f}")
        return
    if not a.ckpt:
        raise UserError("speculative needs --ckpt PATH [PATH ...] (multi-token checkpoints)")
    for path in a.ckpt:
        model, _, saved, _ = objectives.load_model(path, a.device)
        if not hasattr(model, "n_future"):
            raise UserError(f"{path} is a {saved.objective} checkpoint: speculative needs an mtp one")
        data = load_data(saved.dataset, saved.tokenizer)
        r = speculative_benchmark(model, data, a.prompts, 32, a.new_tokens, temperature=a.temperature)
        print(f"{path}: {saved.dataset}/{saved.tokenizer} n={model.n_future} T={a.temperature} | "
              f"{r['tokens_per_forward']:.2f} tokens/forward | speculative {r['speculative_s']:.2f}s vs cached "
              f"{'greedy' if a.temperature == 0 else 'sampling'} {r['greedy_s']:.2f}s = "
              f"{r['speedup']:.2f}x | identical: {r['identical']}")
        per = sorted(r["per_prompt"])
        print(f"  per prompt ({len(per)}): min {per[0]:.2f} | median {statistics.median(per):.2f} | max {per[-1]:.2f}")


if __name__ == "__main__":
    main()
