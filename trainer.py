"""The training loop every objective shares (what `python train.py` runs), on one CPU/GPU or several under torchrun.

    main(argv)       parse the flags -> plan the stages -> train each stage, in that order
    parse_args       every flag: TrainConfig, GPTConfig and the objective's own (objectives.py), by preset
    plan             the stages of one command ([(args, objective)]: CALM trains its autoencoder first); every
                     flag, file and size of every stage is checked here (check_stage), before anything trains or
                     writes; warnings and what was decided are printed once every check has passed
    train            one stage: the out_dir lock, then fit
    fit              resume or start -> the loop (train_steps) -> a sample; a checkpoint at every evaluation
    run / run_quietly  main(flags) for notebooks and bench/ (quietly: the progress lines captured)

The loop knows nothing of any paper: an objectives.Objective gives it the model, the loss (or its own backward,
MTP's), extra evaluation metrics, a sampler and what to train first.
"""
import copy
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
from gpt import GPTConfig
from objectives import brier_scores, get_objective, gpt_config, model_keys
from runtime import (OneLineParser, OutDirLock, Progress, UserError, available_memory, duration, first_non_finite,
                     load_checkpoint, parse_bool, pick_device, save_checkpoint, to_argv)


# ----------------------------------------------------------------------------- command line

@dataclasses.dataclass
class TrainConfig:
    objective: str = "ntp"
    preset: str = "cpu"
    dataset: str = None           # None: shakespeare, falling back to pystdlib offline
    tokenizer: str = None         # None: the objective's default (gpt2, falling back to bytes offline)
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
    min_lr: float = None          # None: the objective's ratio x learning_rate (1/10; CALM: constant)
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
    flags given on the command line; defaults that depend on other flags are resolved here, once."""
    first = OneLineParser(add_help=False)
    first.add_argument("--objective", default="ntp")
    first.add_argument("--preset", default="cpu")
    known, _ = first.parse_known_args(argv)
    objective = get_objective(known.objective)
    if known.preset not in PRESETS:
        raise UserError(f"unknown preset {known.preset!r}: choose from {', '.join(PRESETS)}")
    parser = OneLineParser(description="Train any objective of this repository (see trainer.py)")
    add_fields(parser, TrainConfig)
    add_fields(parser, GPTConfig, skip=("vocab_size",))
    seen = set()
    for cls in objective.configs:
        add_fields(parser, cls, skip=seen)
        seen |= {f.name for f in dataclasses.fields(cls)}
    parser.set_defaults(**{**PRESETS[known.preset], **objective.presets.get(known.preset, {})})
    args = parser.parse_args(argv)
    args.out_dir = args.out_dir or os.path.join("out", args.objective)
    args.min_lr = args.learning_rate * objective.min_lr_ratio if args.min_lr is None else args.min_lr
    args.lr_decay_iters = args.max_iters if args.lr_decay_iters is None else args.lr_decay_iters
    for k, v in SAMPLE_FLAGS.items():
        setattr(args, k, v)
    args.temperature = objective.default_temperature
    args.max_new_tokens = args.sample_tokens
    return args, objective


# ----------------------------------------------------------------------------- the plan: checks before any work

LONG_BLOCK = 4096      # above this, warn with the cost: attention grows with block_size^2
SLOW_ITERATION = 3600  # seconds at 0.1 TFLOP/s: warn when one iteration (and so the first progress line) takes longer


def rank0():
    """Whether this process speaks for the run: the only one, or rank 0 under torchrun."""
    return int(os.environ.get("RANK", 0)) == 0


def process_device(name):
    """The device of this process: pick_device(name), and under torchrun 'cuda' is the GPU of its local rank."""
    device = pick_device(name)
    if device == "cuda" and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return device


def plan(args, objective):
    """The stages of this command, [(args, objective)], the last one what was asked for (CALM: its autoencoder
    first, when it must be trained). The data is loaded (which fixes the dataset and tokenizer after any offline
    fallback) and every stage's flags are checked, so bad input stops here: nothing trained, nothing written.
    What was decided and the warnings are printed only then, so a refused command prints its error alone."""
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    if args.resume and os.path.isfile(ckpt_path):  # the checkpoint says which data and tokenizer
        args = resumed_args(args, load_checkpoint(ckpt_path), objective)[0]
    data = load_data(args.dataset, args.tokenizer or objective.default_tokenizer)
    args = copy.copy(args)
    args.dataset, args.tokenizer = data.name, data.tokenizer.name  # what is really used (after any fallback)
    before, args, note = objective.prepare(args) if objective.prepare else ([], args, None)
    stages = [parse_args(to_argv(flags)) for flags in before] + [(args, objective)]
    warnings = [w for stage_args, stage_objective in stages for w in check_stage(stage_args, stage_objective, data)]
    if rank0():
        if note:
            print(note)
        for w in warnings:
            print(f"WARNING: {w}", file=sys.stderr)
    return stages, data


def check_stage(args, objective, data):
    """Every rule on one stage: device, out_dir and its files, --resume, sizes against the data and the memory, and
    the objective's own check. Raises a UserError; returns the warnings (a run that still makes sense)."""
    device = process_device(args.device)
    check_out_dir(args.out_dir)
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    if args.resume and args.overwrite:
        raise UserError("--resume continues a checkpoint and --overwrite replaces it: pass one of them")
    if args.resume and not os.path.exists(ckpt_path):
        raise UserError(f"--resume: nothing to resume, no checkpoint at {ckpt_path}")
    if args.resume:  # the model's settings come from the checkpoint: check those
        args = read_resumable(ckpt_path, args, objective)[1]
    if not args.resume and os.path.exists(ckpt_path) and not args.overwrite:
        raise UserError(f"{ckpt_path} exists: pass --resume to continue it, --overwrite to replace it, "
                        f"or choose another --out_dir")
    if args.min_lr > args.learning_rate:
        raise UserError(f"--min_lr {args.min_lr} is above --learning_rate {args.learning_rate}: the decay would "
                        f"raise the rate")
    for split in ("train", "val"):  # block_size larger than the data: an error (own generator: no seeded draw)
        data.random_offsets(split, 1, args.block_size, torch.Generator())
    if args.brier_positions > 0 and objective.language_model:  # BrierLM at every evaluation: its windows fit
        ctx_len = brierlm.context_length(args.block_size, getattr(args, "chunk_size", 1))
        brierlm.eval_windows(data, "val", args.brier_positions, ctx_len, torch.Generator())
    if objective.check is not None:
        objective.check(args, data)
    trainable, frozen = objective.size(args, data.vocab_size)
    check_memory(args, device, trainable, frozen, data.vocab_size)
    warnings = []
    if args.warmup_iters >= args.max_iters and not args.resume:
        warnings.append(f"{args.objective}: the warm-up (--warmup_iters {args.warmup_iters}) is not shorter than the "
                        f"run (--max_iters {args.max_iters}): the learning rate never reaches {args.learning_rate}")
    elif args.lr_decay_iters < args.warmup_iters:
        warnings.append(f"{args.objective}: the decay ends (--lr_decay_iters {args.lr_decay_iters}) before the "
                        f"warm-up does (--warmup_iters {args.warmup_iters}): the rate drops to --min_lr right after it")
    return warnings + cost_warnings(args, trainable + frozen, data.vocab_size)


def check_out_dir(out_dir):
    """out_dir is a directory this run can write in, or one it can create (its nearest existing parent is); the
    files the run writes there, if present, are files."""
    existing = os.path.abspath(out_dir)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        where = "exists" if existing == os.path.abspath(out_dir) else f"is under {existing}, which exists"
        raise UserError(f"--out_dir {out_dir} {where} and is not a directory: choose another --out_dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--out_dir {out_dir}: {existing} is not writable (read-only, or not yours): choose "
                        f"another --out_dir")
    for name in ("ckpt.pt", "ckpt.pt.tmp", ".lock"):
        path = os.path.join(out_dir, name)
        if os.path.lexists(path) and not os.path.isfile(path):
            raise UserError(f"{path} is not a file (this run writes that name): move it away, or choose another "
                            f"--out_dir")


def check_memory(args, device, trainable, frozen, vocab_size):
    """Refuse, before anything is allocated, a run whose weights, gradients and AdamW state (16 bytes a trainable
    parameter, 4 a frozen one) and (batch, block, vocab) logits (12 bytes each: logits, softmax, gradient) exceed
    the memory the device has free."""
    free = available_memory(device)
    weights = 16 * trainable + 4 * frozen
    logits = 12 * args.batch_size * args.block_size * vocab_size
    if free is None or weights + logits <= free[0]:
        return
    lower = ("the model's sizes (--n_layer, --n_embd, ...)" if weights > logits else "--batch_size or --block_size")
    raise UserError(f"this run needs ~{(weights + logits) / 2**30:,.3g} GiB ({trainable + frozen:.3g} parameters: "
                    f"{weights / 2**30:,.3g} GiB with gradients and AdamW state; logits {logits / 2**30:,.3g} GiB), "
                    f"but {free[1]} has {free[0] / 2**30:,.1f} GiB free: lower {lower}")


def cost_warnings(args, n_params, vocab_size):
    """A long block (attention grows with block_size^2) or an iteration that takes very long: its cost."""
    tokens_per_iter = args.batch_size * args.block_size * args.grad_accum * int(os.environ.get("WORLD_SIZE", 1))
    attention = 6 * args.n_layer * args.block_size * args.n_embd    # per token, causal, forward + backward
    flops = tokens_per_iter * (6 * n_params + attention)
    if args.block_size > LONG_BLOCK:
        logits_gb = 3 * args.batch_size * args.block_size * vocab_size * 4 / 1e9  # (B, T, V) logits, softmax, grad
        return [f"--block_size {args.block_size}: attention grows with block_size^2; one iteration is "
                f"~{flops:.1e} FLOPs ({attention / (6 * n_params + attention):.0%} attention, "
                f"{duration(flops / 1e11)} at 0.1 TFLOP/s) and its logits take ~{logits_gb:.1f} GB; "
                f"the first progress line gives the ETA"]
    if flops / 1e11 > SLOW_ITERATION:
        return [f"one iteration is ~{flops:.1e} FLOPs ({duration(flops / 1e11)} at 0.1 TFLOP/s): the first progress "
                f"line comes after it; lower --grad_accum, --batch_size or --block_size for a quicker one"]
    return []


# ----------------------------------------------------------------------------- checkpoints

# settings that change the optimisation but not the model: on --resume they come from the command line, and a
# value that differs from the checkpoint's is reported
SCHEDULE_KEYS = ["batch_size", "grad_accum", "learning_rate", "min_lr", "warmup_iters", "lr_decay_iters",
                 "weight_decay", "beta1", "beta2", "grad_clip"]


def resumed_args(args, ckpt, objective):
    """(args with the model-shaping settings of the checkpoint, the schedule settings that differ from the
    checkpoint's run); a typed flag that contradicts the checkpoint is an error."""
    if ckpt["objective"] != args.objective:
        raise UserError(f"checkpoint was trained with --objective {ckpt['objective']}, not {args.objective}")
    saved, args = ckpt["args"], copy.copy(args)
    for k in model_keys(objective):
        if k in args.typed and k in saved and getattr(args, k) != saved[k]:
            raise UserError(f"checkpoint has {k}={saved[k]!r} but --{k} {getattr(args, k)!r} was given")
        if k in saved:
            setattr(args, k, saved[k])
    return args, [f"--{k} {getattr(args, k)} (checkpoint: {saved[k]})" for k in SCHEDULE_KEYS
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


# ----------------------------------------------------------------------------- the pieces of the loop

def lr_at(it, args):
    """Linear warm-up, then cosine decay from learning_rate to min_lr at lr_decay_iters."""
    if it < args.warmup_iters:
        return args.learning_rate * (it + 1) / (args.warmup_iters + 1)
    if it >= args.lr_decay_iters:
        return args.min_lr
    ratio = (it - args.warmup_iters) / max(1, args.lr_decay_iters - args.warmup_iters)
    return args.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (args.learning_rate - args.min_lr)


def make_optimizer(model, objective, args, device):
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [dict(params=[p for p in params if p.dim() >= 2], weight_decay=args.weight_decay),  # matrices decay
              dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]               # norms, biases don't
    if objective.param_groups is not None:  # e.g. CALM's head at its own rate ("lr_scale")
        groups = objective.param_groups(model, groups, args)
    return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(args.beta1, args.beta2),
                             fused=device.startswith("cuda"))


@torch.no_grad()
def evaluate(model, objective, data, args, ctx):
    """Mean loss over eval_iters fixed batches per split (own generator: training's RNG is untouched), the
    objective's own metrics, and BrierLM at brier_positions held-out positions."""
    model.eval()
    out = {}
    progress = Progress("evaluating", 2 * args.eval_iters, "batches") if rank0() else (lambda done: None)
    done = 0  # a long evaluation (--eval_iters) shows its progress and ETA
    for split in ("train", "val"):
        gen = torch.Generator().manual_seed(args.seed + 1)
        losses = []
        for _ in range(args.eval_iters):
            x, y = data.get_batch(split, args.batch_size, args.block_size, gen, args.device)
            with ctx:
                losses.append(objective.loss(model, x, y, args)[0].item())
            done += 1
            progress(done)
        out[f"{split}_loss"] = sum(losses) / len(losses)
    if objective.evaluate is not None:
        out.update(objective.evaluate(model, data, args))
    if args.brier_positions > 0 and objective.language_model:
        per = brier_scores(model, objective, data, args, args.brier_positions, args.seed)
        out.update(brierlm.summarize(per["sampled"]))
    model.train()
    return out


def forward_backward(model, objective, x, y, args, scale, ctx):
    with ctx:
        if objective.forward_backward is not None:
            return objective.forward_backward(model, x, y, args, scale)
        loss, logs = objective.loss(model, x, y, args)
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


class Saver:
    """Writes the run's checkpoint, and knows what a stop message may truthfully promise about it."""

    def __init__(self, path, args, objective, resumed_at):
        self.path, self.args, self.objective = path, args, objective
        self.last_saved = resumed_at                 # iteration of the good checkpoint on disk (None: not yet)
        self.earlier = os.path.exists(path)          # with --overwrite: an earlier run's file until this run saves

    def stopped(self, reason):
        if self.last_saved is not None:
            kept = f"the last good checkpoint (iteration {self.last_saved}) is kept at {self.path}"
        else:
            kept = f"nothing was saved; {self.path} still holds the earlier run" if self.earlier else "nothing was saved"
        return UserError(f"{reason}: stopped; {kept}")

    def save(self, it, model, optimizer, metrics, batch_gen, master):
        state = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), iter=it, metrics=metrics,
                     args={k: v for k, v in vars(self.args).items() if k != "typed"}, objective=self.args.objective,
                     rng=rng_state(batch_gen), finished=it == self.args.max_iters)
        bad = first_non_finite(state, "")  # checked on every rank, so that all ranks stop together
        if bad:
            raise self.stopped(f"training diverged: {bad} is not finite at iteration {it}")
        if master:
            try:
                save_checkpoint(self.path, state)
            except UserError as e:  # the write failed (a full disk): the file on disk is still the last good one
                raise self.stopped(str(e)) from None
        self.last_saved = it


# ----------------------------------------------------------------------------- one stage

def train(args, objective, data, world=1, rank=0, lock=True):
    """One stage: the out_dir lock (unless the caller holds it), then fit(); the lock is released however it ends."""
    held = OutDirLock(args.out_dir) if rank == 0 and lock else None
    try:
        return fit(args, objective, data, world, rank)
    finally:
        if held is not None:
            held.release()


def fit(args, objective, data, world, rank):
    """Build (or resume) the model and optimizer, run train_steps, print a sample; returns the last metrics."""
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    if master and os.path.exists(ckpt_path + ".tmp"):  # we hold the lock: nobody else is writing it
        os.remove(ckpt_path + ".tmp")
        log(f"removed {ckpt_path}.tmp, a partial checkpoint left by an interrupted run")
    saved, changed = None, []
    if args.resume:
        saved, args, changed = read_resumable(ckpt_path, args, objective)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    data.random_offsets("val", 1, args.block_size)  # one draw of the seeded stream, as every version made here:
    #                                                  seeded runs stay bit-identical to the recorded ones
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if args.device.startswith("cuda") else nullcontext()

    model = objective.build(gpt_config(args, data.vocab_size), args).to(args.device)
    optimizer = make_optimizer(model, objective, args, args.device)
    batch_gen = torch.Generator().manual_seed(args.seed)  # the data position: same on every rank
    start, metrics = 0, {}
    if saved is not None:
        start, metrics = restore(saved, model, optimizer, batch_gen, ckpt_path)
        log(f"resumed from {ckpt_path} at iteration {start}")
        if changed:
            log("resume: these settings come from the command line, not the checkpoint: " + ", ".join(changed))
        if start == args.max_iters:
            log(f"nothing to train: the checkpoint is already at --max_iters {args.max_iters}")
            return metrics
    elif objective.init is not None:
        objective.init(model, args)
    if args.compile:
        for m in model.modules():  # compile each Transformer block: every objective benefits
            if type(m).__name__ == "Block":
                m.compile()
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"objective {args.objective} | data {data.name}/{data.tokenizer.name} | {n_params / 1e6:.2f}M trainable "
        f"params | device {args.device} | {world} process(es)")
    saver, t0 = Saver(ckpt_path, args, objective, start if saved is not None else None), time.time()
    train_steps(model, optimizer, objective, data, args, ctx, batch_gen, saver, start, metrics, world, rank, log)
    log(f"done in {time.time() - t0:.0f}s; checkpoint {ckpt_path}")
    if master and args.sample_tokens > 0:
        print_sample(model, objective, data, args, ctx, log)
    return metrics


def read_resumable(ckpt_path, args, objective):
    """(the checkpoint to resume, args with its model settings, the schedule flags that differ from its run);
    refused if it cannot go on (check_stage calls it before any work, fit to resume)."""
    saved = load_checkpoint(ckpt_path)
    if [k for k in ("optimizer", "rng", "iter") if k not in saved] or not isinstance(saved["iter"], int):
        raise UserError(f"{ckpt_path} cannot be resumed: it lacks its optimizer, RNG state or iteration")
    args, changed = resumed_args(args, saved, objective)
    if saved["iter"] > args.max_iters:
        raise UserError(f"--resume: {ckpt_path} is at iteration {saved['iter']}, past --max_iters {args.max_iters}; "
                        f"pass --max_iters above {saved['iter']} to train on, or --overwrite to start again")
    bad = first_non_finite({"model": saved["model"], "optimizer": saved["optimizer"]}, "")
    if bad:  # train.py never writes one: made by hand or damaged, and not a good checkpoint to continue
        raise UserError(f"{ckpt_path} cannot be resumed: its {bad} is not finite; start again with --overwrite")
    return saved, args, changed


def restore(saved, model, optimizer, batch_gen, ckpt_path):
    """Model, optimizer and random streams as the checkpoint left them; returns (iteration, metrics)."""
    try:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        set_rng_state(saved["rng"], batch_gen)
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{ckpt_path} cannot be resumed: its state does not fit this model ({type(e).__name__})") \
            from None
    return saved["iter"], saved.get("metrics", {})


def train_steps(model, optimizer, objective, data, args, ctx, batch_gen, saver, start, metrics, world, rank, log):
    """Iterations start .. max_iters: evaluate and save every eval_interval (and at the end), a progress line
    every log_interval; a NaN loss or running out of memory stops with a message about the last good checkpoint."""
    B, T = args.batch_size, args.block_size
    tokens_per_iter = B * T * args.grad_accum * world
    t0 = t_log = time.time()
    it = it_log = start
    try:
        for it in range(start, args.max_iters + 1):
            if (it % args.eval_interval == 0 or it == args.max_iters) and not (saver.last_saved == it):
                metrics.update(evaluate(model, objective, data, args, ctx), iter=it)
                log(f"eval {it}: " + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "iter"))
                saver.save(it, model, optimizer, metrics, batch_gen, rank == 0)
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
                raise saver.stopped(f"loss is {loss_value} at iteration {it}")
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            try:
                optimizer.step()
            except RuntimeError as e:  # the step size, learning rate x update, overflows float32
                if "overflow" not in str(e):
                    raise
                raise saver.stopped(f"training diverged: the update of iteration {it} overflows; lower "
                                    f"--learning_rate ({args.learning_rate})") from None
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
        raise saver.stopped(f"out of memory at iteration {it} ({type(e).__name__}): lower --batch_size or "
                            f"--block_size") from None
    except RuntimeError as e:
        if "can't allocate memory" not in str(e):
            raise
        raise saver.stopped(f"out of memory at iteration {it}: lower --batch_size or --block_size") from None


def print_sample(model, objective, data, args, ctx, log):
    model.eval()
    prompt = torch.tensor([data.tokenizer.encode("\n")], dtype=torch.long, device=args.device)
    with ctx:
        out = objective.generate(model, prompt, args, torch.Generator(args.device).manual_seed(args.seed))
    log("sample:\n" + data.tokenizer.decode(out[0].tolist()))


# ----------------------------------------------------------------------------- the command

def main(argv=None):
    """parse -> plan (every check) -> train each stage. Bad input: one line 'error: ...' and exit 2 (under
    torchrun every rank exits 2 and rank 0 alone prints the line)."""
    try:
        args, objective = parse_args(argv)
        stages, data = plan(args, objective)
        return run_stages(stages, data)
    except UserError as e:
        if rank0():
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if rank0():
            print("interrupted: the last checkpoint written is kept", file=sys.stderr)
        sys.exit(130)


def run_stages(stages, data):
    """Train the stages in order under one set of processes, holding the last stage's out_dir lock throughout."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    final = stages[-1][0]
    device = process_device(final.device)
    if world > 1:
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    lock = OutDirLock(final.out_dir) if rank == 0 else None  # one training per out_dir
    try:
        for args, objective in stages:
            args = copy.copy(args)
            args.device = device
            metrics = train(args, objective, data, world, rank, lock=args.out_dir != final.out_dir)
        return metrics
    finally:
        if lock is not None:
            lock.release()
        if world > 1:
            dist.destroy_process_group()


def run(flags):
    """main() with a dict of flags ({"objective": "mtp", "max_iters": 10, ..}): returns the final metrics."""
    return main(to_argv(flags))


def run_quietly(flags):
    """run(flags) with its progress lines captured (notebooks, bench/): returns the metrics. Warnings still reach
    stderr; a failure becomes a UserError carrying main's one-line error. flags: a dict, or an argv list."""
    out, err = io.StringIO(), io.StringIO()
    try:
        with redirect_stdout(out), redirect_stderr(err):
            metrics = main(to_argv(flags) if isinstance(flags, dict) else flags)
    except SystemExit:
        lines = err.getvalue().strip().splitlines() or ["training failed"]
        raise UserError(lines[-1].removeprefix("error: ")) from None
    sys.stderr.write(err.getvalue())
    return metrics
