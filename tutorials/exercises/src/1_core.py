# %% [markdown]
# # Exercises 1: the GPT core, rotary positions and the KV cache
#
# Every model in this repository runs on the small GPT of `gpt.py`. Two of its pieces are worth writing yourself:
# **rotary position embeddings** (RoPE), which tell attention where each token is, and the **KV cache**, which makes
# generation cost one new position per token instead of the whole sequence.
#
# How the exercises work: each one states the equation, gives you a function whose body is
# `raise NotImplementedError(...)` (the message is a hint), and follows it with a **check cell**. The check runs
# your function and the repository's on random inputs and edge cases and prints one line: `PASS ...`, or
# `FAIL ...` followed by what differs (the shape, the dtype, a value, a gradient) and in which case. A check never
# stops the notebook, so *Run all* works at any time. Read `gpt.py` (under 250 lines) beside this notebook.
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
# Write `rope_tables` returning the two tables $\cos\phi$ and $\sin\phi$, each of shape `(max_len, head_dim // 2)`.

# %%
def rope_tables(head_dim, max_len, base=10000.0):
    """cos and sin of t * theta_i for t = 0..max_len-1, i = 0..head_dim/2-1: two (max_len, head_dim // 2) tensors."""
    # BEGIN SOLUTION
    theta = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (d/2,) = base^(-2i/d)
    phi = torch.arange(max_len, dtype=torch.float32)[:, None] * theta[None, :]        # (T, d/2)
    return torch.cos(phi), torch.sin(phi)
    # END SOLUTION
    # STUB raise NotImplementedError("exercise 1.1: theta = base ** (-2 i / head_dim) for i = 0..head_dim/2-1; the angles are the outer product of positions and theta")

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

# %%
def apply_rope(x, cos, sin):
    """x (B, nh, T, d) rotated pair by pair; cos, sin (T, d/2) from rope_tables. Same shape and dtype as x."""
    # BEGIN SOLUTION
    half = x.size(-1) // 2
    first, second = x[..., :half], x[..., half:]
    c, s = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([first * c - second * s, first * s + second * c], dim=-1)
    # END SOLUTION
    # STUB raise NotImplementedError("exercise 1.2: split x into halves x1 = x[..., :d/2], x2 = x[..., d/2:]; return cat(x1 cos - x2 sin, x1 sin + x2 cos) in x's dtype")

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
# Write it without `F.scaled_dot_product_attention` (build the mask, fill the masked scores with $-\infty$, softmax).

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
    # STUB raise NotImplementedError("exercise 1.3: scores = q k^T / sqrt(d) (T, Tk); query j may see key i when i <= Tk - T + j; mask the rest with -inf, softmax, multiply by v")

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
    # STUB raise NotImplementedError("exercise 1.4: cache = ref.new_cache(model); feed the prompt once, then only the token you just chose; next token = logits[:, -1].argmax(-1)")

# %%
checks.generate_cached(generate_cached)

# %% [markdown]
# ## Summary

# %%
checks.summary()
