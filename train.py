"""Train any objective of this repository on one CPU/GPU, or several under torchrun.

    python train.py --objective ntp|mtp|autoencoder|calm|dispersion [--preset cpu|gpu] [--any_config_field VALUE]
    torchrun --nproc_per_node 2 train.py ...       (data parallel: nccl on GPU, gloo on CPU)

An objective is a dict, defined next to its paper (mtp.py, calm.py, dispersion.py; the plain next-token objective
NTP in runtime.py, which also finds objectives by name, saves and loads checkpoints and parses flags):
  config            dataclass of the objective's own flags (added to the command line), or None
  build(gcfg, args, data) -> nn.Module            gcfg: the GPTConfig built from the flags
  loss(model, x, y, args) -> (loss, {name: float})  x, y: (B, T) tokens and next-token targets
  forward_backward(model, x, y, args, scale)      optional: compute the gradients of scale*loss yourself
                                                  (MTP's memory-efficient schedule); returns what loss returns
  evaluate(model, data, args) -> {name: float}    optional extra eval metrics
  generate(model, idx, args, generator) -> idx    sample args.max_new_tokens tokens after idx (1, T)
  default_temperature                             optional: sampling temperature when none is given (0.8)
  default_tokenizer                               optional: tokenizer when none is given (gpt2)
  presets                                         optional: {preset: {flag: default}}, the objective's own
                                                  defaults per --preset (CALM's recipe), over PRESETS
  draw(model, ctx, n_tokens, generator, args)     optional: (B, n_tokens) sampled continuations of ctx (B, T),
                                                  what BrierLM needs (default: generate at temperature 1)
  prepare(args, data) -> [(what, path, flags)]    optional: models to train first with these train.py flags
                                                  (a dict) when path is missing (CALM's autoencoder)
The loop below knows nothing else about any objective.
"""
import dataclasses
import io
import math
import os
import random
import sys
import time
from contextlib import nullcontext, redirect_stderr, redirect_stdout

import numpy as np
import torch
import torch.distributed as dist

import brierlm
from data import load_data
from gpt import GPTConfig, UserError
from runtime import (NTP, REGISTRY, OneLineParser, OutDirLock, default_draw, duration, first_non_finite,  # noqa: F401
                     get_objective, gpt_config, load_checkpoint, model_keys, ntp_generate, ntp_loss, parse_bool,
                     pick_device, save_checkpoint, to_argv)
# (NTP, the objective registry, checkpoints, devices and the parser live in runtime.py, below the paper files;
#  the names above stay importable from train for notebooks and bench/.)


# ----------------------------------------------------------------------------- command line

@dataclasses.dataclass
class TrainConfig:
    objective: str = "ntp"
    preset: str = "cpu"
    dataset: str = None           # None: shakespeare, falling back to pystdlib offline
    tokenizer: str = None         # None: gpt2, falling back to bytes offline
    device: str = "auto"          # auto: cuda > mps > cpu
    out_dir: str = None           # None: out/<objective>
    seed: int = 1337
    batch_size: int = 8           # sequences per micro-batch per process
    grad_accum: int = 1
    max_iters: int = 300
    eval_interval: int = 100
    eval_iters: int = 10
    log_interval: int = 10
    learning_rate: float = 1e-3
    min_lr: float = None          # None: learning_rate / 10
    warmup_iters: int = 30
    lr_decay_iters: int = None    # None: max_iters
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    brier_positions: int = 64     # BrierLM positions per eval (0: off)
    compile: bool = False
    resume: bool = False
    overwrite: bool = False
    sample_tokens: int = 100      # tokens of the sample printed at the end (0: none)


PRESETS = {
    "cpu": {},  # the dataclass defaults: ~1.6M non-embedding params, a few minutes on 2 cores
    "gpu": dict(batch_size=64, block_size=256, n_layer=8, n_head=8, n_embd=512, dropout=0.2, max_iters=5000,
                eval_interval=500, eval_iters=50, log_interval=50, learning_rate=6e-4, warmup_iters=200,
                brier_positions=512),
}
SAMPLE_FLAGS = dict(max_new_tokens=100, temperature=0.8, top_k=200, speculative=False)


def add_fields(parser, cls, skip=()):
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        if f.type in (bool, "bool"):
            parser.add_argument(f"--{f.name}", type=parse_bool, nargs="?", const=True, default=f.default)
        else:
            kind = {"int": int, "float": float, "str": str}.get(getattr(f.type, "__name__", f.type), str)
            parser.add_argument(f"--{f.name}", type=kind, default=f.default)


def parse_args(argv=None):
    """(args, objective). Every number is checked by OneLineParser (runtime.NUMBER_RULES); args.typed holds the
    flags given on the command line."""
    first = OneLineParser(add_help=False)
    first.add_argument("--objective", default="ntp")
    first.add_argument("--preset", default="cpu")
    known, _ = first.parse_known_args(argv)
    objective = get_objective(known.objective)
    if known.preset not in PRESETS:
        raise UserError(f"unknown preset {known.preset!r}: choose from {', '.join(PRESETS)}")
    parser = OneLineParser(description=__doc__.splitlines()[0])
    add_fields(parser, TrainConfig)
    add_fields(parser, GPTConfig, skip=("vocab_size",))
    if objective["config"] is not None:
        add_fields(parser, objective["config"])
    parser.set_defaults(**{**PRESETS[known.preset], **objective.get("presets", {}).get(known.preset, {})})
    args = parser.parse_args(argv)
    args.out_dir = args.out_dir or os.path.join("out", args.objective)
    args.min_lr = args.learning_rate / 10 if args.min_lr is None else args.min_lr
    args.lr_decay_iters = args.max_iters if args.lr_decay_iters is None else args.lr_decay_iters
    for k, v in SAMPLE_FLAGS.items():
        setattr(args, k, v)
    args.temperature = objective.get("default_temperature", args.temperature)  # CALM's T must be 1/n
    args.max_new_tokens = args.sample_tokens
    return args, objective


# ----------------------------------------------------------------------------- checkpoints

# settings that change the optimisation but not the model: on --resume they come from the command line, and a
# value that differs from the checkpoint's is reported
SCHEDULE_KEYS = ["batch_size", "grad_accum", "learning_rate", "min_lr", "warmup_iters", "lr_decay_iters",
                 "weight_decay", "beta1", "beta2", "grad_clip"]


def merge_resumed_args(args, ckpt, objective):
    """Model-shaping settings come from the checkpoint; a typed flag that contradicts one is an error. Returns
    the schedule settings that differ from the checkpoint's run (they apply from now on)."""
    if ckpt["objective"] != args.objective:
        raise UserError(f"checkpoint was trained with --objective {ckpt['objective']}, not {args.objective}")
    saved = ckpt["args"]
    for k in model_keys(objective):
        if k in args.typed and k in saved and getattr(args, k) != saved[k]:
            raise UserError(f"checkpoint has {k}={saved[k]!r} but --{k} {getattr(args, k)!r} was given")
        if k in saved:
            setattr(args, k, saved[k])
    return [f"--{k} {getattr(args, k)} (checkpoint: {saved[k]})" for k in SCHEDULE_KEYS
            if k in saved and getattr(args, k) != saved[k]]


def rng_state(batch_gen):
    """Every random stream, as tensors and plain Python values (what weights_only loading accepts)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return dict(torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                numpy=(kind, keys.tolist(), pos, has_gauss, gauss), python=random.getstate(),
                batches=batch_gen.get_state())


def set_rng_state(state, batch_gen):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    batch_gen.set_state(state["batches"])


# ----------------------------------------------------------------------------- the loop

def lr_at(it, args):
    """Linear warm-up, then cosine decay from learning_rate to min_lr at lr_decay_iters."""
    if it < args.warmup_iters:
        return args.learning_rate * (it + 1) / (args.warmup_iters + 1)
    if it >= args.lr_decay_iters:
        return args.min_lr
    ratio = (it - args.warmup_iters) / max(1, args.lr_decay_iters - args.warmup_iters)
    return args.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (args.learning_rate - args.min_lr)


def make_optimizer(model, args, device):
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [dict(params=[p for p in params if p.dim() >= 2], weight_decay=args.weight_decay),  # matrices decay
              dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]               # norms, biases don't
    if hasattr(model, "param_groups"):  # optional: a model's own groups, e.g. with an "lr_scale" (CALM's head)
        groups = model.param_groups(groups, args)
    return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(args.beta1, args.beta2),
                             fused=device.startswith("cuda"))


@torch.no_grad()
def evaluate(model, objective, data, args, ctx):
    """Mean loss over eval_iters fixed batches per split (own generator: training's RNG is untouched)."""
    model.eval()
    out = {}
    for split in ("train", "val"):
        gen = torch.Generator().manual_seed(args.seed + 1)
        losses = []
        for _ in range(args.eval_iters):
            x, y = data.get_batch(split, args.batch_size, args.block_size, gen, args.device)
            with ctx:
                losses.append(objective["loss"](model, x, y, args)[0].item())
        out[f"{split}_loss"] = sum(losses) / len(losses)
    if objective.get("evaluate"):
        out.update(objective["evaluate"](model, data, args))
    if args.brier_positions > 0:
        out.update(brierlm.evaluate_objective(model, objective, data, args))
    model.train()
    return out


def forward_backward(model, objective, x, y, args, scale, ctx):
    if objective.get("forward_backward"):
        with ctx:
            return objective["forward_backward"](model, x, y, args, scale)
    with ctx:
        loss, logs = objective["loss"](model, x, y, args)
    (loss * scale).backward()
    return loss.detach(), logs


def all_reduce_grads(model, world):
    """Average gradients over processes (what DDP does, without overlapping it with the backward pass)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    for g, chunk in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(chunk.view_as(g))


LONG_BLOCK = 4096  # above this, warn with the cost: attention grows with block_size^2


def warn_long_block(args, model, vocab_size, tokens_per_iter):
    if args.block_size <= LONG_BLOCK:
        return
    n_params = sum(p.numel() for p in model.parameters())
    attention = 6 * args.n_layer * args.block_size * args.n_embd    # per token, causal, forward + backward
    flops = tokens_per_iter * (6 * n_params + attention)
    logits_gb = 3 * args.batch_size * args.block_size * vocab_size * 4 / 1e9  # (B, T, V) logits, softmax, grad
    print(f"WARNING: --block_size {args.block_size}: attention grows with block_size^2; one iteration is "
          f"~{flops:.1e} FLOPs ({attention / (6 * n_params + attention):.0%} attention, "
          f"{duration(flops / 1e11)} at 0.1 TFLOP/s) and its logits take ~{logits_gb:.1f} GB; "
          f"the first progress line gives the ETA", file=sys.stderr)


def train(args, objective):
    """Devices, processes and the out_dir lock around fit(); the lock is released however fit() ends."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    args.device = pick_device(args.device)
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    if args.resume and not os.path.exists(ckpt_path):  # before anything is created
        raise UserError(f"--resume: nothing to resume, no checkpoint at {ckpt_path}")
    if world > 1:
        if args.device == "cuda":
            args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(args.device)
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    lock = OutDirLock(args.out_dir) if rank == 0 else None  # one training per out_dir
    try:
        return fit(args, objective, world, rank, ckpt_path)
    finally:
        if lock is not None:
            lock.release()
        if world > 1:
            dist.destroy_process_group()


def fit(args, objective, world, rank, ckpt_path):
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    if master and os.path.exists(ckpt_path + ".tmp"):  # we hold the lock: nobody else is writing it
        os.remove(ckpt_path + ".tmp")
        log(f"removed {ckpt_path}.tmp, a partial checkpoint left by an interrupted run")
    saved, changed = None, []
    if args.resume:
        saved = load_checkpoint(ckpt_path)
        missing = [k for k in ("optimizer", "rng", "iter") if k not in saved]
        if missing or not isinstance(saved["iter"], int):
            raise UserError(f"{ckpt_path} cannot be resumed: it lacks {', '.join(missing) or 'an integer iter'}")
        changed = merge_resumed_args(args, saved, objective)
        if saved["iter"] > args.max_iters:
            raise UserError(f"--resume: {ckpt_path} is at iteration {saved['iter']}, past --max_iters "
                            f"{args.max_iters}; pass --max_iters above {saved['iter']} to train on, or --overwrite "
                            f"to start again")
    elif os.path.exists(ckpt_path) and not args.overwrite:
        raise UserError(f"{ckpt_path} exists: pass --resume to continue it, --overwrite to replace it, "
                        f"or choose another --out_dir")

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if args.device.startswith("cuda") else nullcontext()

    data = load_data(args.dataset, args.tokenizer or objective.get("default_tokenizer"))
    args.dataset, args.tokenizer = data.name, data.tokenizer.name  # what was really used (after any fallback)
    data.random_offsets("val", 1, args.block_size)  # block_size larger than the data: a clear error now
    if "prepare" in objective and not args.resume:
        for what, path, flags in objective["prepare"](args, data):
            if os.path.exists(path):
                log(f"{args.objective}: reusing {what} at {path}")
            else:
                log(f"{args.objective}: training {what} first into {path}")
                train(*parse_args(to_argv(flags)))
    model = objective["build"](gpt_config(args, data.vocab_size), args, data).to(args.device)
    optimizer = make_optimizer(model, args, args.device)
    batch_gen = torch.Generator().manual_seed(args.seed)  # the data position: same on every rank
    start, metrics = 0, {}
    if saved is not None:
        try:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            set_rng_state(saved["rng"], batch_gen)
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{ckpt_path} cannot be resumed: its state does not fit this model "
                            f"({type(e).__name__})") from None
        start, metrics = saved["iter"], saved.get("metrics", {})
        log(f"resumed from {ckpt_path} at iteration {start}")
        if changed:
            log("resume: these settings come from the command line, not the checkpoint: " + ", ".join(changed))
        if start == args.max_iters:
            log(f"nothing to train: the checkpoint is already at --max_iters {args.max_iters}")
            return metrics
    if args.compile:
        for m in model.modules():  # compile each Transformer block: every objective benefits
            if type(m).__name__ == "Block":
                m.compile()
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"objective {args.objective} | data {data.name}/{data.tokenizer.name} | {n_params / 1e6:.2f}M trainable "
        f"params | device {args.device} | {world} process(es)")
    B, T = args.batch_size, args.block_size
    tokens_per_iter = B * T * args.grad_accum * world
    if master:
        warn_long_block(args, model, data.vocab_size, tokens_per_iter)

    # what a stop message may promise about the checkpoint on disk (it must be true)
    last_saved = start if saved is not None else None
    earlier = os.path.exists(ckpt_path)  # with --overwrite: an earlier run's file until this run saves

    def stopped(reason):
        if last_saved is not None:
            kept = f"the last good checkpoint (iteration {last_saved}) is kept at {ckpt_path}"
        else:
            kept = f"nothing was saved; {ckpt_path} still holds the earlier run" if earlier else "nothing was saved"
        return UserError(f"{reason}: stopped; {kept}")

    def checkpoint(it):
        nonlocal last_saved
        state = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), iter=it, metrics=metrics,
                     args={k: v for k, v in vars(args).items() if k != "typed"}, objective=args.objective,
                     rng=rng_state(batch_gen))
        bad = first_non_finite(state, "")  # checked on every rank, so that all ranks stop together
        if bad:
            raise stopped(f"training diverged: {bad} is not finite at iteration {it}")
        if master:
            save_checkpoint(ckpt_path, state)
        last_saved = it

    t0 = t_log = time.time()
    it = it_log = start
    try:
        for it in range(start, args.max_iters + 1):
            if (it % args.eval_interval == 0 or it == args.max_iters) and not (saved is not None and it == start):
                metrics.update(evaluate(model, objective, data, args, ctx), iter=it)
                log(f"eval {it}: " + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "iter"))
                checkpoint(it)
                t_log, it_log = time.time(), it  # the progress line's speed leaves evaluation out
            if it == args.max_iters:
                break
            for group in optimizer.param_groups:
                group["lr"] = lr_at(it, args) * group.get("lr_scale", 1.0)
            ix = data.random_offsets("train", B * args.grad_accum * world, T, batch_gen)
            for micro in range(args.grad_accum):
                lo = (micro * world + rank) * B  # global batch drawn once, then split: same on 1 or N processes
                x, y = data.batch_at("train", ix[lo:lo + B], T, args.device)
                loss, logs = forward_backward(model, objective, x, y, args, 1.0 / args.grad_accum, ctx)
            if world > 1:
                all_reduce_grads(model, world)
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise stopped(f"loss is {loss_value} at iteration {it}")
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            metrics["train_loss_last"] = loss_value
            if (it + 1) % args.log_interval == 0 or it == start:  # the first one too: a slow run shows its ETA
                dt = (time.time() - t_log) / (it + 1 - it_log)
                t_log, it_log = time.time(), it + 1
                eta = (args.max_iters - it - 1) * (time.time() - t0) / (it + 1 - start)
                extra = "".join(f" | {k} {v:.4f}" for k, v in logs.items())
                log(f"iter {it + 1}/{args.max_iters} | loss {loss_value:.4f}{extra} | lr {lr_at(it, args):.2e} | "
                    f"{tokens_per_iter / dt:,.0f} tok/s | ETA {duration(eta)}")
    except (torch.OutOfMemoryError, MemoryError) as e:
        raise stopped(f"out of memory at iteration {it} ({type(e).__name__}): lower --batch_size or "
                      f"--block_size") from None
    except RuntimeError as e:
        if "can't allocate memory" not in str(e):
            raise
        raise stopped(f"out of memory at iteration {it}: lower --batch_size or --block_size") from None
    log(f"done in {time.time() - t0:.0f}s; checkpoint {ckpt_path}")
    if master and args.sample_tokens > 0:
        model.eval()
        prompt = torch.tensor([data.tokenizer.encode("\n")], dtype=torch.long, device=args.device)
        with ctx:
            out = objective["generate"](model, prompt, args, torch.Generator(args.device).manual_seed(args.seed))
        log("sample:\n" + data.tokenizer.decode(out[0].tolist()))
    return metrics


def main(argv=None):
    try:
        args, objective = parse_args(argv)
        return train(args, objective)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: the last checkpoint written is kept", file=sys.stderr)
        sys.exit(130)


def run_quietly(argv):
    """main(argv) with its progress lines captured (notebooks, bench/): returns the metrics. Warnings still reach
    stderr; a failure becomes a UserError carrying main's one-line error."""
    out, err = io.StringIO(), io.StringIO()
    try:
        with redirect_stdout(out), redirect_stderr(err):
            metrics = main(argv)
    except SystemExit:
        lines = err.getvalue().strip().splitlines() or ["training failed"]
        raise UserError(lines[-1].removeprefix("error: ")) from None
    sys.stderr.write(err.getvalue())
    return metrics


if __name__ == "__main__":
    main()
