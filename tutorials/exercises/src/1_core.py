# %% [markdown]
# # Exercises 1: the GPT core, rotary positions and the KV cache
#
# Every model in this repository runs on the small GPT of `gpt.py`. Two of its pieces are worth writing yourself:
# **rotary position embeddings** (RoPE), which tell attention where each token is, and the **KV cache**, which makes
# generation cost one new position per token instead of the whole sequence.
#
# How the exercises work: each one states the equation, gives you a function whose body is
# `raise NotImplementedError(...)` (the message is a first, short hint; a fuller **Hint 2** is folded under the
# statement, open it when you are stuck), and follows it with a **check cell**. The check runs your function and
# the repository's on random inputs and edge cases and prints one line: `PASS ...`, or `FAIL ...` followed by what
# differs (the shape, the dtype, a value, a gradient, or how it was computed) and in which case. A check never
# stops the notebook, so *Run all* works at any time. Each notebook ends with questions to answer in words.
# Read `gpt.py` (under 300 lines) beside this notebook.
#
# Everything runs on a laptop CPU in seconds.

# %% setup

# %% [markdown]
# ## 1.1 The rotation angles
#
# RoPE (Su et al. 2021, *RoFormer*, sec. 3.2 and the efficient form of sec. 3.4.2) splits each head's vector of
# even size $d$ into $d/2$ pairs and turns pair $i$ at position $t$ by the angle
#
# $$\phi_{t,i} = t\,\theta_i, \qquad \theta_i = \text{base}^{-2i/d}, \qquad i = 0, \dots, d/2 - 1,\quad \text{base} = 10000 .$$
#
# Low $i$ turn fast (they resolve nearby positions), high $i$ turn slowly (they reach far).
# Write `rope_tables` returning the two tables $\cos\phi$ and $\sin\phi$, each of shape `(max_len, head_dim // 2)`
# and dtype **float32** (the dtype the model keeps them in).

# %% [markdown]
# <details><summary>Hint 2 (open it if you are stuck)</summary>
#
# `torch.arange(0, head_dim, 2, dtype=torch.float32)` gives the values $2i$, so $\theta$ is
# `base ** (-that / head_dim)`. The angles are every position times every $\theta$: the outer product
# `t[:, None] * theta[None, :]` (or `torch.outer(t, theta)`) with `t = torch.arange(max_len, dtype=torch.float32)`,
# shape `(max_len, head_dim // 2)`. Then `cos` and `sin` of it. Building the ranges in float64 (or with numpy)
# gives float64 tables, which the check rejects.
#
# </details>

# %%
def rope_tables(head_dim, max_len, base=10000.0):
    """cos and sin of t * theta_i for t = 0..max_len-1, i = 0..head_dim/2-1: two (max_len, head_dim // 2) tensors."""
    # BEGIN SOLUTION
    theta = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (d/2,) = base^(-2i/d)
    phi = torch.arange(max_len, dtype=torch.float32)[:, None] * theta[None, :]        # (T, d/2)
    return torch.cos(phi), torch.sin(phi)
    # END SOLUTION
    # STUB raise NotImplementedError("exercise 1.1: first the d/2 frequencies theta_i, then one angle per (position, frequency) pair")

# %%
checks.rope_tables(rope_tables)

# %% [markdown]
# ## 1.2 Rotating queries and keys
#
# With $x$ of shape `(B, n_head, T, d)`, pair $i$ is $(x_i, x_{i + d/2})$: the first half of the vector against the
# second half (the GPT-NeoX layout; the paper pairs neighbours $(x_{2i}, x_{2i+1})$, which is the same rotation up to
# a fixed reordering of the dimensions). At position $t$:
#
# $$\begin{pmatrix} x'_i \\ x'_{i+d/2} \end{pmatrix} = \begin{pmatrix} \cos\phi_{t,i} & -\sin\phi_{t,i} \\ \sin\phi_{t,i} & \cos\phi_{t,i} \end{pmatrix} \begin{pmatrix} x_i \\ x_{i+d/2} \end{pmatrix}.$$
#
# Why it works: a rotation by $\phi_m$ of the query and by $\phi_n$ of the key leaves their dot product depending
# on $\phi_m - \phi_n$ only, i.e. on the **relative** position $m - n$ (the check tests exactly that).
# Keep the output in `x`'s dtype (the tables are float32; a bfloat16 `x` must stay bfloat16).

# %% [markdown]
# <details><summary>Hint 2 (open it if you are stuck)</summary>
#
# The halves are `x[..., :d // 2]` ($x_1$) and `x[..., d // 2:]` ($x_2$). The matrix above gives the new first half
# $x_1\cos\phi - x_2\sin\phi$ and the new second half $x_1\sin\phi + x_2\cos\phi$; `torch.cat(..., dim=-1)` joins
# them. The tables `(T, d/2)` broadcast against `(B, nh, T, d/2)` as they are. Cast them with `.to(x.dtype)` first:
# float32 tables times a bfloat16 `x` would give a float32 result.
#
# </details>

# %%
def apply_rope(x, cos, sin):
    """x (B, nh, T, d) rotated pair by pair; cos, sin (T, d/2) from rope_tables. Same shape and dtype as x."""
    # BEGIN SOLUTION
    half = x.size(-1) // 2
    first, second = x[..., :half], x[..., half:]
    c, s = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([first * c - second * s, first * s + second * c], dim=-1)
    # END SOLUTION
    # STUB raise NotImplementedError("exercise 1.2: pair i is (x_i, x_{i+d/2}): work on the two halves of the last dimension")

# %%
checks.apply_rope(apply_rope)

# %% [markdown]
# ## 1.3 Attention for new tokens after cached ones
#
# Scaled dot-product attention (Vaswani et al. 2017, eq. 1): $\mathrm{softmax}(QK^\top/\sqrt{d})\,V$, with the causal
# rule that a query never sees a later key. With a cache, the keys and values of the first $T_k - T$ positions were
# computed earlier, and only $T$ new queries arrive. New query $j$ ($j = 0..T-1$) is at position $T_k - T + j$, so it
# may attend to keys $0, \dots, T_k - T + j$: the mask is **not** the square lower triangle unless $T = T_k$.
#
# Write it yourself: build the mask, fill the masked scores with $-\infty$, softmax. The check fails a function that
# calls `F.scaled_dot_product_attention` (or another fused attention kernel), however it is imported.

# %% [markdown]
# <details><summary>Hint 2 (open it if you are stuck)</summary>
#
# `scores = q @ k.transpose(-2, -1) / d ** 0.5` has shape `(B, nh, T, Tk)`. The queries' absolute positions are
# `torch.arange(Tk - T, Tk)` (as a column), the keys' `torch.arange(Tk)` (as a row); comparing them gives the `(T, Tk)`
# boolean table of the keys each query must not see (key position > query position). `scores.masked_fill(that,
# float('-inf'))`, `.softmax(dim=-1)`, then `@ v`. (`torch.ones(T, Tk, dtype=torch.bool).tril(diagonal=Tk - T)` is
# the table of the visible keys in one call.)
#
# </details>

# %%
def cached_attention(q, k, v):
    """q (B, nh, T, d) for the last T of Tk positions; k, v (B, nh, Tk, d). Returns (B, nh, T, d)."""
    # BEGIN SOLUTION
    T, Tk = q.size(-2), k.size(-2)
    scores = q @ k.transpose(-2, -1) / q.size(-1) ** 0.5                              # (B, nh, T, Tk)
    query_pos = torch.arange(Tk - T, Tk)[:, None]                                      # (T, 1) absolute positions
    scores = scores.masked_fill(torch.arange(Tk)[None, :] > query_pos, float("-inf"))  # no peeking ahead
    return scores.softmax(dim=-1) @ v
    # END SOLUTION
    # STUB raise NotImplementedError("exercise 1.3: new query j sits at position Tk - T + j; it may see every key up to that position")

# %%
checks.cached_attention(cached_attention)

# %% [markdown]
# ## 1.4 Greedy generation with the KV cache
#
# The cache changes nothing in the maths of attention (Vaswani et al. 2017, eq. 1, as in 1.3), only what is
# recomputed. Without a cache, generating $n$ tokens feeds the whole growing sequence $n$ times. With one, the prompt is fed
# once; then each step feeds **only the newest token**, whose keys and values join the cache, and its query attends
# over everything cached (exercise 1.3). The positions keep counting from the length of the cache, so RoPE turns the
# new token by the right angle.
#
# Use `ref.new_cache(model)` for an empty cache and `ref.logits_with_cache(model, tokens, cache)`, which runs the
# model on `tokens` (B, T) placed after the `len(cache)` cached positions, returns their logits (B, T, V) and
# extends the cache. Greedy: the next token is the argmax of the last position's logits. Assume the prompt plus the
# new tokens fit in the model's window. The check compares your tokens with `GPT.generate(temperature=0)` and
# counts the positions you feed.

# %% [markdown]
# <details><summary>Hint 2 (open it if you are stuck)</summary>
#
# Make the cache once, before the loop, and keep a variable with the tokens to feed next: the whole prompt at
# first. Each of the `max_new_tokens` steps calls `ref.logits_with_cache` on those tokens; the argmax over the
# vocabulary of the last position's logits (with `keepdim=True`, shape `(B, 1)`) is the new token. Append it to the
# sequence with `torch.cat(..., dim=1)`, and it alone is what the next step feeds. With 0 new tokens the loop does
# not run and the prompt comes back unchanged.
#
# </details>

# %%
@torch.no_grad()
def generate_cached(model, idx, max_new_tokens):
    """Append max_new_tokens greedy tokens to idx (B, T) using a KV cache; return (B, T + max_new_tokens)."""
    # BEGIN SOLUTION
    cache, feed = ref.new_cache(model), idx
    for _ in range(max_new_tokens):
        logits = ref.logits_with_cache(model, feed, cache)                   # (B, len(feed), V)
        feed = logits[:, -1].argmax(dim=-1, keepdim=True)                    # (B, 1): the only input of the next step
        idx = torch.cat([idx, feed], dim=1)
    return idx
    # END SOLUTION
    # STUB raise NotImplementedError("exercise 1.4: one cache for the whole loop; after the prompt, each step feeds only the token it just chose")

# %%
checks.generate_cached(generate_cached)

# %% [markdown]
# ## Questions
#
# Answer in a few sentences each, in the cell under the question.
#
# **Q1.** RoPE turns the query at position $m$ and the key at position $n$ by angles that depend on their absolute
# positions. Why does their dot product depend only on $m - n$, and why does this let the KV cache store each key
# once, already rotated?

# %% [answer]
# A rotation $R(\phi)$ is orthogonal, $R(\phi)^\top = R(-\phi)$, and rotations of one plane add up:
# $R(a)^\top R(b) = R(b - a)$. Pair by pair, $(R(m\theta_i)q)\cdot(R(n\theta_i)k) = q^\top R((n - m)\theta_i)\,k$, so
# the score depends on the positions only through $n - m$ (the check of 1.2 compares (3, 1) with (20, 18)). A key's
# rotation depends on nothing but its own position, which never changes once the token is in the sequence: it can
# be rotated once, when it is computed, and cached as it is. What the cache needs in return is that each new token
# is rotated by its true absolute position, counted from the length of the cache.

# %% [markdown]
# **Q2.** Generating $n$ tokens after a prompt of $T$ tokens: how much work does the model do per step without a
# KV cache and with one, and what does the cache cost in memory?

# %% [answer]
# Without a cache, step $s$ runs the whole sequence of $T + s$ positions through every layer: $O(T + s)$ positions
# of projections and MLPs and $O((T + s)^2)$ attention scores, so $O(n(T + n))$ positions and $O(n(T + n)^2)$
# scores in all. With the cache, the prompt runs once and each step runs one position: its projections and MLP
# are $O(1)$ positions and its attention reads the $T + s$ cached keys, $O(T + s)$, so $O(n(T + n))$ scores in all.
# The price is memory: a key and a value vector of size `n_embd` per layer and per position, $2 \times$ n_layer
# $\times (T + n) \times$ n_embd numbers per sequence, growing with the length. Exercise 1.4's check counts the
# positions fed: at most $T + n$.

# %% [markdown]
# **Q3.** In exercise 1.3, why is the mask not the square lower triangle when $T < T_k$? What would attention with
# the usual causal mask (`tril` of a $T \times T_k$ matrix, or `is_causal=True` of
# `F.scaled_dot_product_attention`) compute for a single new token after 8 cached ones?

# %% [answer]
# The $T$ new queries are the last $T$ of $T_k$ positions: query $j$ sits at position $T_k - T + j$ and may see keys
# $0, \dots, T_k - T + j$, a triangle aligned to the bottom-right corner of the $T \times T_k$ score matrix.
# `torch.ones(T, Tk).tril()` (and `is_causal=True`, which builds that) aligns the triangle to the top-left: query
# $j$ would see only keys $0..j$. For one new token ($T = 1$, $T_k = 9$) it would attend to key 0 alone, i.e. to the
# first token of the prompt instead of all nine, and the cached generation would differ from the uncached one.
# Only when $T = T_k$ (no cache) do the two alignments coincide. That is why `gpt.py` passes `is_causal` only when
# $T = T_k$, uses no mask for a single new token (it may see every key), and otherwise builds
# `tril(diagonal=Tk - T)`.

# %% [markdown]
# ## Summary

# %%
checks.summary()
