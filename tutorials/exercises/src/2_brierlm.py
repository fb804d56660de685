# %% [markdown]
# # Exercises 2: BrierLM, scoring a language model from samples alone
#
# *Shao et al. 2025, "Continuous Autoregressive Language Models" (arXiv 2510.27688), the BrierLM part of its
# evaluation; code: `brierlm.py`; tutorial: `tutorials/brierlm.ipynb`.*
#
# Perplexity needs the probability $P(y)$ of the observed token. CALM, diffusion and energy models cannot give it:
# they can only **sample**. BrierLM scores any model from two samples per position, on one scale for all of them.
# You will write the estimator, the exact score it estimates, and the final aggregate.
#
# Each check prints `PASS ...`, or `FAIL ...` with what differs; *Run all* always goes through.

# %% setup

# %% [markdown]
# ## 2.1 The two-sample estimator of Brier-n
#
# The CALM paper's evaluation section (sec. 4 in `calm.py`'s map of the paper) defines BrierLM from the Brier score
# of a predictive distribution $P$ for the observed outcome $y$ (higher is better, at most 1):
# $\mathrm{Brier}(P, y) = 2P(y) - \sum_x P(x)^2$. Draw two **independent** samples $x_1, x_2 \sim P$; then
#
# $$\widehat{\mathrm{Brier}} = \mathbb 1\{x_1 = y\} + \mathbb 1\{x_2 = y\} - \mathbb 1\{x_1 = x_2\}$$
#
# is unbiased: $\mathbb E\,\mathbb 1\{x_1 = y\} = P(y)$ and $\mathbb E\,\mathbb 1\{x_1 = x_2\} = \sum_x P(x)^2$.
# For **Brier-n** the outcome is the n-gram after a position: $x_1$, $x_2$ and $y$ are token sequences and "equal"
# means all of their first $n$ tokens are equal. One 4-token sample per side gives every $n = 1..4$ at once.
#
# Inputs: `x1`, `x2`, `y` are integer tensors `(N, L)` with `L >= max_n` (N positions). Return a **float** tensor
# `(N, max_n)` whose column `n - 1` is the Brier-n estimate of each position.

# %%
def two_sample_brier(x1, x2, y, max_n=4):
    """Unbiased Brier-1..max_n estimates per position: (N, max_n) floats."""
    # BEGIN SOLUTION
    x1, x2, y = x1[:, :max_n], x2[:, :max_n], y[:, :max_n]
    first_n_equal = lambda a, b: (a == b).int().cumprod(dim=1)   # noqa: E731  column n-1: the first n tokens agree
    return (first_n_equal(x1, y) + first_n_equal(x2, y) - first_n_equal(x1, x2)).float()
    # END SOLUTION
    # STUB raise NotImplementedError("exercise 2.1: keep the first max_n columns; 'the first n tokens agree' is the cumulative product along dim 1 of the per-token matches; combine 1{x1=y} + 1{x2=y} - 1{x1=x2}")

# %%
checks.two_sample_brier(two_sample_brier)

# %% [markdown]
# ## 2.2 The exact Brier-1 of a model that has probabilities
#
# A token model gives $P = \mathrm{softmax}(\text{logits})$, so Brier-1 can be computed exactly:
#
# $$\mathrm{Brier}(P, y) = 2P(y) - \sum_x P(x)^2 \;=\; 1 - \sum_x \big(P(x) - \mathbb 1\{x = y\}\big)^2 .$$
#
# The second form is the classic squared-error Brier loss, turned into a score. The collision term $\sum_x P(x)^2$
# is what punishes an over-confident model. Return one value per row, differentiable in the logits.

# %%
def exact_brier1(logits, y):
    """logits (N, V), y (N,) -> (N,): 2 P(y) - sum_x P(x)^2 with P = softmax(logits)."""
    # BEGIN SOLUTION
    p = torch.softmax(logits.float(), dim=-1)
    return 2 * p[torch.arange(len(y)), y] - (p ** 2).sum(dim=-1)
    # END SOLUTION
    # STUB raise NotImplementedError("exercise 2.2: p = softmax(logits, -1); pick p[row, y[row]] for every row; subtract the sum of p squared")

# %%
checks.exact_brier1(exact_brier1)

# %% [markdown]
# ## 2.3 BrierLM
#
# The paper aggregates the four mean scores into one number, a geometric mean scaled to 0..100:
#
# $$\mathrm{BrierLM} = 100\,\big(\mathrm{Brier}_1\,\mathrm{Brier}_2\,\mathrm{Brier}_3\,\mathrm{Brier}_4\big)^{1/4}.$$
#
# A mean Brier-n can be negative (a confidently wrong model, or noise on a rare 4-gram). This repository clamps
# **each** Brier-n at 0 before the product, so any Brier-n $\le 0$ gives BrierLM = 0 (the authors' code clamps the
# product instead, which would let two negative factors make a positive score). Take a list of $n$ numbers (the
# paper: $n = 4$) and return a Python float.

# %%
import math


def brierlm(briers):
    """100 x the geometric mean of the Brier-n in the list, each clamped at 0 first."""
    # BEGIN SOLUTION
    clamped = [max(float(b), 0.0) for b in briers]
    return 100.0 * math.prod(clamped) ** (1.0 / len(clamped))
    # END SOLUTION
    # STUB raise NotImplementedError("exercise 2.3: clamp every Brier-n at 0, multiply them, take the 1/n-th power, times 100")

# %%
checks.brierlm(brierlm)

# %% [markdown]
# ## See it work: accuracy is not a proper score
#
# Sharpen a distribution with temperature $T < 1$: the accuracy of a sample, $P_T(y)$, goes up as long as $y$ is
# the most likely token, but the Brier score punishes the lost calibration. Here the true next-token distribution
# is $P$ itself and we average over $y \sim P$ (run it once your exercise 2.2 passes; `tutorials/brierlm.ipynb`
# shows the same on a trained model).

# %%
P = torch.tensor([0.5, 0.3, 0.15, 0.05])
for T in (0.25, 0.5, 1.0, 2.0):
    logits = (P.log() / T).expand(4, 4)       # the model's sharpened (T < 1) or flattened (T > 1) distribution
    ys = torch.arange(4)                      # every possible outcome y, weighted by its true probability below
    try:
        brier = (P * exact_brier1(logits, ys)).sum().item()
        print(f"T = {T:4}: expected sample accuracy {(P * torch.softmax(logits, -1)[ys, ys]).sum():.3f}, "
              f"expected Brier {brier:.3f}")
    except NotImplementedError:
        print("write exercise 2.2 first")
        break

# %% [markdown]
# ## Summary

# %%
checks.summary()
