"""CALM's alternative generative heads: flow matching and diffusion (Shao et al. 2025, the generative-head
comparison; paper note ../shared/papers/calm.md section 2b). calm.py holds the paper's own energy head; these two
are what it is compared with (`--head flow|diffusion`), built as in the authors' code:

  the network v(x, t, h)         an MLP over the latent x whose blocks are modulated by the backbone      AdaLNNet
                                 state h plus a sinusoidal embedding of the time t (adaptive LayerNorm:
                                 shift, scale and gate from Linear(SiLU(y)), y = time embedding + Linear(h))
  flow matching (rectified flow) x_t = (1 - t) x0 + t z, x0 ~ N(0, I), t ~ U[0, 1];                       FlowHead
                                 loss |v(x_t, t, h) - (z - x0)|^2; sampling integrates dx/dt = v from
                                 t = 0 to 1 with the midpoint rule (2 network calls per step; authors: 10)
  diffusion (DDPM)               cosine noise schedule over 1000 steps, the network predicts the noise;   DiffusionHead
                                 sampling: ancestral DDPM steps on an evenly respaced subset (authors: 100)

Both are trained like the energy head: the backbone state of each position is paired with N = --num_samples
draws z of the frozen autoencoder's posterior (the authors repeat h N times). Unlike the energy head they need
many network calls per sample: `--flow_steps` and `--diffusion_steps` (>= 1) set how many.
Differences from the authors' code: the diffusion head uses the fixed posterior variance of each step where theirs
learns an interpolated variance with an extra variational-bound loss term (improved DDPM); the flow head's time
enters the embedding as the real number 1000 t, not rounded to an integer.
"""
import math
from collections import Counter

import torch
import torch.nn as nn

from gpt import UserError

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

    def __init__(self, d_cond, w, l, n_layers, steps=100, n_train_steps=1000):
        super().__init__()
        self.net, self.l, self.steps = AdaLNNet(d_cond, w, l, n_layers), l, steps
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
            z0 = (x - (1 - ab).sqrt() * eps) / ab.sqrt()                 # predicted clean latent
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
    c_k = (a/k) prod_{j<k} (1 - a/j), the series of 1 - (1 - q)^a in q = 1 - p (paper note, sec. 3)."""
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
