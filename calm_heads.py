"""CALM's generative heads and likelihood-free temperature (Shao et al. 2025; paper note ../shared/papers/calm.md,
sections 2, 2b and 3). A head turns the backbone state h of a position into samples of the next chunk's latent;
calm.py trains it and decodes its samples. `--head`:

  energy (the paper's)   noise u ~ U[-1/2, 1/2]^s and h -> a latent in ONE pass: residual    EnergyHead
                         blocks x + Down(SiLU(g) * v), [g, v] = MLP([LayerNorm(x), c])
                         trained by the energy loss, strictly proper for alpha in (0, 2)      energy_loss
  mse (the ablation)     the same network with the noise fixed at 0, squared error to mu     EnergyHead
  flow (authors' code)   rectified flow: x_t = (1 - t) x0 + t z, x0 ~ N(0, I), t ~ U[0, 1];  FlowHead
                         loss |v(x_t, t, h) - (z - x0)|^2; sampling integrates dx/dt = v
                         from t = 0 to 1 by the midpoint rule, 2 network calls per step
  diffusion (authors')   DDPM, cosine schedule over 1000 steps, the network predicts the     DiffusionHead
                         noise; sampling: ancestral steps on an evenly respaced subset
  the flow/diffusion     an MLP over the latent whose blocks are modulated (adaptive          AdaLNNet
  network v(x, t, h)     LayerNorm: shift, scale, gate from Linear(SiLU(y))) by y = a
                         sinusoidal embedding of t + Linear(h)
  sec. 3 temperature     p^(1/T) / Z from a black-box sampler: n-sample agreement for the     sample_exact
                         integer part of 1/T, a Bernoulli factory for its fractional part     bernoulli_factory
                         the batch approximation (what generation uses)                        sample_batch

Flow and diffusion are trained like the energy head: each position's h is paired with N = --num_samples draws of
the frozen autoencoder's posterior (the authors repeat h N times). They need many network calls per sample where
the energy head needs one: `--flow_steps` (authors 10) and `--diffusion_steps` (authors 100), each >= 1.
Differences from the authors' code: the diffusion head uses each step's fixed posterior variance where theirs learns
an interpolated variance with an extra variational-bound term (improved DDPM), and a 1-step diffusion starts at the
last training step (theirs would respace to step 0); the flow's time enters as the real number 1000 t, not rounded.
"""
import math
from collections import Counter

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt import UserError

# ----------------------------------------------------------------------------- the energy head and loss (paper)

class HeadBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(2 * d, d), nn.SiLU(), nn.Linear(d, d), nn.SiLU(), nn.Linear(d, 2 * d))
        self.down = nn.Linear(d, d)

    def forward(self, x, c):
        g, v = self.mlp(torch.cat([self.norm(x), c], dim=-1)).chunk(2, dim=-1)
        return x + self.down(F.silu(g) * v)


class EnergyHead(nn.Module):
    """h (..., d) and uniform noise -> one latent sample (..., l) per forward pass (no diffusion steps)."""

    def __init__(self, d_cond, d, l, noise_size, n_layers, deterministic=False):
        super().__init__()
        self.noise_size, self.deterministic = noise_size, deterministic
        self.noise_in, self.cond_in = nn.Sequential(nn.Linear(noise_size, d), nn.LayerNorm(d)), \
            nn.Sequential(nn.Linear(d_cond, d), nn.LayerNorm(d))
        self.blocks = nn.ModuleList([HeadBlock(d) for _ in range(n_layers)])
        self.out = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d), nn.SiLU(), nn.Linear(d, l))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, h, n, generator=None):
        """n samples for every condition: (n, ..., l). deterministic: noise fixed at 0 (the MSE head)."""
        u = torch.rand(n, *h.shape[:-1], self.noise_size, generator=generator, device=h.device) - 0.5
        x, c = self.noise_in(u * (not self.deterministic)), self.cond_in(h).expand(n, *h.shape[:-1], -1)
        for block in self.blocks:
            x = block(x, c)
        return self.out(x)


def energy_loss(x, y, alpha=1.0):
    """Negative energy score, unbiased: x (N, P, l) model samples, y (M, P, l) target samples -> (P,)
    2/(NM) sum_nm |x_n - y_m|^a - 1/(N(N-1)) sum_{n != n'} |x_n - x_n'|^a   (strictly proper for a in (0, 2))."""
    N = x.size(0)
    dist = lambda a, b: ((a[:, None] - b[None]) ** 2).sum(-1).clamp_min(1e-12) ** (alpha / 2)  # noqa: E731
    fit = dist(x, y).mean((0, 1))                                    # (P,) E|X - Y|^a
    off_diagonal = ~torch.eye(N, dtype=torch.bool, device=x.device)  # pairs n != n'
    spread = dist(x, x)[off_diagonal].sum(0) / (N * (N - 1))         # (P,) E|X - X'|^a
    return 2 * fit - spread


HEADS = ("energy", "flow", "diffusion", "mse")


def make_head(d, args):
    """The generative head on the backbone state (d): one sample per call (energy), or steps of a flow/diffusion."""
    if args.head not in HEADS:
        raise UserError(f"--head must be one of {', '.join(HEADS)}, got {args.head!r}")
    w, l, layers = args.head_dim or d // 2, args.latent_dim, args.head_layers
    if args.head in ("energy", "mse"):
        return EnergyHead(d, w, l, args.noise_size, layers, deterministic=args.head == "mse")
    steps = getattr(args, f"{args.head}_steps")
    if steps < 1:
        raise UserError(f"--{args.head}_steps must be at least 1, got {steps}")
    head = FlowHead if args.head == "flow" else DiffusionHead
    return head(d, w, l, layers, steps)


# ----------------------------------------------------------------------------- flow matching and diffusion

FREQ = 256  # sinusoidal time-embedding size (as the authors')


def time_embedding(t, dim=FREQ, max_period=10000.0):
    """t (...) real time steps in [0, 1000] -> (..., dim) [cos, sin] features at geometric frequencies."""
    freqs = torch.exp(-math.log(max_period) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    angles = t[..., None].float() * freqs
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class AdaLNBlock(nn.Module):
    """x + gate * MLP(LayerNorm(x) * (1 + scale) + shift), (shift, scale, gate) = Linear(SiLU(y))."""

    def __init__(self, w):
        super().__init__()
        self.norm = nn.LayerNorm(w, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(w, w), nn.SiLU(), nn.Linear(w, w))
        self.mod = nn.Sequential(nn.SiLU(), nn.Linear(w, 3 * w))
        nn.init.zeros_(self.mod[1].weight)  # every block starts as the identity
        nn.init.zeros_(self.mod[1].bias)

    def forward(self, x, y):
        shift, scale, gate = self.mod(y).chunk(3, dim=-1)
        return x + gate * self.mlp(self.norm(x) * (1 + scale) + shift)


class AdaLNNet(nn.Module):
    """v(x (..., l), t (...), h (..., d)) -> (..., l); h may be un-repeated (it broadcasts against x)."""

    def __init__(self, d_cond, w, l, n_layers):
        super().__init__()
        self.x_in, self.c_in = nn.Linear(l, w), nn.Linear(d_cond, w)
        self.t_in = nn.Sequential(nn.Linear(FREQ, w), nn.SiLU(), nn.Linear(w, w))
        self.blocks = nn.ModuleList([AdaLNBlock(w) for _ in range(n_layers)])
        self.out_norm = nn.LayerNorm(w, elementwise_affine=False, eps=1e-6)
        self.out_mod = nn.Sequential(nn.SiLU(), nn.Linear(w, 2 * w))
        self.out = nn.Linear(w, l)
        for lin in (self.out_mod[1], self.out):  # zero-initialised output: v = 0 at the start
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x, t, h):
        y = self.t_in(time_embedding(t)) + self.c_in(h)                  # (..., w) condition
        x = self.x_in(x)
        for block in self.blocks:
            x = block(x, y)
        shift, scale = self.out_mod(y).chunk(2, dim=-1)
        return self.out(self.out_norm(x) * (1 + scale) + shift)


class FlowHead(nn.Module):
    """Rectified flow matching; forward(h, n) = n samples (n, ..., l) by `steps` midpoint steps."""

    def __init__(self, d_cond, w, l, n_layers, steps=10):
        super().__init__()
        self.net, self.l, self.steps = AdaLNNet(d_cond, w, l, n_layers), l, steps

    def loss(self, h, z):
        """h (..., d), z (N, ..., l) target samples -> (N, ...) squared velocity error, mean over dims."""
        t = torch.rand(z.shape[:-1], device=z.device)
        x0 = torch.randn_like(z)
        xt = (1 - t[..., None]) * x0 + t[..., None] * z                  # the straight path from noise to z
        return ((self.net(xt, 1000 * t, h) - (z - x0)) ** 2).mean(-1)    # its velocity is z - x0

    def forward(self, h, n, generator=None):
        x = torch.randn(n, *h.shape[:-1], self.l, generator=generator, device=h.device)
        dt = 1.0 / self.steps
        for i in range(self.steps):                                      # midpoint rule, t = 0 -> 1
            t = torch.full(x.shape[:-1], i * dt, device=h.device)
            x_mid = x + 0.5 * dt * self.net(x, 1000 * t, h)
            x = x + dt * self.net(x_mid, 1000 * (t + 0.5 * dt), h)
        return x


def cosine_alpha_bar(n_steps=1000, s=0.008):
    """alpha_bar_t = prod_{u <= t} (1 - beta_u) of the cosine schedule (Nichol & Dhariwal 2021), betas <= 0.999."""
    f = torch.cos((torch.arange(n_steps + 1, dtype=torch.float64) / n_steps + s) / (1 + s) * math.pi / 2) ** 2
    return torch.cumprod((f[1:] / f[:-1]).clamp(min=0.001), 0).float()  # (n_steps,)


class DiffusionHead(nn.Module):
    """DDPM noise prediction; forward(h, n) = n samples (n, ..., l) by `steps` respaced ancestral steps."""

    def __init__(self, d_cond, w, l, n_layers, steps=100, n_train_steps=1000, clip=10.0):
        super().__init__()
        self.net, self.l, self.steps, self.clip = AdaLNNet(d_cond, w, l, n_layers), l, steps, clip
        self.register_buffer("alpha_bar", cosine_alpha_bar(n_train_steps), persistent=False)

    def loss(self, h, z):
        """h (..., d), z (N, ..., l) -> (N, ...) squared error of the predicted noise, mean over dims."""
        t = torch.randint(len(self.alpha_bar), z.shape[:-1], device=z.device)
        a = self.alpha_bar[t][..., None]
        eps = torch.randn_like(z)
        xt = a.sqrt() * z + (1 - a).sqrt() * eps                         # q(x_t | z)
        return ((self.net(xt, t, h) - eps) ** 2).mean(-1)

    def forward(self, h, n, generator=None):
        ts = torch.linspace(len(self.alpha_bar) - 1, 0, self.steps).round().long().tolist()  # respaced, T-1 .. 0
        x = torch.randn(n, *h.shape[:-1], self.l, generator=generator, device=h.device)
        for i, t in enumerate(ts):
            last = i + 1 == len(ts)
            ab, ab_prev = self.alpha_bar[t], torch.ones(()) if last else self.alpha_bar[ts[i + 1]]
            beta = 1 - ab / ab_prev                                      # the respaced step's beta
            eps = self.net(x, torch.full(x.shape[:-1], float(t), device=h.device), h)
            z0 = ((x - (1 - ab).sqrt() * eps) / ab.sqrt()).clamp(-self.clip, self.clip)  # predicted clean latent
            mean = (ab_prev.sqrt() * beta * z0 + (1 - beta).sqrt() * (1 - ab_prev) * x) / (1 - ab)  # q(x_prev|x, z0)
            var = beta * (1 - ab_prev) / (1 - ab)                        # its variance (0 at the last step)
            x = mean + (0 if last else var.sqrt() * torch.randn(x.shape, generator=generator, device=h.device))
        return x


# ----------------------------------------------------------------------------- temperature (sec. 5)

def temperature_split(T):
    """1/T = n + a with n >= 1 an integer and 0 <= a < 1; T outside (0, 1] is a one-line error."""
    if T is None or not 0 < T <= 1:
        raise UserError(f"CALM temperature must be in (0, 1], got {T}")
    n = math.floor(1 / T + 1e-9)
    a = 1 / T - n
    return n, (a if a > 1e-9 else 0.0)


def bernoulli_factory(coin, a, generator=None):
    """True with probability p^a (0 < a < 1) from a coin that is heads with probability p: for k = 1, 2, ..
    flip; heads -> True; else stop with False with probability a/k. P(False) = sum_k c_k (1-p)^k = 1 - p^a,
    c_k = (a/k) prod_{j<k} (1 - a/j), the series of 1 - (1 - q)^a in q = 1 - p (paper note, sec. 3). Cost: about
    p^(a - 1) flips when p is small (the survival prod (1 - a/j) ~ k^-a / Gamma(1 - a) is heavy-tailed): cheap on
    a toy, ~1,000 flips per chunk of probability 1e-4 at a = 1/4 (README, CALM: temperature)."""
    k = 1
    while True:
        if coin():
            return True
        if torch.rand((), generator=generator).item() < a / k:
            return False
        k += 1


def sample_exact(draw, T, generator=None, max_draws=200_000, batch=64):
    """Exact sample from p^(1/T) / Z with a black-box sampler draw(m) -> (m, K), 1/T = n + a: draw n samples;
    unless all n agree, retry; the common value x is then accepted with probability p(x)^a (Bernoulli factory,
    coin = one more draw equals x), else retry. P(x) ~ p(x)^n p(x)^a. None after max_draws draws."""
    n, a = temperature_split(T)
    used, extra = 0, []

    def coin(x):
        nonlocal used
        if not extra:
            extra.extend(draw(16))
            used += 16
        return bool((extra.pop() == x).all())
    while used < max_draws:
        s = draw(batch * n).view(batch, n, -1)                       # (rounds, n, K)
        used += batch * n
        for x in s[(s == s[:, :1]).all(-1).all(-1), 0]:              # rounds whose n samples agree
            if a == 0 or bernoulli_factory(lambda: coin(x), a, generator):
                return x
    return None


def sample_batch(draw, T, candidates=200, generator=None):
    """Approximate version (what generation uses): draw `candidates` samples once; for m = 1/T, 1/T - 1, ..
    (not below 1), among distinct values seen >= floor(m) times pick one with weight C(count, m), the
    (generalised) number of accepted m-subsets. 1/T an integer: the authors' rule."""
    s = draw(candidates)                                             # (N, K)
    counts = Counter(tuple(r) for r in s.tolist())
    m = 1 / T
    while True:
        keep = [(v, c) for v, c in counts.items() if c >= math.floor(m + 1e-9)]
        if keep:  # C(c, m) = Gamma(c + 1) / (Gamma(m + 1) Gamma(c - m + 1)); the constant Gamma(m + 1) cancels
            logw = torch.tensor([math.lgamma(c + 1) - math.lgamma(c - m + 1) for _, c in keep])
            i = torch.multinomial(torch.softmax(logw, 0), 1, generator=generator).item()
            return torch.tensor(keep[i][0], device=s.device)
        m = max(m - 1, 1.0)
