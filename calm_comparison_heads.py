"""The generative heads CALM is compared with (Shao et al. 2025, arXiv 2510.27688; the authors' code has the
flow and diffusion heads, the paper's ablation the deterministic regression head). Each plugs into calm.CALM like
the energy head: head(h, n) -> n samples of the next chunk's latent, head.loss(h, mu, sigma) -> loss per position.

  flow (authors' code)   rectified flow: x_t = (1 - t) x0 + t z, x0 ~ N(0, I), t ~ U[0, 1];  FlowHead
                         loss |v(x_t, t, h) - (z - x0)|^2; sampling integrates dx/dt = v
                         from t = 0 to 1 by the midpoint rule, 2 network calls per step
  diffusion (authors')   DDPM, cosine schedule over 1000 steps, the network predicts the     DiffusionHead
                         noise; sampling: ancestral steps on an evenly respaced subset
  the flow/diffusion     an MLP over the latent whose blocks are modulated (adaptive          AdaLNNet
  network v(x, t, h)     LayerNorm: shift, scale, gate from Linear(SiLU(y))) by y = a
                         sinusoidal embedding of t + Linear(h)
  mse (the ablation)     the energy head's network with the noise fixed at 0, trained by     MSEHead
                         squared error to the posterior mean: one deterministic prediction

Flow and diffusion are trained like the energy head: each position's h is paired with N = num_samples draws of
the frozen autoencoder's posterior (the authors repeat h N times). They need many network calls per sample where
the energy head needs one: `steps` (authors: 10 midpoint steps for flow, 100 respaced steps for diffusion).
Differences from the authors' code: the diffusion head uses each step's fixed posterior variance where theirs learns
an interpolated variance with an extra variational-bound term (improved DDPM), and a 1-step diffusion starts at the
last training step (theirs would respace to step 0); the flow's time enters as the real number 1000 t, not rounded.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from calm import EnergyHead


@dataclass
class ComparisonConfig:
    flow_steps: int = 10          # midpoint steps per sample (2 network calls each; authors 10)
    diffusion_steps: int = 100    # respaced DDPM steps per sample (authors 100)


def posterior_samples(mu, sigma, n):
    """n draws of the frozen autoencoder's posterior N(mu, sigma^2): (n, ..., l)."""
    return mu + sigma * torch.randn(n, *mu.shape, device=mu.device)


class MSEHead(EnergyHead):
    """The deterministic regression ablation: the energy head's network fed zero noise, so every sample is the
    same vector, trained to the posterior mean. It collapses onto the mean of a multimodal future."""

    def forward(self, h, n, generator=None):
        return self.network(torch.zeros(n, *h.shape[:-1], self.noise_size, device=h.device), h)

    def loss(self, h, mu, sigma):
        return ((self(h, 1)[0] - mu) ** 2).sum(-1)                    # (...)


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

    def __init__(self, d_cond, w, l, n_layers, num_samples=8, steps=10):
        super().__init__()
        self.net, self.l, self.steps, self.num_samples = AdaLNNet(d_cond, w, l, n_layers), l, steps, num_samples

    def loss(self, h, mu, sigma):
        """h (..., d), the posterior mu, sigma (..., l) -> (...): the regression over num_samples posterior draws."""
        return self.regression_loss(h, posterior_samples(mu, sigma, self.num_samples)).mean(0)

    def regression_loss(self, h, z):
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

    def __init__(self, d_cond, w, l, n_layers, num_samples=8, steps=100, n_train_steps=1000, clip=10.0):
        super().__init__()
        self.net, self.l, self.steps, self.clip = AdaLNNet(d_cond, w, l, n_layers), l, steps, clip
        self.num_samples = num_samples
        self.register_buffer("alpha_bar", cosine_alpha_bar(n_train_steps), persistent=False)

    def loss(self, h, mu, sigma):
        """h (..., d), the posterior mu, sigma (..., l) -> (...): the regression over num_samples posterior draws."""
        return self.regression_loss(h, posterior_samples(mu, sigma, self.num_samples)).mean(0)

    def regression_loss(self, h, z):
        """h (..., d), z (N, ..., l) target samples -> (N, ...) squared error of the predicted noise, mean over dims."""
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
