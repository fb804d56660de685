# %% [markdown]
# # Exercises 5: representation dispersion
#
# *Li, Li, Livescu & Zhou 2025, "On the Predictive Power of Representation Dispersion in Language Models" (arXiv
# 2506.24106); code: `dispersion.py`, whose docstring tags the equations (D) and (L); tutorial:
# `tutorials/dispersion.ipynb`.*
#
# The paper finds that a model whose hidden states of a text are more **spread out** (larger mean pairwise cosine
# distance) predicts that text better, and that pushing them apart during training can help. You will write the
# dispersion in $O(N d)$ instead of $O(N^2 d)$, and the training loss that uses it.
#
# Each check prints `PASS ...`, or `FAIL ...` with what differs; *Run all* always goes through.

# %% setup

# %% [markdown]
# ## 5.1 Dispersion in O(N d)
#
# The dispersion of vectors $h_1..h_N$ (eq. D) is their mean pairwise cosine distance
#
# $$D = \frac{1}{N(N-1)}\sum_{i \ne j}\big(1 - \cos(h_i, h_j)\big).$$
#
# Computed as written, through the $N \times N$ matrix of cosines, it costs $O(N^2 d)$ time and $O(N^2)$ memory:
# too much for the $B \cdot T$ hidden states of a batch (5.2). Write it in **$O(N d)$ time and memory**, without any
# pairwise quantity (with unit vectors $u_i = h_i / \lVert h_i\rVert$, $\cos(h_i, h_j) = u_i \cdot u_j$; the stub's
# message is a first hint).
#
# `h` is `(..., N, d)`: every leading index is a separate set; return `(...)`, in `h`'s dtype. It must stay
# differentiable (the loss of 5.2 backpropagates through it). The check also counts what your function computes
# (the entries every tensor operation reads and writes, and how many are alive at once) on $N = 256$ and
# $N = 2048$ vectors: a pairwise matrix, `torch.pdist`/`torch.cdist`, or a loop over rows or chunks of rows grows like
# $N^2$ and fails. (Zero vectors have no direction; the checks never pass one.)

# %% [markdown]
# <details><summary>Hint 2 (open it if you are stuck)</summary>
#
# Take $S = \sum_i u_i$. Then $\lVert S\rVert^2 = \sum_{i,j} u_i\cdot u_j = N + \sum_{i\ne j}\cos(h_i, h_j)$ (the $N$
# terms with $i = j$ are $u_i\cdot u_i = 1$), so
#
# $$D = 1 - \frac{\lVert S\rVert^2 - N}{N(N-1)}.$$
#
# In torch: `u = h / h.norm(dim=-1, keepdim=True)`, `S = u.sum(dim=-2)` (shape `(..., d)`), and `(S * S).sum(-1)`.
# Every step works on the last two dimensions, so a batch of sets `(..., N, d)` needs nothing more.
#
# </details>

# %%
def dispersion(h):
    """Mean pairwise cosine distance of the N vectors of each set: h (..., N, d) -> (...)."""
    # BEGIN SOLUTION
    N = h.size(-2)
    unit = h / torch.linalg.vector_norm(h, dim=-1, keepdim=True)    # (..., N, d)
    total = unit.sum(dim=-2)                                        # (..., d): S
    return 1 - ((total * total).sum(-1) - N) / (N * (N - 1))
    # END SOLUTION
    # STUB raise NotImplementedError("exercise 5.1: expand the squared norm of the sum of the unit vectors")

# %%
checks.dispersion(dispersion)

# %% [markdown]
# ## 5.2 The dispersion loss
#
# Training with dispersion (eq. L): the usual next-token cross-entropy plus $\lambda$ times an auxiliary term that
# rewards spread, $L_{aux} = -D$:
#
# $$L = L_{CE} + \lambda\,L_{aux} = L_{CE} - \lambda\,D(\{h_{b,t}\}).$$
#
# Here the set is **all $B \cdot T$ final-layer hidden states of the batch together** (one set, the note's reading;
# `dispersion.py`'s default `--dispersion_scope batch`), not one set per sequence. Targets equal to $-1$ are padding:
# the cross-entropy ignores them (`ignore_index=-1`). With $\lambda = 0$ this is exactly next-token prediction.
#
# Shapes: `logits` `(B, T, V)`, `y` `(B, T)`, `h` `(B, T, d)`; return a scalar. You may call your `dispersion`.
# The check runs a small GPT and compares your loss and every parameter's gradient with `dispersion.dispersion_loss`.

# %% [markdown]
# <details><summary>Hint 2 (open it if you are stuck)</summary>
#
# `torch.nn.functional.cross_entropy` wants `(rows, V)` logits and `(rows,)` targets: `logits.reshape(-1, V)`,
# `y.reshape(-1)`, and `ignore_index=-1`. The set is `h.reshape(-1, d)`: $B \cdot T$ vectors, one set, so
# `dispersion` of it is a scalar. Subtract `weight` times it from the cross-entropy.
#
# </details>

# %%
def dispersion_loss(logits, y, h, weight):
    """Cross-entropy (targets -1 ignored) minus weight * the dispersion of all B*T vectors of h as one set."""
    # BEGIN SOLUTION
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-1)
    one_set = h.reshape(-1, h.size(-1))                                  # (B*T, d)
    return ce - weight * dispersion(one_set)
    # END SOLUTION
    # STUB raise NotImplementedError("exercise 5.2: one cross-entropy over every position (skipping -1 targets), minus weight times the dispersion of one set")

# %%
checks.dispersion_loss(dispersion_loss)

# %% [markdown]
# ## See it work: what the loss does to a set of vectors
#
# A few steps of Adam on $-D$ alone, starting from 64 vectors that all point roughly the same way (the
# "collapsed" representations of an untrained or badly trained model). Once 5.1 passes, the dispersion rises toward
# its maximum $N/(N-1)$, reached when the unit vectors sum to zero.

# %%
torch.manual_seed(0)
h = (torch.randn(64, 16) * 0.1 + torch.ones(16)).requires_grad_()
opt = torch.optim.Adam([h], lr=0.05)
try:
    for step in range(61):
        loss = -dispersion(h)
        if step % 20 == 0:
            print(f"step {step:2d}: dispersion {-loss.item():.3f} (maximum {64 / 63:.3f})")
        opt.zero_grad()
        loss.backward()
        opt.step()
except NotImplementedError:
    print("write exercise 5.1 first")

# %% [markdown]
# ## Questions
#
# Answer in a few sentences each, in the cell under the question.
#
# **Q1.** What values can $D$ take? Which arrangements of the vectors give $D = 0$, $D = 1$ and the largest value,
# and what does $D$ ignore about the vectors?

# %% [answer]
# From $D = 1 - (\lVert S\rVert^2 - N)/(N(N-1))$ with $0 \le \lVert S\rVert^2 \le N^2$: $D$ lies in $[0, N/(N-1)]$.
# $D = 0$ when every vector points the same way ($\lVert S\rVert^2 = N^2$, every cosine 1); $D = 1$ when the cosines
# average to 0, e.g. orthogonal vectors (possible for $N \le d$); the maximum $N/(N-1)$ when the unit vectors sum to
# zero ($S = 0$, e.g. antipodal pairs), where the average cosine is $-1/(N-1)$: with many vectors the average cosine
# cannot go below about 0, so $D$ cannot go much above 1. $D$ sees only directions: it ignores the vectors' lengths
# (scaling any vector leaves it unchanged, as the check's case "scaled by 7.5" tests), and it needs no labels.

# %% [markdown]
# **Q2.** Minimising $L_{aux} = -D$: by the formula of 5.1, which direction does its gradient push each unit vector
# $u_i$, and when does the push stop?

# %% [answer]
# $\partial D/\partial u_i = -2S/(N(N-1))$, the same for every $i$, so a gradient step on $-D$ moves every unit vector
# in the direction $-S$: away from the mean direction of the set. Through $u_i = h_i/\lVert h_i\rVert$ only the part of
# that push orthogonal to $h_i$ reaches $h_i$ (its length does not matter to $D$), scaled by $1/\lVert h_i\rVert$, so
# long vectors move less. The push stops when $S = 0$, the maximum $N/(N-1)$: the "See it work" cell climbs from a
# collapsed set to $64/63$. In a language model this competes with the cross-entropy, which wants the states of
# tokens with similar continuations close together: $\lambda$ has to be small (the paper: 0.001 to 0.1); at
# $\lambda = 1$ (cross-domain loss) this repository's perplexity rose by about 25%.

# %% [markdown]
# **Q3.** The paper finds that models whose representations of a text are more dispersed have lower perplexity on
# it. Does that mean that training with the dispersion loss lowers perplexity? What did the paper and this
# repository measure?

# %% [answer]
# No: the finding is a correlation across models, checkpoints and text sets, and pushing one quantity that goes with
# good models does not by itself make a model good (the dispersion can be raised in directions that do not help
# prediction). It has to be tested by training, which both did. The paper: a small gain on one domain (GPT-2 small,
# perplexity 166.2 to 165.6 at $\lambda = 0.1$) and a large one across domains (304.4 to 255.2 at $\lambda = 0.01$, only
# between-domain pairs pushed apart). This repository (byte-level 4 x 128 models, 3 seeds): on Shakespeare alone every
# change is inside the noise (-0.030 ± 0.024 at $\lambda = 0.01$); across Shakespeare and Python the Python perplexity
# falls by 1.4% to 2.3%, one to two standard errors, far from the paper's 16%; the plain batch loss does as well as
# the cross-domain one; and $\lambda = 1$ costs about 25% and collapses the within-domain dispersion (0.78 to 0.14).
# The layer-wise correlation is also weaker evidence than it looks here: it is present at initialisation, and absent
# on held-out chunks.

# %% [markdown]
# ## Summary

# %%
checks.summary()
