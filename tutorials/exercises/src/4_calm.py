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
# autoencoder's posterior gives $M$ samples $y_1..y_M$ of the true next latent. The loss (`calm.energy_loss`, eq. E) is the
# negative energy score, estimated without bias:
#
# $$\mathcal L = \frac{2}{NM}\sum_{n=1}^{N}\sum_{m=1}^{M}\lVert x_n - y_m\rVert^{\alpha} \;-\; \frac{1}{N(N-1)}\sum_{n \ne n'}\lVert x_n - x_{n'}\rVert^{\alpha}.$$
#
# The first term pulls samples toward the target; the second pushes them apart, so that the head cannot win by
# collapsing onto the mean. For $\alpha \in (0, 2)$ it is a *strictly proper* scoring rule: its expectation is
# minimised only by the true distribution (the check tests that too). The paper uses $\alpha = 1$, $N = 8$, $M = 100$.
#
# Shapes: `x` `(N, P, l)`, `y` `(M, P, l)` for P positions; return `(P,)` in `x`'s dtype. The sum over $n \ne n'$
# leaves out the diagonal, but a distance of exactly 0 can still occur (two equal samples: the check has a case),
# and `sqrt` has an infinite slope at 0: the gradient becomes NaN. Do what `calm.py` does: **clamp the squared
# distance at `1e-12`** before the power $\alpha/2$ (`1e-12` exactly, or smaller: the check compares values to
# $10^{-5}$, and a clamp at `1e-6` already moves the loss by more than that).

# %% [markdown]
# <details><summary>Hint 2 (open it if you are stuck)</summary>
#
# `x[:, None] - y[None, :]` has shape `(N, M, P, l)`: every pair at once. Sum its squares over the last dimension
# (`(N, M, P)` squared distances), `.clamp_min(1e-12)`, then `** (alpha / 2)`, and average over the first two
# dimensions for the first term. The same with `x` against `x` gives `(N, N, P)`; zero its diagonal (multiply by
# `1 - torch.eye(N, dtype=x.dtype)[:, :, None]`), sum over the first two dimensions and divide by $N(N-1)$.
#
# </details>

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
    # STUB raise NotImplementedError("exercise 4.1: broadcasting gives every pairwise difference at once; the second term leaves out n = n'")

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

# %% [markdown]
# <details><summary>Hint 2 (open it if you are stuck)</summary>
#
# With $\sigma^2$ = `torch.exp(2 * log_sigma)`, `kl = 0.5 * (mu ** 2 + sigma2 - 1 - 2 * log_sigma)` has shape
# `(..., l)`. `torch.clamp(kl, min=clip)` floors each dimension; then `.sum(dim=-1)` over the latent dimensions and
# `.mean()` over the rest. Flooring the sum instead of each dimension is a different regulariser, which the check
# tells apart.
#
# </details>

# %%
def clipped_kl(mu, log_sigma, clip=0.5):
    """sum_d max(KL_d, clip), averaged over all leading dimensions: a scalar."""
    # BEGIN SOLUTION
    kl = 0.5 * (mu.pow(2) + torch.exp(2 * log_sigma) - 1 - 2 * log_sigma)  # (..., l)
    return torch.clamp(kl, min=clip).sum(dim=-1).mean()
    # END SOLUTION
    # STUB raise NotImplementedError("exercise 4.2: sigma^2 = exp(2 log_sigma); the floor applies to each dimension, before any sum")

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

# %% [markdown]
# <details><summary>Hint 2 (open it if you are stuck)</summary>
#
# `torch.nn.functional.cross_entropy` wants logits `(rows, V)` and targets `(rows,)`: `logits.reshape(-1, V)` and
# `chunks.reshape(-1)`. It averages over all $B \cdot C \cdot K$ tokens, so multiply by $K$ = `chunks.size(-1)` to get
# the sum over a chunk's positions averaged over chunks. Add `kl_weight` times your `clipped_kl` with `kl_clip`.
#
# </details>

# %%
def autoencoder_loss(logits, chunks, mu, log_sigma, kl_weight=1e-3, kl_clip=0.5):
    """K * mean token cross-entropy + kl_weight * clipped KL: a scalar."""
    # BEGIN SOLUTION
    K, V = chunks.size(-1), logits.size(-1)
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, V), chunks.reshape(-1))
    return K * ce + kl_weight * clipped_kl(mu, log_sigma, kl_clip)
    # END SOLUTION
    # STUB raise NotImplementedError("exercise 4.3: a token-level cross-entropy over every position of every chunk; mind the factor K")

# %%
checks.autoencoder_loss(autoencoder_loss)

# %% [markdown]
# ## Questions
#
# Answer in a few sentences each, in the cell under the question.
#
# **Q1.** Why does the energy loss need at least $N = 2$ samples from the model per position? What would a head
# trained with the first term alone learn?

# %% [answer]
# The second term estimates $\mathbb E\lVert X - X'\rVert^\alpha$ for two *independent* samples of the model, and an
# unbiased estimate needs two distinct samples: with $N = 1$ there is no pair $n \ne n'$ ($N(N-1) = 0$). Pairing a
# sample with itself would add zeros and bias the term toward 0, which is why the diagonal is left out and the sum
# divided by $N(N-1)$, not $N^2$. Without the second term the loss is $2\,\mathbb E\lVert X - Y\rVert^\alpha$, minimised
# by a point mass (at the spatial median of the targets for $\alpha = 1$, at their mean for $\alpha = 2$): the head
# would collapse to one deterministic latent and stop being a distribution, like the repository's MSE head, whose
# samples are all the same repeated chunk (Brier-1 -0.355). The repulsion between the model's own samples is what
# makes the score proper. The paper uses $N = 8$ and $M = 100$.

# %% [markdown]
# **Q2.** The energy score is strictly proper for $\alpha \in (0, 2)$. What goes wrong at $\alpha = 2$? (Expand the
# two expectations for a model $X$ with mean $\mu_X$ and target $Y$ with mean $\mu_Y$.)

# %% [answer]
# At $\alpha = 2$, $\mathbb E\lVert X - Y\rVert^2 = \lVert\mu_X - \mu_Y\rVert^2 + \operatorname{tr}\Sigma_X +
# \operatorname{tr}\Sigma_Y$ for independent $X, Y$, and $\mathbb E\lVert X - X'\rVert^2 = 2\operatorname{tr}
# \Sigma_X$, so the loss is $2\lVert\mu_X - \mu_Y\rVert^2 + 2\operatorname{tr}\Sigma_Y$: it depends on the model
# only through its mean. Every distribution with the right mean scores the same, so the score is proper but not
# strictly: it cannot tell the true distribution from a point mass at its mean. For $\alpha \in (0, 2)$ the expected
# score minus its minimum is the energy distance between the two distributions, which is zero only when they are
# equal.

# %% [markdown]
# **Q3.** Why does CALM floor the KL **per dimension** at 0.5 instead of using the plain VAE penalty, and why must
# the autoencoder be robust to noise on its latent at all?

# %% [answer]
# The KL term pulls each dimension's posterior toward the prior $\mathcal N(0, 1)$. A dimension pulled all the way
# has KL 0 and carries no information about the chunk (posterior collapse): wasted capacity, and pure noise in the
# latent the language model must predict. Below the floor the clipped term is constant, so it gives no gradient: the
# regulariser stops pushing a dimension once its KL is under 0.5 and leaves it its information. Robustness matters
# because the language model's predicted latents are never exact; the decoder must turn a nearby vector into the same
# tokens. A plain autoencoder's latent space is brittle (small errors decode to wrong tokens); the variational
# posterior, the KL term and dropout spread each chunk's code over a region. The paper keeps about 99.9%
# reconstruction with Gaussian noise of $\sigma \approx 0.3$; this repository measured 92.4% (regularised) against
# 83.6% (plain) at $\sigma = 1.0$ and $K = 4$ (at $K = 2$ the plain one was as robust).

# %% [markdown]
# **Q4.** What does predicting one vector per $K$ tokens buy, and what did it cost at this repository's scale?

# %% [answer]
# $K$ times fewer autoregressive steps of the backbone: generating $T$ tokens takes $T/K$ steps, and the attention
# context is $K$ times shorter. The repository measured a 2.0x to 3.5x generation speed-up at $K = 4$ (the head and
# the decoder take the rest of the 4x). The paper finds that at its scale this costs little quality (CALM-M, 371M
# parameters, BrierLM 5.72, comes close to Transformer-S's 6.05 with about 44% fewer training FLOPs). At about a million
# parameters it costs a lot: at equal training FLOPs CALM $K = 4$ reaches about half of next-token prediction's
# Brier-1 (0.55x on a 4 x 128 backbone, 0.47x on 6 x 192), and its Brier-3 and Brier-4 are near 0, so Brier-1 is
# the number to compare.

# %% [markdown]
# ## Summary

# %%
checks.summary()
