# %% [markdown]
# # Exercises 3: multi-token prediction
#
# *Gloeckle et al. 2024, "Better & Faster Large Language Models via Multi-token Prediction" (arXiv 2404.19737);
# code: `mtp.py`, whose docstring maps the paper's sections to functions; tutorial: `tutorials/mtp.ipynb`.*
#
# A shared trunk $f_s$ reads the context; $n$ heads $f_{h_1}, \dots, f_{h_n}$ (one Transformer block each) share the
# unembedding $f_u$, and head $i$ predicts the token $i$ steps ahead:
# $P(x_{t+i} \mid x_{\le t}) = \mathrm{softmax}(f_u(f_{h_i}(f_s(x_{\le t}))))$. The loss sums the heads' cross-entropies,
# $L_n = -\sum_t \sum_{i=1}^n \log P(x_{t+i} \mid x_{\le t})$ (sec. 2). You will write the two pieces that make it
# cheap: the **head-by-head backward** that keeps training memory at one head's logits, and the **verify step** of
# self-speculative decoding that makes generation faster at no cost in quality.
#
# Each check prints `PASS ...`, or `FAIL ...` with what differs; *Run all* always goes through.

# %% setup

# %% [markdown]
# ## 3.1 Memory-efficient training: one head's logits at a time
#
# The naive way computes all $n$ heads' logits, sums the losses and calls `backward()` once: $n$ tensors of shape
# `(B, T, V)` are alive together, $O(nV)$ memory per token. The paper's trick (sec. 2, fig. 2):
#
# 1. run the trunk once: $z = f_s(x)$;
# 2. cut the graph there: the heads run on a new leaf tensor that holds $z$'s values and requires a gradient, so
#    their backward stops at it and leaves $\partial L_i / \partial z$ in its `.grad`;
# 3. for each head $i$: logits, loss $L_i$, backward of $L_i$. The gradients accumulate (in that leaf's `.grad`, and
#    in the parameters of head $i$ and of the shared unembedding), and head $i$'s logits are freed before head
#    $i + 1$ runs;
# 4. run the trunk's backward once, from $z$, with the summed gradient.
#
# The gradients are exactly those of $L_n = \sum_i L_i$; the peak memory is $O(V + d)$ per token.
#
# Use `ref.n_heads(model)`, `ref.trunk_hidden(model, x)` (the trunk's output, `(B, T, d)`),
# `ref.head_logits(model, i, z)` (head `i = 0..n-1`, 0 being the next-token head) and `ref.head_loss(logits, y, i)`
# (head i's cross-entropy against the targets shifted by i). Return the total loss as a Python `float`. The check
# compares every parameter's gradient with `mtp.mtp_forward_backward`, counts trunk forwards and trunk backwards
# (one each), and watches every tensor your code creates: when a head computes its logits, the logits (or
# logits-sized tensors) of at most one earlier head may still be alive.

# %% [markdown]
# <details><summary>Hint 2 (open it if you are stuck)</summary>
#
# Keep the trunk's output (it holds the trunk's graph). `.detach()` gives a tensor with its values and no history,
# and `.requires_grad_()` turns that into a leaf that collects a gradient: the cut. For each head: its logits from
# the leaf, its loss, `.backward()` on the loss (which frees that head's graph), and the loss's `.item()` added to a
# Python float. After the loop, call `.backward(...)` on the trunk's output itself, passing the leaf's accumulated
# `.grad`: a non-scalar tensor's backward starts from the gradient you give it. Do not collect the heads' logits or
# losses in a list before their backward: that is the naive $O(nV)$ memory again.
#
# </details>

# %%
def head_by_head_backward(model, x, y):
    """Accumulate the gradients of L_n = sum_i L_i into model's parameters, head by head; return L_n (a float)."""
    # BEGIN SOLUTION
    z = ref.trunk_hidden(model, x)                  # (B, T, d), the trunk's graph kept
    z_leaf = z.detach().requires_grad_()            # the heads stop here
    total = 0.0
    for i in range(ref.n_heads(model)):
        loss = ref.head_loss(ref.head_logits(model, i, z_leaf), y, i)
        loss.backward()                             # head i's graph (and logits) is freed now
        total += loss.item()
    z.backward(z_leaf.grad)                         # the trunk, once, with sum_i dL_i/dz
    return total
    # END SOLUTION
    # STUB raise NotImplementedError("exercise 3.1: cut the graph between the trunk and the heads, so that each head's backward stops there")

# %%
checks.head_by_head_backward(head_by_head_backward)

# %% [markdown]
# ## 3.2 The verify step of self-speculative decoding
#
# Generation (sec. 3.2, blockwise parallel decoding of Stern et al. 2018): heads $2..n$ **draft** the tokens after
# the next one. Every index below is **0-based**, as in Python. The $m - 1$ drafts are `drafts[0]`, ...,
# `drafts[m-2]`. One forward runs the model on the $m$ positions [last token, `drafts[0]`, ..., `drafts[m-2]`] and
# gives head 1's greedy choice after every one of them: `greedy[0]` after the last token, and `greedy[j]` after
# `drafts[j-1]` for $j = 1..m-1$. So `drafts[j]` and `greedy[j]` are two guesses for the same position: the draft is
# right when it equals `greedy[j]`, head 1's own choice there.
#
# **Verify:** accept `drafts[0]`, `drafts[1]`, ... from the left while each equals the `greedy` entry of the same
# index; at the first disagreement (or after the last draft) append head 1's own token, which that forward computed
# for free. With $k$ the number of accepted drafts ($0 \le k \le m - 1$), the tokens to commit are the accepted
# drafts followed by `greedy[k]`: $k + 1$ tokens, returned as a **list** of Python ints.
#
# Every forward therefore commits between 1 and $m$ tokens, and the output is exactly what plain greedy decoding
# with head 1 would give. The check runs a full speculative decoder built around your function and compares it with
# greedy decoding and with `mtp.speculative_generate`, token for token and forward for forward.

# %% [markdown]
# <details><summary>Hint 2 (open it if you are stuck)</summary>
#
# Count $k$: start at 0 and increase it while `k < len(drafts)` and `drafts[k] == greedy[k]`. A later draft that
# happens to match after a rejection does not count: it was drafted after a wrong token. Then return
# `drafts[:k] + [greedy[k]]`; `greedy` is one longer than `drafts`, so `greedy[k]` exists even when every draft is
# accepted.
#
# </details>

# %%
def verify_greedy(drafts, greedy):
    """drafts: the m-1 proposed tokens (list); greedy: head 1's m greedy tokens, greedy[j] after position j of
    [last token, drafts[0], ..., drafts[m-2]]. Returns the list of tokens to commit: the accepted drafts, then
    greedy[k]."""
    # BEGIN SOLUTION
    accepted = []
    for proposal, choice in zip(drafts, greedy):
        if proposal != choice:
            break
        accepted.append(proposal)
    return accepted + [greedy[len(accepted)]]
    # END SOLUTION
    # STUB raise NotImplementedError("exercise 3.2: drafts[j] and greedy[j] guess the same position; stop at the first disagreement")

# %%
checks.verify_greedy(verify_greedy)

# %% [markdown]
# ## Questions
#
# Answer in a few sentences each, in the cell under the question.
#
# **Q1.** Why does the head-by-head backward of 3.1 give exactly the gradients of the naive backward of $L_n$, and
# what does it save: memory, compute, or both?

# %% [answer]
# $L_n = \sum_i L_i$ and gradients are linear, so every parameter's gradient is the sum of the heads' gradients. A
# head's (and the unembedding's) parameters get theirs from the heads' backward passes, which add into `.grad`. For
# the trunk, the chain rule through the shared $z$ gives $\partial L_n/\partial\theta_s = (\partial z/\partial
# \theta_s)^\top \sum_i \partial L_i/\partial z$: one trunk backward started from the summed $\partial L_i/\partial z$,
# which is what accumulates in the leaf's `.grad`. It saves memory only: a head's logits and softmax
# ($B\,T\,V$ numbers each) are freed before the next head runs, so the peak holds one head's instead of $n$, $O(V + d)$
# instead of $O(nV + d)$ per token. The compute is the same (one trunk forward and backward, each head once). The
# repository measured it at $V$ = 50257: $n = 4$ takes 0.92x the memory of next-token training head by head, 1.78x
# naively; $n = 8$ 0.82x against 2.79x.

# %% [markdown]
# **Q2.** The paper finds that multi-token prediction helps large models but is neutral or harmful for small ones
# (below about 1B parameters). Give reasons, and say what this repository measured at its scale.

# %% [answer]
# At equal size the extra heads are not free: the $n$ one-block heads take blocks from the trunk ($L - n$ shared
# blocks), so the next-token path is shallower, and the shared trunk must also serve $n - 1$ harder, noisier
# objectives (tokens 2 to $n$ ahead) that compete with next-token prediction for a small model's capacity, while the
# loss sums all heads, so the far-future heads weigh as much as the next one. Large models have capacity to spare, and
# there the extra targets push the trunk toward representations that plan ahead (the paper's gains on code
# grow with size: at 13B, n = 4 solves about 12% more HumanEval problems). In this repository, from 74k to 2.5M non-embedding parameters, head 1's
# validation loss is worse than next-token training at every size (n = 2: +0.13 to +0.31 nats, n = 4: +0.30 to
# +0.67), and the gap grows with size instead of closing: the larger models here are also the most under-trained
# (same data for every size), and the heads are a larger share of a small model's depth.

# %% [markdown]
# **Q3.** Why is greedy self-speculative decoding (3.2) exactly as good as greedy decoding with head 1, and what
# decides whether it is faster?

# %% [answer]
# Every committed token is head 1's greedy choice for its exact prefix: a draft is kept only if it equals head 1's
# choice computed in the verify forward, and with causal attention the logits at a position depend only on the
# tokens up to it, which are all verified; the token appended after the accepted drafts is head 1's own. So the
# output is token for token that of greedy decoding (up to floating-point near-ties: the verify pass and a single
# step may round differently, as the repository saw once in bfloat16). Speed is not guaranteed: each forward
# commits between 1 and $m$ tokens, and the gain is about (accepted tokens per forward) divided by (the cost of a
# verify forward on $m$ positions relative to a one-token step). On a GPU a large model's step is bound by reading
# its weights, so $m$ positions cost about one (the paper: about 3x on code at 7B). On this repository's CPU, a small
# model's verify forward with $n = 4$ costs 2.85 greedy steps, so 2.83 accepted tokens per forward break even at
# best (measured: 0.91x); a wider model in bfloat16 reached 1.32x on code.

# %% [markdown]
# ## Summary

# %%
checks.summary()
