"""Benchmarks for mtp.py (numbers for the README and the tutorial; nothing here is asserted by a test).

    python -m bench mtp memory [--n 1 2 4 8] [--device cpu|cuda]     peak training memory, memory-efficient vs naive
    python -m bench mtp speculative --ckpt out/mtp/ckpt.pt ...       tokens per forward and speed-up vs greedy
    python -m bench mtp costs [--n 2 4] [--widths 192]               when speculative decoding can pay off

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

from gpt import GPT, GPTConfig
from mtp import MTP, mtp_forward_backward, speculative_benchmark
from train import OneLineParser

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
            mtp_forward_backward(net, x, y, args)

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
def forward_costs(n_future, n_embd, n_layer=8, vocab_size=256, context=64, repeats=50, device="cpu"):
    """Seconds of (a) one cached greedy step (1 position, trunk + head 1) and (b) one speculative forward
    (n positions, all n heads, every head's logits), for a randomly initialised model: speculative decoding pays
    off when tokens per forward > (b) / (a). On a CPU a tiny model is bound by per-operation overhead and its
    cost grows with the positions; a wide one is bound by reading the weights, which n positions share."""
    from gpt import KVCache
    cfg = GPTConfig(vocab_size=vocab_size, n_layer=n_layer, n_head=max(1, n_embd // 64), n_embd=n_embd,
                    block_size=context + 2 * n_future)
    model = MTP(cfg, n_future).to(device).eval()
    idx = torch.randint(vocab_size, (1, context + n_future), device=device)

    def timed(m, heads):
        cache = KVCache(n_layer)
        z = model.trunk_hidden(idx[:, :context], 0, cache)
        for i in range(n_future):
            model.head_hidden(i, z, 0, cache)
        best = float("inf")
        for _ in range(repeats):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t = time.perf_counter()
            z = model.trunk_hidden(idx[:, context:context + m], context, cache)
            model.trunk.lm_head(torch.stack([model.head_hidden(i, z, context, cache)[0] for i in range(heads)]))
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
            cache.crop(context)
        return best

    return timed(1, 1), timed(n_future, n_future)


def main(argv=None):
    p = OneLineParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["memory", "speculative", "costs", "memory-child"])
    p.add_argument("--n", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--widths", type=int, nargs="+", default=[128, 256, 512, 1024], help="costs: n_embd values")
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
        r = measure_memory(a.n, a.device, **json.loads(a.model))
        print(f"peak extra memory of one training step on {a.device}, {model}, batch {MEMORY_BATCH}")
        print(f"NTP: {r['ntp'] / 2**20:.0f} MiB")
        print("n | memory-efficient MiB (x NTP) | naive MiB (x NTP)")
        for n in a.n:
            e, v = r["efficient"][n], r["naive"][n]
            print(f"{n} | {e / 2**20:.0f} ({e / r['ntp']:.2f}x) | {v / 2**20:.0f} ({v / r['ntp']:.2f}x)")
        return
    if a.what == "costs":
        print(f"per-forward cost on {a.device} (random weights, 8 blocks, byte vocabulary, 64 cached positions)")
        for width in a.widths:
            for n in a.n:
                if n > 1:
                    g, s = forward_costs(n, width, device=a.device)
                    print(f"n_embd {width:4d} n={n}: greedy step {g * 1e3:.2f} ms | speculative forward "
                          f"{s * 1e3:.2f} ms | break-even at {s / g:.2f} tokens/forward")
        return
    import sample
    from data import load_data
    for path in a.ckpt:
        model, _, saved, _ = sample.load_model(path, a.device)
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
