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
# Inputs: `x1`, `x2`, `y` are integer tensors `(N, L)` with `L >= max_n` (N positions; the rows may be longer than
# `max_n`, and only their first `max_n` tokens count). Return a **float32** tensor `(N, max_n)` whose column
# `n - 1` is the Brier-n estimate of each position.

# %% [markdown]
# <details><summary>Hint 2 (open it if you are stuck)</summary>
#
# Keep the first `max_n` columns of `x1`, `x2` and `y` (`[:, :max_n]`). `(a == b)` is the `(N, max_n)` table of
# token-by-token matches; its cumulative product along the row, `(a == b).int().cumprod(dim=1)`, holds a 1 in column
# `n - 1` exactly when the first `n` tokens all match. Build that table for (x1, y), (x2, y) and (x1, x2), combine
# them as in the formula, and finish with `.float()`.
#
# </details>

# %%
def two_sample_brier(x1, x2, y, max_n=4):
    """Unbiased Brier-1..max_n estimates per position: (N, max_n) floats."""
    # BEGIN SOLUTION
    x1, x2, y = x1[:, :max_n], x2[:, :max_n], y[:, :max_n]
    first_n_equal = lambda a, b: (a == b).int().cumprod(dim=1)   # noqa: E731  column n-1: the first n tokens agree
    return (first_n_equal(x1, y) + first_n_equal(x2, y) - first_n_equal(x1, x2)).float()
    # END SOLUTION
    # STUB raise NotImplementedError("exercise 2.1: compare token by token first; 'the first n tokens all agree' is a running AND along each row")

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

# %% [markdown]
# <details><summary>Hint 2 (open it if you are stuck)</summary>
#
# `p = torch.softmax(logits, dim=-1)`, shape `(N, V)`. $P(y)$ of every row at once: `p[torch.arange(N), y]` (or
# `p.gather(1, y[:, None]).squeeze(1)`). The collision term is `(p ** 2).sum(dim=-1)`. Stay in torch (no `.item()`,
# no numpy), so that the gradient reaches the logits.
#
# </details>

# %%
def exact_brier1(logits, y):
    """logits (N, V), y (N,) -> (N,): 2 P(y) - sum_x P(x)^2 with P = softmax(logits)."""
    # BEGIN SOLUTION
    p = torch.softmax(logits.float(), dim=-1)
    return 2 * p[torch.arange(len(y)), y] - (p ** 2).sum(dim=-1)
    # END SOLUTION
    # STUB raise NotImplementedError("exercise 2.2: probabilities first; then one value of P(y) and one collision sum per row")

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
# paper: $n = 4$) and return a Python `float` (not a tensor, not an int).

# %% [markdown]
# <details><summary>Hint 2 (open it if you are stuck)</summary>
#
# `max(b, 0.0)` clamps one number. The geometric mean of $n$ numbers is their product (`math.prod`) to the power
# $1/n$; times 100. Plain Python arithmetic on floats gives a `float` (also when a factor is 0); if you compute
# with torch, end with `.item()`.
#
# </details>

# %%
import math


def brierlm(briers):
    """100 x the geometric mean of the Brier-n in the list, each clamped at 0 first."""
    # BEGIN SOLUTION
    clamped = [max(float(b), 0.0) for b in briers]
    return 100.0 * math.prod(clamped) ** (1.0 / len(clamped))
    # END SOLUTION
    # STUB raise NotImplementedError("exercise 2.3: clamp each factor, then a geometric mean; the answer is a Python float")

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
# ## Questions
#
# Answer in a few sentences each, in the cell under the question.
#
# **Q1.** What does the Brier score measure that accuracy does not? Take the true next-token distribution $Q$ and a
# model $P$: which $P$ maximises the expected accuracy of a sample, and which the expected Brier score?

# %% [answer]
# The expected accuracy of a sample is $\sum_x Q(x) P(x)$, which is largest when $P$ puts all its mass on the most
# likely token: it rewards collapsing onto the mode (so does top-1 accuracy, which ignores the probabilities
# altogether). The expected Brier score is $\sum_x Q(x)\,(2P(x)) - \sum_x P(x)^2 = \sum_x Q(x)^2 - \sum_x (P(x) -
# Q(x))^2$, largest only at $P = Q$: it is a strictly proper scoring rule, rewarding calibration (the whole
# distribution) as well as accuracy. The "See it work" cell and `tutorials/brierlm.ipynb` show it: sharpening a
# model to $T = 0.25$ raised its sample accuracy from 0.26 to 0.38 while its Brier-1 fell from 0.265 to 0.026.

# %% [markdown]
# **Q2.** Why must the two samples $x_1, x_2$ be independent draws from the model? What does the estimator's mean
# become if $x_2$ is a copy of $x_1$ (for example, the same random seed for both)? And why is one sample not enough?

# %% [answer]
# The collision term needs $\mathbb E\,\mathbb 1\{x_1 = x_2\} = \sum_x P(x)^2$, the probability that two
# *independent* draws coincide. If $x_2 = x_1$, then $\mathbb 1\{x_1 = x_2\} = 1$ always and the estimate is
# $2\cdot\mathbb 1\{x_1 = y\} - 1$, whose mean is $2P(y) - 1$ instead of $2P(y) - \sum P^2$: biased low, by
# $1 - \sum P^2$ (any positive correlation biases it the same way, less). One sample estimates $P(y)$, the accuracy
# term, but nothing in one draw tells how concentrated $P$ is; the collision of two draws is what estimates
# $\sum P^2$ without knowing any probability, which is why BrierLM works for CALM, which can only sample.

# %% [markdown]
# **Q3.** Why does BrierLM combine Brier-1 to Brier-4 in a geometric mean instead of reporting Brier-1, and why does
# it need the clamp at 0? What does a small model score, and what should you read instead?

# %% [answer]
# Brier-n scores the whole n-token continuation, so BrierLM rewards models whose multi-token samples are right
# together (coherence beyond the next token, and the chunks CALM generates at once), and the geometric mean is high
# only when every Brier-n is. A mean Brier-n can be negative (the two samples agree with each other more often than
# with the reference: confident and wrong, or just noise on rare 4-grams), and a root of a negative product is
# meaningless, so each factor is clamped at 0 (this repository) or the product is (the authors' code, which lets two
# negative factors give a positive score). A small model almost never gets 3 or 4 tokens right together: its
# Brier-3 and Brier-4 are about 0, so its BrierLM is 0 however good its Brier-1 is (this repository's CPU models
# score 0 at 64 positions). Read Brier-1..4 separately for such models; the BrierLM-vs-cross-entropy figure is flat
# at 0 for the weak checkpoints.

# %% [markdown]
# ## Summary

# %%
checks.summary()
