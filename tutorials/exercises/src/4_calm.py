# %% [markdown]
# # Exercises 4: CALM, the energy loss and the KL-clipped autoencoder
#
# *Shao et al. 2025, "Continuous Autoregressive Language Models" (arXiv 2510.27688); code: `calm.py`, whose
# docstring maps the paper's sections to functions; tutorial: `tutorials/calm.ipynb`.*
#
# CALM predicts one continuous vector per step, standing for a chunk of K tokens. An autoencoder maps each chunk
# to a latent vector and back; a Transformer predicts the next latent with a generative head trained by the
# **energy loss**, which needs only samples. You will write the energy loss, the clipped KL that keeps the
# autoencoder's latent space smooth, and the autoencoder's loss.
#
# Each check prints `PASS ...`, or `FAIL ...` with what differs; *Run all* always goes through.

# %% setup

# %% [markdown]
# ## 4.1 The energy loss
#
# The head gives $N$ samples $x_1..x_N$ for a position (independent noise, the same hidden state); the frozen
# autoencoder's posterior gives $M$ samples $y_1..y_M$ of the true next latent. The loss (calm_heads.py, sec. 3) is the
# negative energy score, estimated without bias:
#
# $$\mathcal L = \frac{2}{NM}\sum_{n=1}^{N}\sum_{m=1}^{M}\lVert x_n - y_m\rVert^{\alpha} \;-\; \frac{1}{N(N-1)}\sum_{n \ne n'}\lVert x_n - x_{n'}\rVert^{\alpha}.$$
#
# The first term pulls samples toward the target; the second pushes them apart, so that the head cannot win by
# collapsing onto the mean. For $\alpha \in (0, 2)$ it is a *strictly proper* scoring rule: its expectation is
# minimised only by the true distribution (the check tests that too). The paper uses $\alpha = 1$, $N = 8$, $M = 100$.
#
# Shapes: `x` `(N, P, l)`, `y` `(M, P, l)` for P positions; return `(P,)`. Note the sum over $n \ne n'$ leaves out the
# diagonal: a distance of exactly 0 has no finite gradient for $\alpha \le 1$ if you take a square root of 0,
# so keep it out of the graph (or clamp the squared distance at a tiny value before the power).

# %%
def energy_loss(x, y, alpha=1.0):
    """x (N, P, l) model samples, y (M, P, l) target samples -> (P,) negative energy score."""
    # BEGIN SOLUTION
    N = x.size(0)

    def distance(a, b):                               # (A, P, l), (B, P, l) -> (A, B, P) |a_i - b_j|^alpha
        squared = ((a[:, None] - b[None, :]) ** 2).sum(-1)
        return squared.clamp_min(1e-12) ** (alpha / 2)
    fit = distance(x, y).mean(dim=(0, 1))                                    # (P,)
    pairs = distance(x, x) * (1 - torch.eye(N, dtype=x.dtype))[:, :, None]   # the diagonal n = n' zeroed
    spread = pairs.sum(dim=(0, 1)) / (N * (N - 1))                           # (P,)
    return 2 * fit - spread
    # END SOLUTION
    # STUB raise NotImplementedError("exercise 4.1: pairwise distances with broadcasting, (A, 1, P, l) - (1, B, P, l); mean over (n, m) for the first term; for the second sum over n != n' and divide by N(N-1)")

# %%
checks.energy_loss(energy_loss)

# %% [markdown]
# ## 4.2 The clipped KL
#
# The encoder gives a Gaussian posterior $\mathcal N(\mu, \sigma^2)$ per latent dimension (as $\mu$ and
# $\log\sigma$). The usual VAE penalty is $\mathrm{KL}(\mathcal N(\mu, \sigma^2)\,\Vert\,\mathcal N(0, 1))$, per dimension
#
# $$\mathrm{KL}_d = \tfrac12\left(\mu_d^2 + \sigma_d^2 - 1 - 2\log\sigma_d\right).$$
#
# CALM floors it **per dimension** (calm.py: sec. 2, "KL clipping"): $\max(\mathrm{KL}_d, c)$ with $c = 0.5$, summed over
# the latent dimensions and averaged over chunks. A dimension already below the floor gets no gradient, so the
# regulariser cannot squeeze it all the way to the prior (posterior collapse: a dimension that carries nothing).
#
# Shapes: `mu`, `log_sigma` `(..., l)`; return a scalar (the mean over every leading dimension).

# %%
def clipped_kl(mu, log_sigma, clip=0.5):
    """sum_d max(KL_d, clip), averaged over all leading dimensions: a scalar."""
    # BEGIN SOLUTION
    kl = 0.5 * (mu.pow(2) + torch.exp(2 * log_sigma) - 1 - 2 * log_sigma)  # (..., l)
    return torch.clamp(kl, min=clip).sum(dim=-1).mean()
    # END SOLUTION
    # STUB raise NotImplementedError("exercise 4.2: KL_d = 0.5 (mu^2 + sigma^2 - 1 - 2 log sigma) with sigma^2 = exp(2 log_sigma); clamp at clip (min), sum over the last dim, mean")

# %%
checks.clipped_kl(clipped_kl)

# %% [markdown]
# ## 4.3 The autoencoder's loss
#
# The autoencoder reconstructs each K-token chunk from its latent. Its loss (calm.py: sec. 2) is the token
# cross-entropy, averaged over every token and multiplied by K (i.e. summed over the K positions of a chunk,
# averaged over chunks), plus the clipped KL with a small weight $\beta$ (the paper: $10^{-3}$):
#
# $$\mathcal L_{AE} = K\cdot \overline{\mathrm{CE}} + \beta \sum_d \max(\mathrm{KL}_d, c).$$
#
# Shapes: `logits` `(B, C, K, V)`, `chunks` `(B, C, K)` token ids, `mu` and `log_sigma` `(B, C, l)`. You may call
# your `clipped_kl`. The check builds a small autoencoder, encodes and decodes real chunks, and compares your loss
# and every parameter's gradient with `calm.ae_loss` (in eval mode: no sampling, dropout or masking).

# %%
def autoencoder_loss(logits, chunks, mu, log_sigma, kl_weight=1e-3, kl_clip=0.5):
    """K * mean token cross-entropy + kl_weight * clipped KL: a scalar."""
    # BEGIN SOLUTION
    K, V = chunks.size(-1), logits.size(-1)
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, V), chunks.reshape(-1))
    return K * ce + kl_weight * clipped_kl(mu, log_sigma, kl_clip)
    # END SOLUTION
    # STUB raise NotImplementedError("exercise 4.3: F.cross_entropy on logits flattened to (B C K, V) and chunks to (B C K,); times K; plus kl_weight * clipped_kl(mu, log_sigma, kl_clip)")

# %%
checks.autoencoder_loss(autoencoder_loss)

# %% [markdown]
# ## Summary

# %%
checks.summary()
