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
# The $N \times N$ matrix of cosines is not needed. With unit vectors $u_i = h_i / \lVert h_i\rVert$ and their sum
# $S = \sum_i u_i$: $\lVert S\rVert^2 = \sum_{i,j} u_i\cdot u_j = N + \sum_{i\ne j}\cos(h_i, h_j)$, so
#
# $$D = 1 - \frac{\lVert S\rVert^2 - N}{N(N-1)} \qquad (O(N d)\text{ time and memory}).$$
#
# `h` is `(..., N, d)`: every leading index is a separate set; return `(...)`. It must stay differentiable (the loss
# of 5.2 backpropagates through it). The check also watches the tensors your function creates: one with $N^2$
# entries is the pairwise matrix, and fails. (Zero vectors have no direction; the checks never pass one.)

# %%
def dispersion(h):
    """Mean pairwise cosine distance of the N vectors of each set: h (..., N, d) -> (...)."""
    # BEGIN SOLUTION
    N = h.size(-2)
    unit = h / torch.linalg.vector_norm(h, dim=-1, keepdim=True)    # (..., N, d)
    total = unit.sum(dim=-2)                                        # (..., d): S
    return 1 - ((total * total).sum(-1) - N) / (N * (N - 1))
    # END SOLUTION
    # STUB raise NotImplementedError("exercise 5.1: normalise each vector (divide by its norm over the last dim), sum them over dim -2, then D = 1 - (|S|^2 - N) / (N (N - 1))")

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

# %%
def dispersion_loss(logits, y, h, weight):
    """Cross-entropy (targets -1 ignored) minus weight * the dispersion of all B*T vectors of h as one set."""
    # BEGIN SOLUTION
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-1)
    one_set = h.reshape(-1, h.size(-1))                                  # (B*T, d)
    return ce - weight * dispersion(one_set)
    # END SOLUTION
    # STUB raise NotImplementedError("exercise 5.2: F.cross_entropy(logits flattened to (B T, V), y flattened, ignore_index=-1) - weight * dispersion(h reshaped to (B T, d))")

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
# ## Summary

# %%
checks.summary()
