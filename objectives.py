"""The wiring between the paper files and the command-line tools: one Objective per name (ntp, mtp, autoencoder,
calm, dispersion) says how trainer.py builds, trains, evaluates and samples its model, which flags it adds and
what must be trained before it. The paper files know nothing of this file; train.py, sample.py, score.py and
bench/ reach the papers through it.

  Objective          the fields below, one dataclass per objective; OBJECTIVES: name -> Objective
  flags              each objective's own flags are the fields of `configs` (the paper's configs, e.g.
                     calm.AEConfig, and the wiring's, e.g. CALMFlags)
  check(args, data)  every rule about the flags of one stage, run before anything trains or writes
  size(args, V)      the parameters the model will have, estimated from the flags (the memory check before any
                     allocation)
  prepare(args)      what trains first (CALM: its autoencoder), as train.py flags, this run's args resolved, and a
                     line saying what it decided (printed by trainer.plan once every check has passed)
  load_model         (model, objective, saved args, tokenizer) from any checkpoint
  brier_scores       BrierLM of any model through its objective's sampler; score_checkpoint for one file
"""
import copy
import dataclasses
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable

import torch

import brierlm
import calm
import dispersion
import mtp
from calm_comparison_heads import ComparisonConfig, DiffusionHead, FlowHead, MSEHead
from data import DownloadError, get_tokenizer, load_data
from gpt import GPT, GPTConfig
from runtime import UserError, check_number, first_non_finite, load_checkpoint


def gpt_size(args, vocab_size):
    """(trainable, frozen) parameters of a GPT from its flags: 12 L d^2 (attention 4 d^2, MLP 8 d^2 per block) and
    the V x d embedding, tied to the output. A little under the true count (norms, biases, positions left out)."""
    return 12 * args.n_layer * args.n_embd ** 2 + vocab_size * args.n_embd, 0


@dataclass
class Objective:
    name: str
    build: Callable                    # (gcfg, args) -> model
    loss: Callable                     # (model, x, y, args) -> (loss, {name: float})
    generate: Callable                 # (model, idx (1, T), args, generator) -> idx with args.max_new_tokens more
    configs: tuple = ()                # dataclasses whose fields are this objective's own flags
    forward_backward: Callable = None  # (model, x, y, args, scale) -> what loss returns, gradients of scale * loss
    evaluate: Callable = None          # (model, data, args) -> {name: float}, extra evaluation metrics
    draw: Callable = None              # (model, ctx, n_tokens, generator, args) -> (B, n): BrierLM's sampler
    check: Callable = None             # (args, data) -> None, or a UserError: rules on this objective's flags
    size: Callable = gpt_size          # (args, vocab_size) -> (trainable, frozen) parameters, estimated
    prepare: Callable = None           # (args) -> ([train.py flags of each stage to run first], resolved args,
    #                                     a line saying what it decided, printed once every check has passed)
    init: Callable = None              # (model, args) -> None: what a fresh run loads (CALM: its autoencoder)
    param_groups: Callable = None      # (model, groups, args) -> optimizer groups (with an optional "lr_scale")
    presets: dict = field(default_factory=dict)  # {preset: {flag: default}}, over trainer.PRESETS
    default_tokenizer: str = None      # None: gpt2 (falling back to bytes offline)
    default_temperature: float = 0.8
    min_lr_ratio: float = 0.1          # --min_lr when not given: this x --learning_rate (1: constant after warm-up)
    language_model: bool = True        # False: no BrierLM, and sampling shows a round trip (the autoencoder)


def default_draw(model, ctx, n_tokens, generator, args):
    """BrierLM's sampler for a model with generate(): (B, n_tokens) continuations of ctx at temperature 1."""
    return model.generate(ctx, n_tokens, temperature=1.0, generator=generator)[:, -n_tokens:]


GREEDY_BELOW = 1e-30  # a token model samples its argmax below this temperature: logits / T would overflow float32,
#                      and logits that differ by float32's resolution (~1e-7 at magnitude 1) are 1e23 nats apart


def token_temperature(T):
    """The temperature a token model samples at: T, or 0 (greedy, its limit) for T -> 0 (below GREEDY_BELOW)."""
    return 0.0 if T < GREEDY_BELOW else T


def token_generate(model, idx, args, generator=None):
    if getattr(args, "speculative", False):
        raise UserError("--speculative needs a multi-token (mtp) checkpoint with extra heads")
    return model.generate(idx, args.max_new_tokens, token_temperature(args.temperature), args.top_k,
                          generator=generator)


@contextmanager
def finite_probabilities(path):
    """Sampling from a model whose probabilities are not finite (finite weights so large that its logits
    overflow) is a one-line error naming the checkpoint, not torch.multinomial's traceback."""
    try:
        yield
    except RuntimeError as e:
        if "probability tensor contains" not in str(e):
            raise
        raise UserError(f"{path}: the model's probabilities are not finite (its weights are so large that its "
                        f"logits overflow): this checkpoint cannot be sampled") from None


def typed(args):
    return getattr(args, "typed", frozenset())


def fields_of(cls, args):
    """An instance of the dataclass cls with the values of args (a paper config from the flags)."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


# ----------------------------------------------------------------------------- ntp

NTP = Objective("ntp", build=lambda gcfg, args: GPT(gcfg), loss=lambda model, x, y, args: (model(x, y)[1], {}),
                generate=token_generate)


# ----------------------------------------------------------------------------- mtp

@dataclass
class MTPFlags:
    n_future: int = 4          # n: tokens predicted at every position (heads); 1 = next-token prediction
    mtp_naive: bool = False    # backpropagate all heads at once (for the memory comparison) instead of one by one


def mtp_loss(model, x, y, args):
    loss, losses = mtp.mtp_loss(model, x, y)
    return loss, {f"loss_h{i + 1}": l.item() for i, l in enumerate(losses)}


def mtp_forward_backward(model, x, y, args, scale):
    if args.mtp_naive:  # every head's logits alive at once, one backward
        loss, logs = mtp_loss(model, x, y, args)
        (scale * loss).backward()
        return loss.detach(), logs
    loss, losses = mtp.forward_backward(model, x, y, scale)
    return loss, {f"loss_h{i + 1}": l.item() for i, l in enumerate(losses)}


@torch.no_grad()
def mtp_evaluate(model, data, args):
    """Per-head validation losses val_loss_h1..hn (val_loss_h1 is comparable with an NTP model's val_loss; the
    batches are the ones the trainer's val_loss uses), and on the synthetic tasks the accuracy of head 1
    (teacher-forced argmax, data.TaskDataset.accuracy) on every validation split."""
    device = next(model.parameters()).device
    gen, sums = torch.Generator().manual_seed(args.seed + 1), [0.0] * model.n_future
    for _ in range(args.eval_iters):
        x, y = data.get_batch("val", args.batch_size, args.block_size, gen, device)
        sums = [s + l.item() for s, l in zip(sums, mtp.mtp_loss(model, x, y)[1])]
    out = {f"val_loss_h{i + 1}": s / args.eval_iters for i, s in enumerate(sums)}
    if hasattr(data, "accuracy"):
        for split in data.splits:
            if split != "train":
                out[f"acc_{split.replace(':', '_')}"] = data.accuracy(lambda x: model.trunk(x)[0], split, 500,
                                                                      block_size=args.block_size, device=device)
    return out


def mtp_generate(model, idx, args, generator=None):
    T = token_temperature(args.temperature)
    if not getattr(args, "speculative", False):
        return model.generate(idx, args.max_new_tokens, T, args.top_k, generator=generator)
    if model.n_future < 2:
        raise UserError("--speculative needs extra heads: this checkpoint was trained with --n_future 1")
    out, s = mtp.speculative_generate(model, idx, args.max_new_tokens, T, args.top_k, generator)
    rule = "identical to greedy decoding" if T == 0 else "each token distributed as head 1's"
    print(f"speculative (n={model.n_future}): {s['tokens']} tokens in {s['forwards']} forwards = "
          f"{s['tokens_per_forward']:.2f} tokens/forward ({rule}; speed: python -m bench mtp speculative)",
          file=sys.stderr)
    return out


def mtp_check(args, data):
    if not 1 <= args.n_future <= args.n_layer:
        raise UserError(f"--n_future {args.n_future} needs --n_layer >= {args.n_future}: each head replaces a "
                        f"trunk layer")
    if args.n_future > args.block_size:
        raise UserError(f"--n_future {args.n_future} is larger than --block_size {args.block_size}")


MTP = Objective("mtp", build=lambda gcfg, args: mtp.MTP(gcfg, args.n_future), loss=mtp_loss,
                generate=mtp_generate, configs=(MTPFlags,), forward_backward=mtp_forward_backward,
                evaluate=mtp_evaluate, check=mtp_check)


# ----------------------------------------------------------------------------- the autoencoder

@dataclass
class AEFlags:
    eval_noise: float = 0.3       # sigma of the Gaussian latent noise in the robustness metric recon_acc_noisy


def check_chunks(args, data):
    calm.chunks_per_window(args.block_size, args.chunk_size)


GPT_ONLY = [f.name for f in dataclasses.fields(GPTConfig) if f.name not in ("vocab_size", "block_size")]


def ae_check(args, data):
    check_chunks(args, data)
    for flag in GPT_ONLY:
        if flag in typed(args):
            raise UserError(f"--{flag} shapes a Transformer, and --objective autoencoder has none: its sizes are "
                            f"--ae_dim, --ae_layers and --latent_dim")


def ae_size(args, vocab_size):
    """(trainable, frozen) parameters of the autoencoder from its flags: 4 stages of ae_layers SwiGLU layers
    (7.5 d^2 each), the K d <-> d maps and the V x d embedding (a little under the true count)."""
    return (30 * args.ae_layers + 2 * args.chunk_size) * args.ae_dim ** 2 + vocab_size * args.ae_dim, 0


@torch.no_grad()
def ae_evaluate(model, data, args, sigmas=None, n_batches=None, relative=False):
    """Held-out reconstruction accuracy, clean and with latent noise (recon_acc, recon_acc_noisy), or at each of
    `sigmas` ({sigma: accuracy}; relative: sigma in units of the latents' RMS)."""
    gen = torch.Generator().manual_seed(args.seed + 2)
    device = next(model.parameters()).device
    x = torch.cat([data.get_batch("val", args.batch_size, args.block_size, gen, device)[0]
                   for _ in range(n_batches or args.eval_iters)]).view(-1, model.K)
    noise_gen = torch.Generator(x.device).manual_seed(args.seed + 3)
    if sigmas is not None:
        return {s: calm.reconstruction_accuracy(model, x, s, noise_gen, relative) for s in sigmas}
    return {"recon_acc": calm.reconstruction_accuracy(model, x),
            "recon_acc_noisy": calm.reconstruction_accuracy(model, x, args.eval_noise, noise_gen)}


@torch.no_grad()
def ae_generate(model, idx, args, generator=None):
    """An autoencoder does not continue text: it returns the prompt's round trip decode(encode(prompt))."""
    pad = (-idx.size(1)) % model.K
    chunks = torch.nn.functional.pad(idx, (pad, 0), value=0).view(idx.size(0), -1, model.K)
    return model.decode(model.encode(chunks)[0]).argmax(-1).flatten(1)[:, pad:]


AUTOENCODER = Objective(
    "autoencoder", build=lambda gcfg, args: calm.Autoencoder(gcfg.vocab_size, fields_of(calm.AEConfig, args)),
    loss=lambda model, x, y, args: calm.ae_loss(model, x), generate=ae_generate, configs=(calm.AEConfig, AEFlags),
    evaluate=ae_evaluate, check=ae_check, size=ae_size, default_tokenizer="bytes", language_model=False)


# ----------------------------------------------------------------------------- calm

@dataclass
class CALMFlags:
    autoencoder: str = None       # a trained autoencoder's ckpt; None: <out_dir>/autoencoder, trained there first
    ae_iters: int = 1000          # iterations when the autoencoder is trained first (100% held-out at K <= 4)
    head: str = "energy"          # 'energy' (the paper), 'flow' / 'diffusion' / 'mse' (calm_comparison_heads.py)
    head_lr_scale: float = 3.0    # the head's learning rate = this x --learning_rate (our recipe; paper: 1)
    temp_sampler: str = "batch"   # temperature < 1: 'batch' (approximate, the authors' generation) or 'exact'
    temp_candidates: int = 200    # candidates of the batch sampler (authors 200)


HEADS = ("energy", "flow", "diffusion", "mse")
HEAD_FLAGS = {"flow_steps": "flow", "diffusion_steps": "diffusion", "noise_size": "energy",
              "num_target_samples": "energy", "alpha": "energy"}  # flags that only one head reads
AE_KEYS = [f.name for f in dataclasses.fields(calm.AEConfig)]

# `python train.py --objective calm` at --preset cpu (the default): the recipe chosen by bench/calm_runs.py's sweep
# (README, CALM); 1358 iterations of 16 x 128 bytes spend 7e12 training FLOPs, what 600 iterations of the same-size
# NTP model spend; the learning rate is constant after warm-up (min_lr_ratio 1), the authors' schedule
RECIPE = dict(learning_rate=1e-3, warmup_iters=100, batch_size=16, max_iters=1358, eval_interval=679,
              brier_positions=512)


def make_head(d, args):
    """The generative head on the backbone state (width d) that --head names."""
    l, head_cfg = args.latent_dim, fields_of(calm.HeadConfig, args)
    if args.head == "energy":
        return calm.EnergyHead(d, l, head_cfg)
    if args.head == "mse":
        return MSEHead(d, l, head_cfg)
    head, steps = (FlowHead, args.flow_steps) if args.head == "flow" else (DiffusionHead, args.diffusion_steps)
    return head(d, args.head_dim or d // 2, l, args.head_layers, args.num_samples, steps)


def calm_size(args, vocab_size):
    """(trainable, frozen) parameters: the backbone (a GPT) and the head (head_layers blocks of at least w^2,
    w = --head_dim or n_embd / 2) train; the autoencoder inside is frozen."""
    width = args.head_dim or args.n_embd // 2
    return gpt_size(args, vocab_size)[0] + args.head_layers * width ** 2, ae_size(args, vocab_size)[0]


def calm_build(gcfg, args):
    return calm.CALM(gcfg, fields_of(calm.AEConfig, args), fields_of(calm.HeadConfig, args),
                     lambda d, l: make_head(d, args))


def calm_check(args, data):
    check_chunks(args, data)
    if args.head not in HEADS:
        raise UserError(f"--head must be one of {', '.join(HEADS)}, got {args.head!r}")
    for flag, head in HEAD_FLAGS.items():
        if flag in typed(args) and args.head != head:
            raise UserError(f"--{flag} is a flag of --head {head}, not of --head {args.head}")
    if args.head == "energy" and args.num_samples < 2:
        raise UserError(f"--num_samples must be at least 2 for the energy head (its loss compares pairs of the "
                        f"head's own samples), got {args.num_samples}")
    if args.temp_sampler not in ("batch", "exact"):
        raise UserError(f"--temp_sampler must be 'batch' or 'exact', got {args.temp_sampler!r}")
    if "eval_noise" in typed(args):  # CALM reports its autoencoder's clean accuracy only
        raise UserError("--eval_noise is a flag of --objective autoencoder (its noisy reconstruction metric), not of "
                        "--objective calm")


def autoencoder_dir(args):
    return os.path.join(args.out_dir, "autoencoder")


def autoencoder_flags(args, **extra):
    """train.py flags of the autoencoder CALM trains first (bench/ trains its autoencoders with the same ones), with
    `extra` flags over them. It evaluates and saves every tenth of its run, so an interruption costs little."""
    flags = dict(objective="autoencoder", out_dir=autoencoder_dir(args), dataset=args.dataset,
                 tokenizer=args.tokenizer, device=args.device, seed=args.seed, block_size=args.block_size,
                 batch_size=args.batch_size, max_iters=args.ae_iters, eval_interval=max(1, args.ae_iters // 10),
                 eval_iters=10, brier_positions=0, sample_tokens=0, warmup_iters=30, learning_rate=3e-3,
                 log_interval=max(1, args.ae_iters // 10), **{k: getattr(args, k) for k in AE_KEYS})
    return {**flags, **extra}


def autoencoder_mismatch(saved, args, keys):
    """The first of `keys` on which an autoencoder checkpoint's args differ from this run's, as text, or None."""
    for k in keys:
        if saved.get(k) != getattr(args, k):
            return f"was made with {k}={saved.get(k)!r} (this run: {getattr(args, k)!r})"
    return None


def calm_prepare(args):
    """CALM trains on a finished autoencoder of its own data, tokenizer and chunk size: --autoencoder PATH, or
    <out_dir>/autoencoder, which is trained first when absent, resumed to its end when unfinished, and refused
    (unless --overwrite retrains it) when it was made for other data or settings, or cannot be read. Returns
    (stages, args, note); nothing is printed here, since a later check may still refuse the command."""
    if args.resume:                                                  # the autoencoder is inside the checkpoint
        return [], args, None
    own = args.autoencoder is None
    if not own and "ae_iters" in typed(args):
        raise UserError("--ae_iters is for the autoencoder that train.py trains first; with --autoencoder PATH none "
                        "is trained: leave one of them out")
    path = args.autoencoder or os.path.join(autoencoder_dir(args), "ckpt.pt")
    resolved = copy.copy(args)
    resolved.autoencoder = path
    if not os.path.lexists(path):
        if not own:
            raise UserError(f"no autoencoder at {path}: train one with --objective autoencoder, or leave out "
                            f"--autoencoder and train.py trains one first")
        return [autoencoder_flags(args)], resolved, f"calm: training the autoencoder first, into {path}"
    try:
        ckpt = load_checkpoint(path)
    except UserError as e:
        if own and args.overwrite:
            return [autoencoder_flags(args, overwrite=True)], resolved, f"calm: retraining the autoencoder: {e}"
        raise UserError(f"{e}; pass --overwrite to retrain it there" if own else str(e)) from None
    saved = ckpt["args"]
    if ckpt["objective"] != "autoencoder":
        raise UserError(f"{path} is a {ckpt['objective']!r} checkpoint, not an autoencoder")
    finished = ckpt.get("finished", ckpt.get("iter") == saved.get("max_iters"))
    bad = first_non_finite(ckpt["model"], "")
    keys = ["dataset", "tokenizer"] + (AE_KEYS if own else ["chunk_size", "latent_dim"] +
                                       [k for k in AE_KEYS if k in typed(args)])
    wrong = f"has the non-finite weight {bad}" if bad else autoencoder_mismatch(saved, args, keys)
    if not own:                                                       # named by the user: it must fit and be done
        if wrong is None and not finished:
            raise UserError(f"the autoencoder {path} is unfinished (iteration {ckpt.get('iter')} of "
                            f"{saved.get('max_iters')}): resume it with --objective autoencoder --resume first")
    else:                                                             # our own: made by this command's settings
        if wrong is None and saved.get("max_iters") != args.ae_iters:
            wrong = f"was made for {saved.get('max_iters')} iterations (this run: --ae_iters {args.ae_iters})"
        if wrong is None and not finished:
            wrong = autoencoder_mismatch(saved, args, ["seed", "block_size", "batch_size"])
            if wrong is None:
                return [autoencoder_flags(args, resume=True)], resolved, (
                    f"calm: resuming the unfinished autoencoder at {path} (iteration {ckpt.get('iter')} of "
                    f"{args.ae_iters})")
    if wrong is not None:
        if own and args.overwrite:
            return [autoencoder_flags(args, overwrite=True)], resolved, (
                f"calm: retraining the autoencoder at {path}: it {wrong}")
        how = ("pass --overwrite to retrain it there, or choose another --out_dir" if own else
               "train one for this run with --objective autoencoder")
        raise UserError(f"the autoencoder {path} {wrong}: {how}")
    for k in AE_KEYS:                                                # this run describes the autoencoder it uses
        setattr(resolved, k, saved[k])
    return [], resolved, f"calm: reusing the finished autoencoder at {path}"


def calm_init(model, args):
    """A fresh CALM run loads its frozen autoencoder (calm_prepare made sure it is finished and matches)."""
    ckpt = load_checkpoint(args.autoencoder)
    model.ae.load_state_dict(ckpt["model"])
    acc = ckpt.get("metrics", {}).get("recon_acc", float("nan"))
    print(f"calm: autoencoder {args.autoencoder}: held-out recon_acc {acc:.4f}")
    if not acc >= 0.99:  # CALM can generate no better text than its autoencoder decodes
        hint = "" if args.tokenizer == "bytes" else " or use --tokenizer bytes"
        print(f"WARNING: the autoencoder reconstructs only {acc:.1%} of held-out tokens; train it longer "
              f"(--ae_iters with --overwrite){hint}", file=sys.stderr)


def calm_param_groups(model, groups, args):
    """Each optimizer group split in two, the head's part with lr_scale = --head_lr_scale."""
    head, out = {id(p) for p in model.head.parameters()}, []
    for g in groups:
        for in_head, scale in ((False, 1.0), (True, args.head_lr_scale)):
            ps = [p for p in g["params"] if (id(p) in head) == in_head]
            if ps:
                out.append({**g, "params": ps, "lr_scale": scale})
    return out


def calm_evaluate(model, data, args):
    """Reconstruction accuracy of the frozen autoencoder inside, for the record (BrierLM: brier_scores)."""
    return {"ae_recon_acc": ae_evaluate(model.ae, data, args, n_batches=2)["recon_acc"]}


def calm_generate(model, idx, args, generator=None):
    """args.max_new_tokens tokens after idx (1, T), vector by vector; top_k does not apply."""
    if getattr(args, "speculative", False):
        raise UserError("--speculative needs a multi-token (mtp) checkpoint; CALM already takes K tokens a step")
    return calm.generate(model, idx, args.max_new_tokens, args.temperature, args.temp_sampler,
                         args.temp_candidates, generator)


def calm_draw(model, ctx, n_tokens, generator, args, temperature=1.0):
    """BrierLM's sampler: (B, n_tokens) continuations of ctx (B, T), T a multiple of K."""
    if ctx.size(1) % model.K:
        raise UserError(f"CALM contexts must be a multiple of K={model.K} tokens, got {ctx.size(1)}")
    out = calm.generate_chunks(model, ctx, -(-n_tokens // model.K), generator, temperature,
                               getattr(args, "temp_sampler", "batch"), getattr(args, "temp_candidates", 200))
    return out[:, ctx.size(1):ctx.size(1) + n_tokens]


CALM = Objective("calm", build=calm_build, loss=lambda model, x, y, args: (calm.calm_loss(model, x), {}),
                 generate=calm_generate, configs=(calm.AEConfig, AEFlags, calm.HeadConfig, ComparisonConfig,
                                                  CALMFlags),
                 evaluate=calm_evaluate, draw=calm_draw, check=calm_check, size=calm_size, prepare=calm_prepare,
                 init=calm_init,
                 param_groups=calm_param_groups, presets={"cpu": RECIPE}, default_tokenizer="bytes",
                 default_temperature=1.0, min_lr_ratio=1.0)


# ----------------------------------------------------------------------------- dispersion

@dataclass
class DispersionFlags:
    dispersion_weight: float = 0.1     # lambda in L = L_CE + lambda * L_aux; 0 is exactly next-token prediction
    dispersion_scope: str = "batch"    # 'batch': all B*T final states form one set; 'sequence': one set per window;
    #                                    'cross_domain': only pairs from different domains (A+B data)


def dispersion_check(args, data):
    if args.dispersion_scope not in dispersion.SCOPES:
        raise UserError(f"--dispersion_scope must be one of {', '.join(dispersion.SCOPES)}, got "
                        f"{args.dispersion_scope!r}")
    if args.dispersion_scope == "cross_domain":
        if len(data.domains) < 2:
            raise UserError(f"--dispersion_scope cross_domain needs a mixed dataset (--dataset A+B), got the "
                            f"single domain {data.name!r}")
        if args.batch_size < len(data.domains):
            raise UserError(f"--dispersion_scope cross_domain needs every batch to hold all {len(data.domains)} "
                            f"domains: --batch_size must be at least {len(data.domains)}, got {args.batch_size}")


def dispersion_loss(model, x, y, args):
    loss, ce, aux = dispersion.dispersion_loss(model, x, y, args.dispersion_weight, args.dispersion_scope)
    if model.training:  # running (exponential moving) average of the training batches' dispersion
        prev = getattr(model, "running_dispersion", None)
        model.running_dispersion = -aux.item() if prev is None else 0.9 * prev - 0.1 * aux.item()
    return loss, {"ce": ce.item(), "aux": aux.item(), "disp_run": getattr(model, "running_dispersion", -aux.item())}


def dispersion_evaluate(model, data, args):
    """Perplexity (cross-entropy only) and last-layer dispersion on val (val_ppl, val_disp), and on every per-domain
    'val:<domain>' split of a cross-domain dataset (val_ppl_<domain>; a file:PATH domain is named by its stem)."""
    out = {}
    for split in ["val"] + sorted(s for s in data.splits if s.startswith("val:")):
        batches = dispersion.fixed_batches(data, split, args.eval_iters, args.batch_size, args.block_size,
                                           args.seed + 1, args.device)
        stats = dispersion.perplexity_and_dispersion(model, batches)
        domain = split[len("val:"):]
        suffix = "_" + (os.path.splitext(os.path.basename(domain))[0] if domain.startswith("file:") else domain) \
            if domain else ""
        out[f"val_ppl{suffix}"], out[f"val_disp{suffix}"] = stats["ppl"], stats["disp"]
    return out


DISPERSION = Objective("dispersion", build=lambda gcfg, args: GPT(gcfg), loss=dispersion_loss,
                       generate=token_generate, configs=(DispersionFlags,), evaluate=dispersion_evaluate,
                       check=dispersion_check)

OBJECTIVES = {o.name: o for o in (NTP, MTP, AUTOENCODER, CALM, DISPERSION)}


def get_objective(name):
    if name not in OBJECTIVES:
        raise UserError(f"unknown objective {name!r}: choose from {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]


# ----------------------------------------------------------------------------- checkpoints -> models

MODEL_KEYS = [f.name for f in dataclasses.fields(GPTConfig)] + ["objective", "dataset", "tokenizer"]


def model_keys(objective):
    """Settings that shape the model (and what it was trained on): a resumed run takes them from the checkpoint."""
    return MODEL_KEYS + [f.name for cls in objective.configs for f in dataclasses.fields(cls)]


def gpt_config(args, vocab_size):
    return GPTConfig(vocab_size=vocab_size, **{f.name: getattr(args, f.name) for f in dataclasses.fields(GPTConfig)
                                               if f.name != "vocab_size"})


def check_saved_args(path, saved, objective):
    """A checkpoint's args describe a model we can build: every GPT field present, of its type and in range;
    an objective field that an older checkpoint lacks gets its default."""
    for f in dataclasses.fields(GPTConfig):
        if f.name == "vocab_size":
            continue
        if f.name not in saved:
            raise UserError(f"{path}: its args lack {f.name!r}")
        value, kind = saved[f.name], (int, float) if f.type is float else f.type
        if not isinstance(value, kind) or (isinstance(value, bool) and f.type is not bool):
            raise UserError(f"{path}: its args have {f.name}={value!r}, which is not of type {f.type.__name__}")
        if f.type in (int, float):
            try:
                check_number(f.name, value)
            except UserError as e:
                raise UserError(f"{path}: its args are invalid: {e}") from None
    if not isinstance(saved.get("tokenizer"), str):
        raise UserError(f"{path}: its args lack the tokenizer")
    for cls in objective.configs:
        for f in dataclasses.fields(cls):
            saved.setdefault(f.name, f.default)


def load_model(ckpt_path, device="cpu"):
    """(model in eval mode, objective, saved args, tokenizer) from a checkpoint written by train.py."""
    ckpt = load_checkpoint(ckpt_path, map_location=device)
    if not isinstance(ckpt["objective"], str):
        raise UserError(f"{ckpt_path}: its objective is {ckpt['objective']!r}, not a name")
    objective = get_objective(ckpt["objective"])
    check_saved_args(ckpt_path, ckpt["args"], objective)
    saved = SimpleNamespace(**ckpt["args"])
    try:
        tokenizer = get_tokenizer(saved.tokenizer)
    except DownloadError as e:  # offline, and the GPT-2 BPE was never cached
        raise UserError(f"{ckpt_path} needs the {saved.tokenizer} tokenizer: {e}; connect once to cache it") from None
    try:
        model = objective.build(gpt_config(saved, tokenizer.vocab_size), saved)
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, TypeError, AttributeError, ValueError):
        raise UserError(f"{ckpt_path}: weights do not match the model its own config describes") from None
    bad = next((k for k, v in ckpt["model"].items() if v.is_floating_point() and not bool(torch.isfinite(v).all())),
               None)
    if bad is not None:
        raise UserError(f"{ckpt_path}: its weight {bad} is not finite; this checkpoint cannot be used")
    return model.to(device).eval(), objective, saved, tokenizer


# ----------------------------------------------------------------------------- BrierLM of any model

def brier_scores(model, objective, data, args, n_positions, seed, split="val", variance_reduced=False,
                 progress=None):
    """brierlm.brier_eval through the objective's sampler: per-position estimates {'sampled' (N, 4)[, 'reduced',
    'exact1' for a plain GPT with variance_reduced]}. The model is evaluated in eval mode and put back."""
    if not objective.language_model:
        raise UserError(f"a {objective.name} checkpoint is not a language model: BrierLM does not apply")
    device = next(model.parameters()).device
    ctx_len = brierlm.context_length(args.block_size, getattr(model, "K", 1))
    batch = max(4, min(64, 2 ** 23 // (ctx_len * data.vocab_size)))  # (2B, T, V) logits of one draw: <= ~64 MB
    draw = objective.draw or default_draw
    logits_fn = (lambda idx: model(idx)[0]) if variance_reduced and isinstance(model, GPT) else None
    was_training = model.training
    model.eval()
    try:
        return brierlm.brier_eval(lambda ctx, n, g: draw(model, ctx, n, g, args), data, n_positions, ctx_len, seed,
                                  split, batch, device, logits_fn, progress)
    finally:
        model.train(was_training)


@torch.no_grad()
def val_cross_entropy(model, objective, data, args, n_batches=20, batch_size=16, seed=0, split="val"):
    """Mean training loss of the objective over n_batches fixed random windows (its own generator)."""
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    return sum(objective.loss(model, *data.get_batch(split, batch_size, args.block_size, gen, device), args)[0].item()
               for _ in range(n_batches)) / n_batches


def score_checkpoint(path, n_positions=512, seed=0, ce_batches=20, variance_reduced=True, device="cpu"):
    """Val loss and BrierLM (two-sample, and variance-reduced for token models) of one checkpoint, with standard
    errors and the per-position estimates ('sampled', 'reduced', 'exact1')."""
    model, objective, saved, _ = load_model(path, device)
    saved.device = device
    data = load_data(saved.dataset, saved.tokenizer)
    per = brier_scores(model, objective, data, saved, n_positions, seed, variance_reduced=variance_reduced)
    out = dict(val_loss=val_cross_entropy(model, objective, data, saved, ce_batches, seed=seed),
               **brierlm.summarize(per["sampled"]), brierlm_se=brierlm.brierlm_stderr(per["sampled"]),
               per_position=per)
    if "reduced" in per:
        out.update(brierlm_vr=brierlm.summarize(per["reduced"])["brierlm"],
                   brierlm_vr_se=brierlm.brierlm_stderr(per["reduced"]), exact_brier1=float(per["exact1"].mean()))
    return out
