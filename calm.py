"""CALM: Continuous Autoregressive Language Models (Shao, Li, Meng, Zhou, arXiv 2510.27688, 2025).
One autoregressive step predicts one continuous vector that stands for a chunk of K tokens.

Paper -> code (sections by the paper's titles)
  Autoencoder        context-free: each K-chunk alone, residual SwiGLU MLPs, tied    Autoencoder.encode / .decode
                     variational posterior z = mu + sigma * eps, KL clipped per        ae_loss
                     dimension, latent dropout, input masking:
                     loss = K * CE + kl_weight * sum_d max(KL_d, kl_clip)
                     robustness: accuracy with Gaussian noise on z                    reconstruction_accuracy
  Language model     backbone over chunks; input = the previous chunk's K tokens,     CALM.chunk_inputs
                     embedded and compressed: Linear(K d -> 2d), SiLU,
                     Linear(2d -> d), LayerNorm
  Energy head        noise u ~ U[-1/2, 1/2]^s and the state h -> one latent per pass  EnergyHead
                     residual blocks x + Down(SiLU(g) * v), [g, v] = MLP([LN(x), c])  HeadBlock
  Energy loss        eq. (E): 2/(NM) sum |x_n - y_m|^a - 1/(N(N-1)) sum |x_n - x_n'|^a energy_loss, EnergyHead.loss,
                     N head samples, M samples of the frozen posterior; strictly       calm_loss
                     proper for a in (0, 2)
  Generation         head sample -> decoder argmax -> K tokens, one backbone step      generate, generate_chunks
  Temperature        p^(1/T) / Z from a sampler of p: 1/T = n + a; n samples agree,    sample_exact,
                     then a Bernoulli factory accepts with probability p^a             bernoulli_factory
                     the batch approximation (what generation uses)                    sample_batch
  BrierLM            brierlm.py, through samples only

The flow-matching, diffusion and MSE heads the paper compares with are in calm_comparison_heads.py; they plug
into CALM through the same two methods as EnergyHead: head(h, n) -> n samples, head.loss(h, mu, sigma) -> loss.
How CALM is trained from the command line (the autoencoder first, the recipe): objectives.py.

Sizes default to a 2-core CPU; the paper uses latent_dim 128, ae_dim 512, ae_layers 2, noise_size 64, head_layers
4 at the backbone's width, N = 8 model samples, M = 100 target samples, alpha = 1, kl_weight 1e-3, kl_clip 0.5,
p = 0.15. Our additions: a learned start vector is the first backbone input (it predicts chunk 0, so every
position of a window is trained); prompts are left-padded with token 0 to a multiple of K.
"""
import math
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt import GPT, GPTConfig, KVCache
from runtime import UserError


@dataclass
class AEConfig:
    chunk_size: int = 4           # K tokens per latent vector (paper 4)
    latent_dim: int = 32          # l (paper 128)
    ae_dim: int = 128             # autoencoder width d (paper 512; SwiGLU hidden = 2.5 d as the paper's 1280)
    ae_layers: int = 1            # residual MLP layers per encoder/decoder stage (paper 2 in all, 1 per stage)
    variational: bool = True      # False: plain autoencoder z = mu (the ablation)
    kl_weight: float = 1e-3
    kl_clip: float = 0.5          # per-dimension KL floor
    latent_dropout: float = 0.15  # dropout on z (training only)
    mask_prob: float = 0.15       # input tokens replaced by id 0 (training only)


@dataclass
class HeadConfig:
    head_layers: int = 2          # residual blocks of the head (paper 4)
    head_dim: int = 0             # width of the head's blocks; 0: n_embd // 2 (our recipe; paper: n_embd)
    noise_size: int = 32          # uniform noise dimensions s (paper 64)
    num_samples: int = 8          # N model samples per position (paper 8)
    num_target_samples: int = 32  # M samples of the autoencoder posterior (paper 100)
    alpha: float = 1.0            # energy-score exponent, in (0, 2)


def chunks_per_window(block_size, K):
    """How many K-token chunks a window of block_size tokens holds; K must divide it."""
    if K < 1 or block_size % K:
        raise UserError(f"chunk_size={K} must be >= 1 and divide block_size={block_size}")
    return block_size // K


# ----------------------------------------------------------------------------- the autoencoder

class SwiGLULayer(nn.Module):
    """Pre-norm residual MLP: x + W2(SiLU(W1 x) * W3 x) on RMSNorm(x); no attention (context-free)."""

    def __init__(self, d):
        super().__init__()
        self.norm, self.up, self.down = nn.RMSNorm(d), nn.Linear(d, 5 * d, bias=False), nn.Linear(5 * d // 2, d)

    def forward(self, x):
        g, v = self.up(self.norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(g) * v)


class Autoencoder(nn.Module):
    def __init__(self, vocab_size, cfg: AEConfig):
        super().__init__()
        K, d, l, L = cfg.chunk_size, cfg.ae_dim, cfg.latent_dim, cfg.ae_layers
        self.cfg, self.K, self.l = cfg, K, l
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


def ae_loss(model, x):
    """The autoencoder's training loss on tokens x (B, T), T a multiple of K: K * cross-entropy of the
    reconstruction + kl_weight * KL clipped per dimension. Returns (loss, {'ce', 'kl', 'acc'})."""
    cfg = model.cfg
    chunks = x.view(x.size(0), -1, model.K)                          # (B, C, K): T/K independent chunks
    inp = chunks
    if model.training and cfg.mask_prob > 0:                         # random masking of input tokens
        inp = chunks.masked_fill(torch.rand(chunks.shape, device=x.device) < cfg.mask_prob, 0)
    mu, log_sigma = model.encode(inp)                                # (B, C, l)
    kl = torch.zeros((), device=x.device)
    z = mu
    if cfg.variational:
        if model.training:
            z = mu + log_sigma.exp() * torch.randn_like(mu)          # reparameterised posterior sample
        kl_d = 0.5 * (mu ** 2 + (2 * log_sigma).exp() - 1 - 2 * log_sigma)  # KL(N(mu, s^2) || N(0, 1)) per dim
        kl = kl_d.clamp(min=cfg.kl_clip).sum(-1).mean()              # clipped per dimension, summed, mean over chunks
    z = F.dropout(z, cfg.latent_dropout, model.training)
    logits = model.decode(z)                                         # (B, C, K, V)
    ce = F.cross_entropy(logits.flatten(0, -2), chunks.flatten())
    acc = (logits.argmax(-1) == chunks).float().mean()
    return model.K * ce + cfg.kl_weight * kl, {"ce": ce.item(), "kl": kl.item(), "acc": acc.item()}


@torch.no_grad()
def reconstruction_accuracy(ae, chunks, sigma=0.0, generator=None, relative=False):
    """Token accuracy of argmax(decode(mu + sigma * eps)) against the chunks (..., K). relative: sigma is in units
    of the latents' RMS over these chunks (so a plain autoencoder cannot pass by simply growing its latents)."""
    mu = ae.encode(chunks)[0]
    scale = sigma * (mu.pow(2).mean().sqrt() if relative else 1.0)
    noise = torch.randn(mu.shape, generator=generator, device=mu.device) if sigma > 0 else 0
    return (ae.decode(mu + scale * noise).argmax(-1) == chunks).float().mean().item()


# ----------------------------------------------------------------------------- the energy head and loss

class HeadBlock(nn.Module):
    """x + Down(SiLU(g) * v), [g, v] = MLP([LayerNorm(x), c]): the noise path x conditioned on c at every block."""

    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(2 * d, d), nn.SiLU(), nn.Linear(d, d), nn.SiLU(), nn.Linear(d, 2 * d))
        self.down = nn.Linear(d, d)

    def forward(self, x, c):
        g, v = self.mlp(torch.cat([self.norm(x), c], dim=-1)).chunk(2, dim=-1)
        return x + self.down(F.silu(g) * v)


def energy_loss(x, y, alpha=1.0):
    """eq. (E), the negative energy score, unbiased: x (N, P, l) model samples, y (M, P, l) target samples -> (P,)
    2/(NM) sum_nm |x_n - y_m|^a - 1/(N(N-1)) sum_{n != n'} |x_n - x_n'|^a   (strictly proper for a in (0, 2)).
    The second term needs N >= 2 samples: without it the loss rewards collapsing onto the targets' centre."""
    N = x.size(0)
    dist = lambda a, b: ((a[:, None] - b[None]) ** 2).sum(-1).clamp_min(1e-12) ** (alpha / 2)  # noqa: E731
    fit = dist(x, y).mean((0, 1))                                    # (P,) E|X - Y|^a
    off_diagonal = ~torch.eye(N, dtype=torch.bool, device=x.device)  # pairs n != n'
    spread = dist(x, x)[off_diagonal].sum(0) / (N * (N - 1))         # (P,) E|X - X'|^a
    return 2 * fit - spread


class EnergyHead(nn.Module):
    """The state h (..., d) and uniform noise -> one latent sample (..., l) per forward pass (no iterative steps)."""

    def __init__(self, d_cond, l, cfg: HeadConfig):
        super().__init__()
        d = cfg.head_dim or d_cond // 2
        self.noise_size, self.cfg = cfg.noise_size, cfg
        self.noise_in = nn.Sequential(nn.Linear(cfg.noise_size, d), nn.LayerNorm(d))
        self.cond_in = nn.Sequential(nn.Linear(d_cond, d), nn.LayerNorm(d))
        self.blocks = nn.ModuleList([HeadBlock(d) for _ in range(cfg.head_layers)])
        self.out = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d), nn.SiLU(), nn.Linear(d, l))
        nn.init.zeros_(self.out[-1].weight)  # the last layer starts at zero, as the authors'
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, h, n, generator=None):
        """n samples for every condition: (n, ..., l)."""
        u = torch.rand(n, *h.shape[:-1], self.noise_size, generator=generator, device=h.device) - 0.5
        return self.network(u, h)

    def network(self, u, h):
        x, c = self.noise_in(u), self.cond_in(h).expand(u.size(0), *h.shape[:-1], -1)
        for block in self.blocks:
            x = block(x, c)
        return self.out(x)

    def loss(self, h, mu, sigma):
        """eq. (E) at every position: N samples of the head against M samples y = mu + sigma * eps of the frozen
        autoencoder's posterior of the true next chunk. h (..., d), mu and sigma (..., l) -> (...)."""
        N, M = self.cfg.num_samples, self.cfg.num_target_samples
        xs = self(h, N)                                              # (N, ..., l)
        ys = mu + sigma * torch.randn(M, *mu.shape, device=mu.device)  # (M, ..., l)
        return energy_loss(xs.flatten(1, -2), ys.flatten(1, -2), self.cfg.alpha).view(mu.shape[:-1])


# ----------------------------------------------------------------------------- the CALM model

class CALM(nn.Module):
    def __init__(self, gcfg: GPTConfig, ae_cfg: AEConfig, head_cfg: HeadConfig, make_head=None):
        """A GPT backbone over the chunks of gcfg.block_size tokens, a generative head (the energy head, or
        make_head(d, l), one of calm_comparison_heads.py) and the frozen autoencoder (its weights are loaded by
        whoever trains CALM: it is trained first)."""
        super().__init__()
        K, d = ae_cfg.chunk_size, gcfg.n_embd
        self.K, self.n_chunks = K, chunks_per_window(gcfg.block_size, K)
        self.backbone = GPT(GPTConfig(**{**gcfg.__dict__, "block_size": self.n_chunks}))  # over chunks
        self.compress = nn.Sequential(nn.Linear(K * d, 2 * d), nn.SiLU(), nn.Linear(2 * d, d), nn.LayerNorm(d))
        self.start = nn.Parameter(torch.randn(d) * 0.02)
        self.head = (make_head or (lambda d, l: EnergyHead(d, l, head_cfg)))(d, ae_cfg.latent_dim)
        self.ae = Autoencoder(gcfg.vocab_size, ae_cfg).requires_grad_(False)  # frozen

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

    @torch.no_grad()
    def decode_tokens(self, z):
        return self.ae.decode(z).argmax(-1)                          # (..., K)


def calm_loss(model, x):
    """The head's loss for the next chunk's latent at every chunk position of x (B, T), averaged: the energy loss
    eq. (E) for the energy head (a comparison head brings its own loss)."""
    B, T = x.shape
    C = T // model.K
    inp = model.with_start(model.chunk_inputs(x[:, :T - model.K]))  # start, chunks 0 .. C-2: (B, C, d)
    h = model.backbone.body(inp)                                      # (B, C, d): h_i predicts chunk i
    with torch.no_grad():                                             # targets from the frozen posterior
        mu, log_sigma = model.ae.encode(x.view(B, C, model.K))       # (B, C, l)
    sigma = log_sigma.exp() if model.ae.cfg.variational else torch.zeros_like(mu)  # a plain AE's posterior is mu
    return model.head.loss(h, mu, sigma).mean()


# ----------------------------------------------------------------------------- generation

@torch.no_grad()
def next_chunks(model, h, generator=None, temperature=1.0, sampler="batch", candidates=200):
    """One K-token chunk per row of h (B, d): head sample -> decoder argmax. Temperature T < 1, per row: 'exact'
    (falls back to 'batch' when it gives up, see sample_exact) or the 'batch' approximation."""
    if temperature_split(temperature) == (1, 0.0):
        return model.decode_tokens(model.head(h, 1, generator)[0])  # (B, K)
    out = []
    for row in h:
        draw = lambda m: model.decode_tokens(model.head(row, m, generator))  # noqa: E731 (m, K)
        chunk = sample_exact(draw, temperature, generator) if sampler == "exact" else None
        out.append(chunk if chunk is not None else sample_batch(draw, temperature, candidates, generator))
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


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, sampler="batch", candidates=200, generator=None):
    """max_new_tokens tokens after idx (B, T), vector by vector; the prompt is left-padded with token 0 to a
    multiple of K (and the padding removed from the output)."""
    pad = (-idx.size(1)) % model.K
    out = generate_chunks(model, F.pad(idx, (pad, 0), value=0), -(-max_new_tokens // model.K), generator,
                          temperature, sampler, candidates)
    return out[:, pad:pad + idx.size(1) + max_new_tokens]


# ----------------------------------------------------------------------------- temperature

MAX_INVERSE_T = 1e15  # 1/T is capped here: far beyond every sampler's budget, so T -> 0 samples the same from there
#                       on (and 1/T of a subnormal T is infinite)


def temperature_split(T):
    """1/T = n + a with n >= 1 an integer and 0 <= a < 1 (1/T at most MAX_INVERSE_T); T outside (0, 1] is a
    one-line error."""
    if T is None or not 0 < T <= 1:
        raise UserError(f"CALM temperature must be in (0, 1], got {T}")
    inverse = min(1 / T, MAX_INVERSE_T)
    n = math.floor(inverse + 1e-9)
    a = inverse - n
    return n, (a if a > 1e-9 else 0.0)


def bernoulli_factory(coin, a, generator=None):
    """True with probability p^a (0 < a < 1) from a coin that is heads with probability p: for k = 1, 2, ..
    flip; heads -> True; else stop with False with probability a/k. P(False) = sum_k c_k (1-p)^k = 1 - p^a,
    c_k = (a/k) prod_{j<k} (1 - a/j), the series of 1 - (1 - q)^a in q = 1 - p. Cost: about p^(a - 1) flips
    when p is small (the survival prod (1 - a/j) ~ k^-a / Gamma(1 - a) is heavy-tailed): cheap on a toy, ~1,000
    flips per chunk of probability 1e-4 at a = 1/4. A coin that returns None has run out: so does the factory."""
    k = 1
    while True:
        heads = coin()
        if heads is None or heads:
            return heads
        if torch.rand((), generator=generator).item() < a / k:
            return False
        k += 1


def sample_exact(draw, T, generator=None, max_draws=200_000, batch=64):
    """Exact sample from p^(1/T) / Z with a black-box sampler draw(m) -> (m, K), 1/T = n + a: draw n samples;
    unless all n agree, retry; the common value x is then accepted with probability p(x)^a (Bernoulli factory,
    coin = one more draw equals x), else retry. P(x) ~ p(x)^n p(x)^a. None once max_draws draws are spent."""
    n, a = temperature_split(T)
    if n > max_draws:  # T so small that not even one round fits the budget
        return None
    batch = max(1, min(batch, max_draws // n))
    used, extra = 0, []

    def coin(x):  # heads iff one more draw equals x; None when the budget is spent
        nonlocal used
        if not extra:
            if used >= max_draws:
                return None
            extra.extend(draw(16))
            used += 16
        return bool((extra.pop() == x).all())
    while used < max_draws:
        s = draw(batch * n).view(batch, n, -1)                       # (rounds, n, K)
        used += batch * n
        for x in s[(s == s[:, :1]).all(-1).all(-1), 0]:              # rounds whose n samples agree
            accepted = True if a == 0 else bernoulli_factory(lambda: coin(x), a, generator)
            if accepted is None:
                return None
            if accepted:
                return x
    return None


def sample_batch(draw, T, candidates=200, generator=None):
    """Approximate version (what generation uses): draw `candidates` samples once; for m = 1/T, 1/T - 1, ..
    (not below 1), among distinct values seen >= floor(m) times pick one with weight C(count, m), the
    (generalised) number of accepted m-subsets. 1/T an integer: the authors' rule."""
    s = draw(candidates)                                             # (N, K)
    counts = Counter(tuple(r) for r in s.tolist())
    m, top = min(1 / T, MAX_INVERSE_T), max(counts.values())
    n = math.floor(m + 1e-9)
    if n > top:  # step m down by whole units until some value is seen floor(m) times (in one step: T -> 0 is safe)
        m, n = top + max(0.0, m - n), top
    keep = [(v, c) for v, c in counts.items() if c >= n]
    # C(c, m) = Gamma(c + 1) / (Gamma(m + 1) Gamma(c - m + 1)); the constant Gamma(m + 1) cancels
    logw = torch.tensor([math.lgamma(c + 1) - math.lgamma(c - m + 1) for _, c in keep])
    i = torch.multinomial(torch.softmax(logw, 0), 1, generator=generator).item()
    return torch.tensor(keep[i][0], device=s.device)
