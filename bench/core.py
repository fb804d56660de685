"""The shared GPT core's training speed: RoPE against learned positions, side by side in one process.

    python -m bench core [--shapes small,medium] [--rounds 9] [--steps 4] [--threads 2] [--device cpu|cuda]
                         [--bf16] [--compile] [--clock wall|cpu] [--out results/core.json]

Method. One model per position scheme (same shape, bytes vocabulary), each with its own AdamW as train.py builds
it; a training step is forward, backward, gradient clipping and the optimizer step on fixed random tokens, in fp32
(--bf16: under bf16 autocast, as train.py trains on CUDA). After 2 warm-up steps per model, every round times
`steps` steps of each model in turn, the order rotating from round to round, so a slow spell of a shared CPU hits
both columns alike. Reported: the median over rounds of each model's tokens/s, the median of the per-round ratio
RoPE / learned with its smallest and largest round, and on CUDA the MFU (FLOPs per token of bench/flops.py x tokens/s
/ the GPU's dense bf16 peak). --clock cpu times this process's CPU time instead of the wall clock: on a CPU shared with
other jobs, with --threads 1, it counts the step's own work and not the time other jobs held the cores.
"""
import contextlib
import os
import statistics
import sys
import time
from types import SimpleNamespace

import torch

import objectives
import runtime
import trainer
from bench.flops import train_flops_per_token
from gpt import GPT, GPTConfig
from runtime import UserError
from bench import records
from bench.common import sync

# (model, batch size): the two shapes of issue 16 ('small' is also the cpu preset of python -m bench table), the
# gpu preset's, and a toy one for the tests
SHAPES = {"small": (dict(n_layer=4, n_head=4, n_embd=128, block_size=128), 16),
          "medium": (dict(n_layer=6, n_head=6, n_embd=384, block_size=256), 8),
          "gpu": (dict(n_layer=8, n_head=8, n_embd=512, block_size=256), 64),
          "toy": (dict(n_layer=1, n_head=2, n_embd=32, block_size=16), 2)}
ADAMW = SimpleNamespace(learning_rate=1e-3, weight_decay=0.1, beta1=0.9, beta2=0.95)  # train.py's defaults
BF16_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 peaks (SXM), for MFU


def gpu_peak_flops(device):
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in BF16_PEAK_FLOPS.items() if k in name), None)


def build(shape, pos, device="cpu", compile_blocks=False):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=256, pos=pos, **shape)).to(device).train()
    if compile_blocks:
        for block in model.blocks:  # what train.py --compile does
            block.compile()
    return model



def make_step(model, batch_size, device, autocast_dtype=None):
    """A function running one training step of model on fixed random tokens."""
    opt = trainer.make_optimizer(model, objectives.NTP, ADAMW, str(device))
    T, V = model.config.block_size, model.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    x, y = (torch.randint(V, (batch_size, T), generator=gen).to(device) for _ in range(2))
    kind = str(device).split(":")[0]
    ctx = torch.autocast(kind, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()

    def step():
        with ctx:
            _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step


def interleaved(steps_by_name, tokens_per_step, rounds, steps, device, warmup=2, clock=time.perf_counter):
    """{name: [tokens/s of each round]}: every round times `steps` steps of every model, in rotating order."""
    for step in steps_by_name.values():
        for _ in range(warmup):
            step()
    names, speeds = list(steps_by_name), {name: [] for name in steps_by_name}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            sync(device)
            t = clock()
            for _ in range(steps):
                steps_by_name[name]()
            sync(device)
            speeds[name].append(tokens_per_step * steps / (clock() - t))
    return speeds


def compare(shape, batch_size, rounds=9, steps=4, device="cpu", autocast_dtype=None, compile_blocks=False,
            clock="wall"):
    """RoPE against learned positions at one shape: tokens/s of each (median over rounds), the median per-round
    ratio rope / learned with its range, and MFU on CUDA."""
    models = {pos: build(shape, pos, device, compile_blocks) for pos in ("rope", "learned")}
    steps_by_name = {pos: make_step(m, batch_size, device, autocast_dtype) for pos, m in models.items()}
    speeds = interleaved(steps_by_name, batch_size * shape["block_size"], rounds, steps, device,
                         clock=time.process_time if clock == "cpu" else time.perf_counter)
    ratios = sorted(r / l for r, l in zip(speeds["rope"], speeds["learned"]))
    tok_s = {pos: statistics.median(s) for pos, s in speeds.items()}
    mfu = {pos: "n/a on CPU" for pos in models}
    if str(device).startswith("cuda"):
        peak = gpu_peak_flops(device)
        mfu = {pos: train_flops_per_token(m, shape["block_size"]) * tok_s[pos] / peak if peak else "unknown GPU peak"
               for pos, m in models.items()}
    return dict(shape=shape, batch_size=batch_size, device=str(device), compile=compile_blocks, clock=clock,
                precision="bf16 autocast" if autocast_dtype else "fp32", tok_s=tok_s, mfu=mfu, rounds=speeds,
                ratio=statistics.median(ratios), ratio_min=ratios[0], ratio_max=ratios[-1])


def describe(r):
    s = r["shape"]
    mfu = "" if isinstance(r["mfu"]["rope"], str) else f" | MFU {r['mfu']['rope']:.1%} / {r['mfu']['learned']:.1%}"
    return (f"{s['n_layer']} x {s['n_embd']}, batch {r['batch_size']} x {s['block_size']}, {r['precision']}, "
            f"compile={r['compile']}, {r['clock']} clock: RoPE {r['tok_s']['rope']:,.0f} tok/s | learned "
            f"{r['tok_s']['learned']:,.0f} tok/s | RoPE / learned {r['ratio']:.3f} (rounds {r['ratio_min']:.3f}-"
            f"{r['ratio_max']:.3f}){mfu}")


def main(argv=None):
    parser = runtime.OneLineParser(prog="python -m bench core", description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="small,medium", help=f"comma-separated, from {', '.join(SHAPES)}")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=4, help="training steps per model and round")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (train.py does it on CUDA)")
    parser.add_argument("--compile", action="store_true", help="compile every block, as train.py --compile")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="cpu: this process's CPU time")
    parser.add_argument("--out", default=None, help="also write the results to this JSON file")
    a = parser.parse_args(argv)
    bad = [s for s in a.shapes.split(",") if s not in SHAPES]
    if bad:
        raise UserError(f"unknown shape {bad[0]!r}: choose from {', '.join(SHAPES)}")
    if a.rounds < 1 or a.steps < 1:
        raise UserError("--rounds and --steps must be at least 1")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda needs a CUDA GPU and none was found")
    if a.device.startswith("cuda") and a.clock == "cpu":
        raise UserError("--clock cpu times the CPU's work: use the wall clock on a GPU")
    torch.set_num_threads(a.threads)
    command = "python -m bench core " + " ".join(sys.argv[1:] if argv is None else argv)
    prov = records.provenance(dict(command=command, **{k: v for k, v in vars(a).items() if k != "typed"}),
                              [__name__], a.device)
    hardware = prov["hardware"]
    print(f"{hardware}, {torch.get_num_threads()} thread(s), torch {torch.__version__}; median of {a.rounds} "
          f"interleaved rounds of {a.steps} steps")
    results = []
    for name in a.shapes.split(","):
        shape, B = SHAPES[name]
        results.append(compare(shape, B, a.rounds, a.steps, a.device, torch.bfloat16 if a.bf16 else None, a.compile,
                               a.clock))
        print(f"{name:6s} {describe(results[-1])}", flush=True)
    if a.out:  # timings: a record of what made them, never re-checked to the digit by bench verify
        records.write_json(a.out, dict(experiment="core", module=None, description=__doc__.split("\n\n")[0],
                                       hardware=hardware, torch=torch.__version__, command=command,
                                       provenance=records.finish(prov), results=results))
        print(f"wrote {a.out}")
    return results


if __name__ == "__main__":
    main()
