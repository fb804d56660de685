"""CALM benchmarks: generation speed against next-token prediction, and (`run`) the experiments of the README.

    python -m bench calm [--K 4] [--tokens 256] [--n_layer 4 --n_embd 128 --n_head 4] [--device cpu|cuda]
    python -m bench calm run EXPERIMENT [--shard I/N] [--only REGEX]     recipe sweep, curves, heads (calm_runs.py)
    python -m bench calm list                                           what each experiment trains

Speed: CALM (one vector = K tokens per backbone step) against next-token prediction with the same backbone, both
with a KV cache, batch 1, random weights (speed does not depend on training). Reports backbone steps per generated
token, tokens/s, and where CALM's time goes (backbone, input compression, generative head, autoencoder decoder),
each timed by synchronised wall clock around the module calls.
"""
import sys
import time
from collections import defaultdict

import torch

import calm
from gpt import GPT, GPTConfig
from runtime import OneLineParser
from bench.common import sync



def timed(obj, attr, name, totals, device):
    """Replace obj.attr (a method) by a copy that adds its wall-clock time to totals[name]."""
    method = getattr(obj, attr)

    def wrapper(*a, **k):
        sync(device)
        t = time.perf_counter()
        out = method(*a, **k)
        sync(device)
        totals[name] += time.perf_counter() - t
        totals["calls of " + name] += 1
        return out
    setattr(obj, attr, wrapper)


def run(fn, device, repeats):
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = OneLineParser(description=__doc__.splitlines()[0])
    p.add_argument("--K", type=int, default=4)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--n_head", type=int, default=4)
    p.add_argument("--n_embd", type=int, default=128)
    p.add_argument("--vocab_size", type=int, default=256)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    dev, n = a.device, a.tokens
    block = (n + 64) // a.K * a.K                                     # the whole generation fits one window
    gcfg = GPTConfig(block_size=block, vocab_size=a.vocab_size, n_layer=a.n_layer, n_head=a.n_head, n_embd=a.n_embd)
    torch.manual_seed(0)
    ntp = GPT(gcfg).to(dev).eval()
    model = calm.CALM(gcfg, calm.AEConfig(chunk_size=a.K), calm.HeadConfig()).to(dev).eval()
    prompt = torch.zeros(1, a.K, dtype=torch.long, device=dev)
    gen = torch.Generator(dev).manual_seed(0)

    t_ntp = run(lambda: ntp.generate(prompt, n, temperature=1.0, generator=gen), dev, a.repeats)
    t_calm = run(lambda: calm.generate_chunks(model, prompt, n // a.K, gen), dev, a.repeats)
    totals = defaultdict(float)
    for obj, attr, name in [(model.backbone, "body", "backbone"), (model.compress, "forward", "input compression"),
                            (model.head, "forward", "generative head"), (model.ae, "decode", "decoder")]:
        timed(obj, attr, name, totals, dev)
    sync(dev)
    t0 = time.perf_counter()
    calm.generate_chunks(model, prompt, n // a.K, gen)
    sync(dev)
    total = time.perf_counter() - t0

    times = {k: v for k, v in totals.items() if not k.startswith("calls")}
    steps = totals["calls of backbone"] / n
    print(f"device {dev} | backbone {a.n_layer}L x {a.n_embd}d, vocab {a.vocab_size} | {n} new tokens, batch 1")
    print(f"NTP       : 1.000 backbone steps/token | {n / t_ntp:8,.0f} tok/s")
    print(f"CALM K={a.K}  : {steps:.3f} backbone steps/token | {n / t_calm:8,.0f} tok/s | "
          f"speed-up {t_ntp / t_calm:.2f}x (physical limit of the step count: {a.K}x)")
    print("CALM time split (one instrumented run): " + ", ".join(
        f"{k} {100 * v / total:.0f}%" for k, v in times.items()) +
        f", other (sampling glue, concatenation) {100 * (total - sum(times.values())) / total:.0f}%")
    return dict(ntp_tok_s=n / t_ntp, calm_tok_s=n / t_calm, calm_steps_per_token=steps,
                split={k: v / total for k, v in times.items()})


if __name__ == "__main__":
    main()
