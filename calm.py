"""CALM: Continuous Autoregressive Language Models (Shao, Li, Meng, Zhou, arXiv 2510.27688, 2025).
Paper note: ../shared/papers/calm.md. One step predicts one continuous vector that stands for K tokens.
This file: the autoencoder, the model over chunks, its training loss and generation; calm_heads.py: the generative
heads (the paper's energy head, flow matching and diffusion for its comparison) and likelihood-free temperature.

    python train.py --objective calm                                # autoencoder first (or reused), then CALM
    python sample.py --ckpt out/calm/ckpt.pt --prompt "ROMEO:" --temperature 0.7   # any T in (0, 1]

Paper -> code
  sec. 2  autoencoder, context-free (each K-chunk alone)   Autoencoder.encode / .decode (residual SwiGLU MLPs)
          variational posterior z = mu + sigma*eps,         ae_loss: K * CE + kl_weight * sum_d max(KL_d, kl_clip)
          KL clipped per dimension, latent dropout, masking
          robustness: accuracy with Gaussian noise on z    ae_evaluate (recon_acc, recon_acc_noisy)
  sec. 3  backbone over chunks; input = the previous chunk's K tokens, embedded and compressed
          Linear(K d -> 2d) -> SiLU -> Linear(2d -> d) -> LayerNorm                           CALM.chunk_inputs
          generative head on the backbone state: energy (one pass), flow, diffusion         calm_heads.make_head
          energy loss against M samples of the frozen posterior; flow / diffusion losses     calm_loss
  sec. 4  BrierLM: brierlm.py, through draw() below (samples only, never probabilities)
  sec. 5  likelihood-free temperature, exact (calm_heads.sample_exact) or batch (sample_batch)   next_chunks
  ablation: deterministic regression head (--head mse)                                         calm_loss

Defaults are scaled down for a 2-core CPU (the recipe: README, bench/calm_runs.py); the paper uses latent_dim 128,
ae_dim 512, ae_layers 2, noise_size 64, head_layers 4 at the backbone's width, N = 8 model samples, M = 100 target
samples, alpha = 1, kl_weight 1e-3, kl_clip 0.5, p = 0.15, and a constant learning rate after warm-up.
Our additions: a learned start vector is the first backbone input (predicts chunk 0, so every position of a
window is trained); prompts are left-padded with token 0 to a multiple of K.
"""
import os
import sys
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

import calm_heads
from gpt import GPT, GPTConfig, KVCache, UserError
from runtime import load_checkpoint


@dataclass
class AEConfig:
    chunk_size: int = 4           # K tokens per latent vector (paper 4)
    latent_dim: int = 32          # l (paper 128)
    ae_dim: int = 128             # autoencoder width d (paper 512; SwiGLU hidden = 2.5 d as the paper's 1280)
    ae_layers: int = 1            # residual MLP layers per encoder/decoder stage (paper 2)
    variational: bool = True      # False: plain autoencoder z = mu (the ablation)
    kl_weight: float = 1e-3
    kl_clip: float = 0.5          # per-dimension KL floor
    latent_dropout: float = 0.15  # dropout on z (training only)
    mask_prob: float = 0.15       # input tokens replaced by id 0 (training only)
    eval_noise: float = 0.3       # sigma of the Gaussian noise in the robustness metric


@dataclass
class CALMConfig(AEConfig):
    autoencoder: str = None       # path of a trained autoencoder ckpt; None: <out_dir>/autoencoder, trained if absent
    ae_iters: int = 1000          # iterations when the autoencoder is trained first (100% held-out at K <= 4)
    head: str = "energy"          # 'energy' (the paper), 'flow' / 'diffusion' (calm_heads.py), 'mse' (regression)
    head_layers: int = 2          # residual blocks of the head (paper 4)
    head_dim: int = 0             # width of the head's blocks; 0: n_embd // 2 (the recipe; paper: n_embd)
    head_lr_scale: float = 3.0    # the head's learning rate = this x --learning_rate (the recipe; paper: 1)
    noise_size: int = 32          # uniform noise dimensions (paper 64)
    num_samples: int = 8          # N model samples per position (paper 8)
    num_target_samples: int = 32  # M samples of the autoencoder posterior (paper 100)
    alpha: float = 1.0            # energy-score exponent, in (0, 2)
    flow_steps: int = 10          # --head flow: midpoint steps per sample (2 network calls each; authors 10)
    diffusion_steps: int = 100    # --head diffusion: respaced DDPM steps per sample (authors 100)
    temp_sampler: str = "batch"   # 'batch' (approximate, paper's generation) or 'exact' (rejection)
    temp_candidates: int = 200    # candidates of the batch sampler (paper 200)


AE_FIELDS = [f.name for f in fields(AEConfig)]


def chunk_size(args, block_size=None):
    K, T = args.chunk_size, block_size or args.block_size
    if K < 1 or T % K:
        raise UserError(f"chunk_size={K} must be >= 1 and divide block_size={T}")
    return K


# ----------------------------------------------------------------------------- the autoencoder (sec. 2)

class SwiGLULayer(nn.Module):
    """Pre-norm residual MLP: x + W2(SiLU(W1 x) * W3 x) on RMSNorm(x); no attention (context-free)."""

    def __init__(self, d):
        super().__init__()
        self.norm, self.up, self.down = nn.RMSNorm(d), nn.Linear(d, 5 * d, bias=False), nn.Linear(5 * d // 2, d)

    def forward(self, x):
        g, v = self.up(self.norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(g) * v)


class Autoencoder(nn.Module):
    def __init__(self, vocab_size, cfg):
        super().__init__()
        K, d, l, L = cfg.chunk_size, cfg.ae_dim, cfg.latent_dim, cfg.ae_layers
        self.K, self.l = K, l
        self.wte = nn.Embedding(vocab_size, d)      # also the output projection (tied)
        self.enc_tok = nn.Sequential(*[SwiGLULayer(d) for _ in range(L)])   # per token
        self.enc_in = nn.Linear(K * d, d)
        self.enc_chunk = nn.Sequential(*[SwiGLULayer(d) for _ in range(L)])  # per chunk
        self.enc_out = nn.Sequential(nn.RMSNorm(d), nn.Linear(d, 2 * l))      # [mu, log sigma]
        self.dec_in = nn.Linear(l, d)
        self.dec_chunk = nn.Sequential(*[SwiGLULayer(d) for _ in range(L)])
        self.dec_out = nn.Linear(d, K * d)
        self.dec_tok = nn.Sequential(*[SwiGLULayer(d) for _ in range(L)])
        self.norm = nn.RMSNorm(d)
        nn.init.normal_(self.wte.weight, std=0.02)

    def encode(self, chunks):
        """chunks (..., K) tokens -> posterior mean and log std, each (..., l)."""
        h = self.enc_tok(self.wte(chunks))                           # (..., K, d)
        h = self.enc_chunk(self.enc_in(h.flatten(-2)))               # (..., d)
        mu, log_sigma = self.enc_out(h).chunk(2, dim=-1)
        return mu, log_sigma.clamp(-12, 4)

    def decode(self, z):
        """z (..., l) -> logits (..., K, V), the output layer tied to the input embedding."""
        h = self.dec_out(self.dec_chunk(self.dec_in(z)))             # (..., K d)
        h = self.dec_tok(h.view(*z.shape[:-1], self.K, -1))          # (..., K, d)
        return self.norm(h) @ self.wte.weight.t()

    def hidden_states(self, idx):
        mu = self.encode(idx.view(idx.size(0), -1, self.K))[0]       # one vector per chunk (B, T/K, l)
        return {"layers": [mu], "attn": [], "mlp": [], "final": mu}


def ae_loss(model, x, y, args):
    chunks = x.view(x.size(0), -1, model.K)                          # (B, C, K): T/K independent chunks
    inp = chunks
    if model.training and args.mask_prob > 0:                        # random masking of input tokens
        inp = chunks.masked_fill(torch.rand(chunks.shape, device=x.device) < args.mask_prob, 0)
    mu, log_sigma = model.encode(inp)                                # (B, C, l)
    kl = torch.zeros((), device=x.device)
    z = mu
    if args.variational:
        if model.training:
            z = mu + log_sigma.exp() * torch.randn_like(mu)          # reparameterised posterior sample
        kl_d = 0.5 * (mu ** 2 + (2 * log_sigma).exp() - 1 - 2 * log_sigma)  # KL(N(mu, s^2) || N(0, 1)) per dim
        kl = kl_d.clamp(min=args.kl_clip).sum(-1).mean()             # clipped per dimension, summed, mean over chunks
    z = F.dropout(z, args.latent_dropout, model.training)
    logits = model.decode(z)                                         # (B, C, K, V)
    ce = F.cross_entropy(logits.flatten(0, -2), chunks.flatten())
    acc = (logits.argmax(-1) == chunks).float().mean()
    return model.K * ce + args.kl_weight * kl, {"ce": ce.item(), "kl": kl.item(), "acc": acc.item()}


@torch.no_grad()
def reconstruction_accuracy(ae, chunks, sigma=0.0, generator=None):
    """Token accuracy of argmax(decode(mu + sigma * eps)) against the chunks (..., K)."""
    mu = ae.encode(chunks)[0]
    noise = torch.randn(mu.shape, generator=generator, device=mu.device) if sigma > 0 else 0
    return (ae.decode(mu + sigma * noise).argmax(-1) == chunks).float().mean().item()


@torch.no_grad()
def ae_evaluate(model, data, args, sigmas=None, n_batches=None):
    """Held-out reconstruction accuracy, clean and with latent noise (dict keys recon_acc, recon_acc_noisy)."""
    gen = torch.Generator().manual_seed(args.seed + 2)
    x = torch.cat([data.get_batch("val", args.batch_size, args.block_size, gen, args.device)[0]
                   for _ in range(n_batches or args.eval_iters)]).view(-1, model.K)
    noise_gen = torch.Generator(x.device).manual_seed(args.seed + 3)
    if sigmas is not None:
        return {s: reconstruction_accuracy(model, x, s, noise_gen) for s in sigmas}
    return {"recon_acc": reconstruction_accuracy(model, x),
            "recon_acc_noisy": reconstruction_accuracy(model, x, args.eval_noise, noise_gen)}


def build_ae(gcfg, args, data):
    chunk_size(args)
    args.brier_positions = 0  # an autoencoder is no language model: no BrierLM; sample.py shows a round trip
    return Autoencoder(gcfg.vocab_size, args)


# ----------------------------------------------------------------------------- the CALM model

class CALM(nn.Module):
    def __init__(self, gcfg, args):
        super().__init__()
        K, d = chunk_size(args, gcfg.block_size), gcfg.n_embd
        self.K, self.head_kind = K, args.head
        self.backbone = GPT(GPTConfig(**{**gcfg.__dict__, "block_size": gcfg.block_size // K}))  # over chunks
        self.compress = nn.Sequential(nn.Linear(K * d, 2 * d), nn.SiLU(), nn.Linear(2 * d, d), nn.LayerNorm(d))
        self.start = nn.Parameter(torch.randn(d) * 0.02)
        self.head = calm_heads.make_head(d, args)
        self.ae = Autoencoder(gcfg.vocab_size, args).requires_grad_(False)  # frozen
        self.n_chunks = gcfg.block_size // K

    def chunk_inputs(self, idx):
        """idx (B, C*K) tokens -> (B, C, d): each chunk's K token embeddings concatenated and compressed."""
        e = self.backbone.wte(idx.view(idx.size(0), -1, self.K))    # (B, C, K, d)
        return self.compress(e.flatten(-2))

    def with_start(self, x):
        return torch.cat([self.start.expand(x.size(0), 1, -1), x], dim=1)  # (B, 1 + C, d)

    def hidden_states(self, idx):
        """Same dict as GPT.hidden_states, one vector per chunk: the state after reading chunk i (B, T/K, d)."""
        if idx.size(1) % self.K:
            raise UserError(f"hidden_states needs a length that is a multiple of K={self.K}, got {idx.size(1)}")
        if idx.size(1) // self.K + 1 > self.backbone.config.block_size:  # + 1: the start vector comes first
            raise UserError(f"CALM reads a start vector first: hidden_states takes at most "
                            f"{(self.backbone.config.block_size - 1) * self.K} tokens, got {idx.size(1)}")
        x = self.with_start(self.chunk_inputs(idx))                    # (B, 1 + C, d)
        collect = {"layers": [x], "attn": [], "mlp": []}
        collect["final"] = self.backbone.body(x, 0, None, collect)
        return {k: ([t[:, 1:] for t in v] if isinstance(v, list) else v[:, 1:]) for k, v in collect.items()}

    def param_groups(self, groups, args):
        """train.make_optimizer's hook: each group split in two, the head's part with lr_scale = --head_lr_scale."""
        head, out = {id(p) for p in self.head.parameters()}, []
        for g in groups:
            for in_head, scale in ((False, 1.0), (True, args.head_lr_scale)):
                ps = [p for p in g["params"] if (id(p) in head) == in_head]
                if ps:
                    out.append({**g, "params": ps, "lr_scale": scale})
        return out

    @torch.no_grad()
    def decode_tokens(self, z):
        return self.ae.decode(z).argmax(-1)                          # (..., K)


def calm_loss(model, x, y, args):
    """Sec. 3: the head's loss for the next chunk's latent at every chunk position, averaged over positions:
    energy loss against M posterior samples (the paper), flow / diffusion regression to N posterior samples
    (calm_heads.py), or squared error to the posterior mean (--head mse, the deterministic ablation)."""
    B, T = x.shape
    C = T // model.K
    inp = model.with_start(model.chunk_inputs(x[:, :T - model.K]))  # start, chunks 0 .. C-2: (B, C, d)
    h = model.backbone.body(inp)                                      # (B, C, d): h_i predicts chunk i
    with torch.no_grad():                                             # targets from the frozen posterior
        mu, log_sigma = model.ae.encode(x.view(B, C, model.K))       # (B, C, l)
    if model.head_kind == "mse":
        pred = model.head(h, 1)[0]                                   # one deterministic vector
        loss = ((pred - mu) ** 2).sum(-1).mean()
        return loss, {"mse": loss.item()}
    sigma = log_sigma.exp() if args.variational else torch.zeros_like(mu)  # a plain AE's "posterior" is mu
    posterior = lambda m: mu + sigma * torch.randn(m, *mu.shape, device=x.device)  # noqa: E731 (m, B, C, l)
    if model.head_kind != "energy":                                  # flow / diffusion: N regression targets
        return model.head.loss(h, posterior(args.num_samples)).mean(), {}
    xs = model.head(h, args.num_samples)                             # (N, B, C, l)
    ys = posterior(args.num_target_samples)                          # (M, B, C, l)
    loss = calm_heads.energy_loss(xs.flatten(1, 2), ys.flatten(1, 2), args.alpha).mean()
    return loss, {}


# ----------------------------------------------------------------------------- generation

@torch.no_grad()
def next_chunks(model, h, generator=None, temperature=1.0, sampler="batch", candidates=200):
    """One K-token chunk per row of h (B, d): head sample -> decoder argmax. Temperature T < 1, per row: 'exact'
    (falls back to 'batch' after 200k draws without acceptance) or the 'batch' approximation."""
    if calm_heads.temperature_split(temperature) == (1, 0.0):
        return model.decode_tokens(model.head(h, 1, generator)[0])  # (B, K)
    out = []
    for row in h:
        draw = lambda m: model.decode_tokens(model.head(row, m, generator))  # noqa: E731 (m, K)
        chunk = calm_heads.sample_exact(draw, temperature, generator) if sampler == "exact" else None
        out.append(chunk if chunk is not None else calm_heads.sample_batch(draw, temperature, candidates, generator))
    return torch.stack(out)


@torch.no_grad()
def generate_chunks(model, idx, n_chunks, generator=None, temperature=1.0, sampler="batch", candidates=200):
    """Append n_chunks * K tokens to idx (B, T), T a multiple of K: one backbone step per chunk, KV cache; a full
    window (start + C-1 chunks) is re-encoded from its last chunks, as GPT.generate does."""
    cache, C = None, model.n_chunks
    for _ in range(n_chunks):
        if cache is not None and len(cache) < C:
            h = model.backbone.body(model.chunk_inputs(idx[:, -model.K:]), len(cache), cache)
        else:
            cache = KVCache(len(model.backbone.blocks))
            ctx = idx[:, idx.size(1) - min(idx.size(1), (C - 1) * model.K):]
            h = model.backbone.body(model.with_start(model.chunk_inputs(ctx)), 0, cache)
        idx = torch.cat([idx, next_chunks(model, h[:, -1], generator, temperature, sampler, candidates)], dim=1)
    return idx


def calm_generate(model, idx, args, generator=None):
    """sample.py / train.py: args.max_new_tokens tokens after idx (1, T), vector by vector; top_k is ignored."""
    calm_heads.temperature_split(args.temperature)
    if args.temperature < 1 and args.temp_sampler not in ("batch", "exact"):
        raise UserError(f"--temp_sampler must be 'batch' or 'exact', got {args.temp_sampler!r}")
    pad = (-idx.size(1)) % model.K                                   # left-pad the prompt to a multiple of K
    padded = F.pad(idx, (pad, 0), value=0)
    out = generate_chunks(model, padded, -(-args.max_new_tokens // model.K), generator, args.temperature,
                          args.temp_sampler, args.temp_candidates)
    return out[:, pad:pad + idx.size(1) + args.max_new_tokens]


def calm_draw(model, ctx, n_tokens, generator, args, temperature=1.0):
    """BrierLM's sampler: (B, n_tokens) continuations of ctx (B, T), T a multiple of K."""
    if ctx.size(1) % model.K:
        raise UserError(f"CALM contexts must be a multiple of K={model.K} tokens, got {ctx.size(1)}")
    out = generate_chunks(model, ctx, -(-n_tokens // model.K), generator, temperature,
                          getattr(args, "temp_sampler", "batch"), getattr(args, "temp_candidates", 200))
    return out[:, ctx.size(1):ctx.size(1) + n_tokens]


# ----------------------------------------------------------------------------- build: find or train the autoencoder

def load_autoencoder(path, args, tokenizer_name):
    """An autoencoder checkpoint's weights and args; mismatched K, latent dim or tokenizer is a UserError."""
    ckpt = load_checkpoint(path)
    if ckpt.get("objective") != "autoencoder":
        raise UserError(f"{path} is a {ckpt.get('objective')!r} checkpoint, not an autoencoder")
    saved = ckpt["args"]
    for k, mine in (("chunk_size", args.chunk_size), ("latent_dim", args.latent_dim), ("tokenizer", tokenizer_name)):
        if saved[k] != mine:
            raise UserError(f"autoencoder {path} has {k}={saved[k]!r} but this run uses {k}={mine!r}")
    return ckpt


HEAD_FLAGS = {"flow_steps": "flow", "diffusion_steps": "diffusion", "noise_size": "energy",
              "num_target_samples": "energy", "alpha": "energy"}  # flags that only one head reads


def autoencoder_flags(out_dir, args, dataset, tokenizer):
    """train.py flags of the autoencoder CALM trains first (bench/ trains its autoencoders with the same ones)."""
    return dict(objective="autoencoder", out_dir=out_dir, dataset=dataset, tokenizer=tokenizer, device=args.device,
                seed=args.seed, block_size=args.block_size, batch_size=args.batch_size, max_iters=args.ae_iters,
                eval_interval=args.ae_iters, eval_iters=10, brier_positions=0, sample_tokens=0, warmup_iters=30,
                learning_rate=3e-3, log_interval=max(1, args.ae_iters // 10),
                **{k: getattr(args, k) for k in AE_FIELDS})


def default_autoencoder(args):
    return os.path.join(args.out_dir, "autoencoder", "ckpt.pt")


def calm_prepare(args, data):
    """train.py's hook, before build: the autoencoder to train first (none when --autoencoder names one)."""
    if args.autoencoder is not None:
        return []
    path = default_autoencoder(args)
    flags = autoencoder_flags(os.path.dirname(path), args, data.name, data.tokenizer.name)
    return [("the autoencoder (no --autoencoder given)", path, flags)]


def build_calm(gcfg, args, data):
    chunk_size(args)
    for flag, head in HEAD_FLAGS.items():
        if flag in getattr(args, "typed", ()) and args.head != head:
            raise UserError(f"--{flag} is a flag of --head {head}, not of --head {args.head}")
    if "min_lr" not in getattr(args, "typed", {"min_lr"}):
        args.min_lr = args.learning_rate  # the authors' schedule: constant after warm-up (unless --min_lr is given)
    if data is None or getattr(args, "resume", False):               # sample.py / resume: weights come from ckpt
        return CALM(gcfg, args)
    path = args.autoencoder or default_autoencoder(args)
    if not os.path.exists(path):
        raise UserError(f"no autoencoder at {path}: train one with --objective autoencoder, or leave out "
                        f"--autoencoder and train.py trains one there first")
    ckpt = load_autoencoder(path, args, data.tokenizer.name)
    for k in AE_FIELDS:                                              # the CALM ckpt describes the AE inside it
        setattr(args, k, ckpt["args"][k])
    args.autoencoder = path
    model = CALM(gcfg, args)
    model.ae.load_state_dict(ckpt["model"])
    acc = ckpt["metrics"].get("recon_acc", float("nan"))
    print(f"calm: autoencoder {path}: held-out recon_acc {acc:.4f}")
    if not acc >= 0.99:  # CALM can generate no better text than its autoencoder decodes
        hint = "" if args.tokenizer == "bytes" else " or use --tokenizer bytes"
        print(f"WARNING: the autoencoder reconstructs only {acc:.1%} of held-out tokens; train it longer "
              f"(--ae_iters){hint}", file=sys.stderr)
    return model


def calm_evaluate(model, data, args):
    """Reconstruction accuracy of the frozen autoencoder inside, for the record (BrierLM comes from brierlm.py)."""
    return {"ae_recon_acc": ae_evaluate(model.ae, data, args, n_batches=2)["recon_acc"]}


@torch.no_grad()
def ae_generate(model, idx, args, generator=None):
    """An autoencoder does not continue text: it returns the prompt's round trip decode(encode(prompt))."""
    pad = (-idx.size(1)) % model.K
    chunks = F.pad(idx, (pad, 0), value=0).view(idx.size(0), -1, model.K)
    return model.decode(model.encode(chunks)[0]).argmax(-1).flatten(1)[:, pad:]


# `python train.py --objective calm` at --preset cpu (the default): the recipe chosen by bench/calm_runs.py's sweep
# (README, CALM), with CALMConfig's head and a constant learning rate after warm-up (build_calm); 1358 iterations of
# 16 x 128 bytes spend 7e12 training FLOPs, what 600 iterations of the same-size NTP model spend
RECIPE = dict(learning_rate=1e-3, warmup_iters=100, batch_size=16, max_iters=1358, eval_interval=679,
              brier_positions=512)

OBJECTIVES = {
    "autoencoder": dict(config=AEConfig, build=build_ae, loss=ae_loss, evaluate=ae_evaluate, generate=ae_generate,
                        default_tokenizer="bytes"),
    "calm": dict(config=CALMConfig, build=build_calm, loss=calm_loss, evaluate=calm_evaluate,
                 generate=calm_generate, draw=calm_draw, prepare=calm_prepare, default_temperature=1.0,
                 default_tokenizer="bytes", presets={"cpu": RECIPE}),
}
