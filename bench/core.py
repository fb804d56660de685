"""The shared GPT core's training speed: RoPE against learned positions, side by side in one process.

    python -m bench core [--shapes small,medium] [--rounds 9] [--steps 4] [--threads 2] [--device cpu]
                         [--bf16] [--compile]

Method. One model per position scheme (same shape, bytes vocabulary, fp32 unless --bf16 autocast), each with its
own AdamW; a training step is forward, backward, gradient clipping and the optimizer step on random tokens. After
2 warm-up steps per model, every round times `steps` steps of each model in turn (the order rotates from round to
round), so a slow spell of a shared CPU hits both columns alike. Reported: the median over rounds of each model's
tokens/s and of the per-round ratio RoPE / learned (with its smallest and largest round).
"""
import contextlib
import statistics
import time
from types import SimpleNamespace

import torch

import train
from gpt import GPT, GPTConfig, UserError

# the two shapes of issue 16: (model, batch size); 'small' is also the `cpu` preset of `python -m bench table`
SHAPES = {"small": (dict(n_layer=4, n_head=4, n_embd=128, block_size=128), 16),
          "medium": (dict(n_layer=6, n_head=6, n_embd=384, block_size=256), 8),
          "gpu": (dict(n_layer=8, n_head=8, n_embd=512, block_size=256), 64)}
ADAMW = SimpleNamespace(learning_rate=1e-3, weight_decay=0.1, beta1=0.9, beta2=0.95)  # train.py's defaults


def build(shape, pos, vocab_size=256, device="cpu", compile_blocks=False):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=vocab_size, pos=pos, **shape)).to(device).train()
    if compile_blocks:
        for block in model.blocks:  # what train.py --compile does
            block.compile()
    return model


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def make_step(model, batch_size, device, autocast_dtype=None):
    """A function running one training step (AdamW as train.py sets it up) on fixed random tokens."""
    opt = train.make_optimizer(model, ADAMW, str(device))
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


def interleaved(steps_by_name, tokens_per_step, rounds, steps, device, warmup=2):
    """{name: [tokens/s of each round]}: every round times `steps` steps of every model, in rotating order."""
    for step in steps_by_name.values():
        for _ in range(warmup):
            step()
    names, speeds = list(steps_by_name), {name: [] for name in steps_by_name}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            sync(device)
            t = time.perf_counter()
            for _ in range(steps):
                steps_by_name[name]()
            sync(device)
            speeds[name].append(tokens_per_step * steps / (time.perf_counter() - t))
    return speeds


def compare(shape, batch_size, rounds=9, steps=4, device="cpu", autocast_dtype=None, compile_blocks=False,
            models=None):
    """Median tokens/s of RoPE and learned positions (and of any extra {name: model}) and the median per-round
    ratio rope / learned with its range."""
    models = dict(rope=build(shape, "rope", device=device, compile_blocks=compile_blocks),
                  learned=build(shape, "learned", device=device, compile_blocks=compile_blocks), **(models or {}))
    steps_by_name = {name: make_step(m, batch_size, device, autocast_dtype) for name, m in models.items()}
    speeds = interleaved(steps_by_name, batch_size * shape["block_size"], rounds, steps, device)
    ratios = sorted(r / l for r, l in zip(speeds["rope"], speeds["learned"]))
    return dict(tok_s={name: statistics.median(s) for name, s in speeds.items()}, rounds=speeds,
                ratio=statistics.median(ratios), ratio_min=ratios[0], ratio_max=ratios[-1])


def main(argv=None):
    parser = train.OneLineParser(prog="python -m bench core", description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="small,medium", help=f"comma-separated, from {', '.join(SHAPES)}")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=4, help="training steps per model and round")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (train.py does it on CUDA)")
    parser.add_argument("--compile", action="store_true", help="compile every block, as train.py --compile")
    a = parser.parse_args(argv)
    bad = [s for s in a.shapes.split(",") if s not in SHAPES]
    if bad or a.rounds < 1 or a.steps < 1:
        raise UserError(f"unknown shape {bad[0]!r}: choose from {', '.join(SHAPES)}" if bad else
                        "--rounds and --steps must be at least 1")
    torch.set_num_threads(a.threads)
    dtype = "bf16 autocast" if a.bf16 else "fp32"
    print(f"{a.device}, {torch.get_num_threads()} threads, {dtype}, compile={a.compile}, torch {torch.__version__}; "
          f"median of {a.rounds} interleaved rounds of {a.steps} steps")
    for name in a.shapes.split(","):
        shape, B = SHAPES[name]
        r = compare(shape, B, a.rounds, a.steps, a.device, torch.bfloat16 if a.bf16 else None, a.compile)
        print(f"{name:6s} {shape['n_layer']} x {shape['n_embd']}, batch {B} x {shape['block_size']}: "
              f"RoPE {r['tok_s']['rope']:,.0f} tok/s | learned {r['tok_s']['learned']:,.0f} tok/s | "
              f"RoPE / learned {r['ratio']:.3f} (rounds {r['ratio_min']:.3f}-{r['ratio_max']:.3f})")


if __name__ == "__main__":
    main()
