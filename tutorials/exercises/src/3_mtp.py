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
# 2. cut the graph there: `z_leaf = z.detach().requires_grad_()`;
# 3. for each head $i$: logits, loss $L_i$, `L_i.backward()`. The gradient accumulates in `z_leaf.grad` (and in the
#    head's and the shared unembedding's parameters), and head $i$'s logits are freed before head $i + 1$ runs;
# 4. run the trunk's backward once with the summed gradient: `z.backward(z_leaf.grad)`.
#
# The gradients are exactly those of $L_n = \sum_i L_i$; the peak memory is $O(V + d)$ per token.
#
# Use `ref.n_heads(model)`, `ref.trunk_hidden(model, x)` (the trunk's output, `(B, T, d)`),
# `ref.head_logits(model, i, z)` (head `i = 0..n-1`, 0 being the next-token head) and `ref.head_loss(logits, y, i)`
# (head i's cross-entropy against the targets shifted by i). Return the total loss as a number. The check compares
# every parameter's gradient with `mtp.mtp_forward_backward`, and counts trunk forwards, trunk backwards and how many
# heads' logits are alive at once.

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
    # STUB raise NotImplementedError("exercise 3.1: z = ref.trunk_hidden(model, x); z_leaf = z.detach().requires_grad_(); for each head: loss = ref.head_loss(ref.head_logits(model, i, z_leaf), y, i); loss.backward(); finally z.backward(z_leaf.grad)")

# %%
checks.head_by_head_backward(head_by_head_backward)

# %% [markdown]
# ## 3.2 The verify step of self-speculative decoding
#
# Generation (sec. 3.2, blockwise parallel decoding of Stern et al. 2018): heads $2..n$ **draft** the tokens after
# the next one. One forward runs the model on [last token, draft$_1$, ..., draft$_{m-1}$] and gives head 1's
# greedy choice after every one of those positions: `greedy[0]` after the last token, `greedy[j]` after draft $j$.
# Draft $j+1$ (`drafts[j]`) is right when it equals `greedy[j]`, head 1's own choice at that point.
#
# **Verify:** accept drafts from the left while each equals head 1's choice; at the first disagreement (or after
# the last draft) append head 1's own token, which that forward computed for free. Return the tokens to commit:
#
# `drafts[:k] + [greedy[k]]`, where `k` is the number of accepted drafts.
#
# Every forward therefore commits between 1 and $m$ tokens, and the output is exactly what plain greedy decoding
# with head 1 would give. The check runs a full speculative decoder built around your function and compares it with
# greedy decoding and with `mtp.speculative_generate`, token for token and forward for forward.

# %%
def verify_greedy(drafts, greedy):
    """drafts: the m-1 proposed tokens (list); greedy: head 1's m greedy tokens after [last token, drafts...].
    Returns the list of tokens to commit: the accepted drafts, then head 1's token."""
    # BEGIN SOLUTION
    accepted = []
    for proposal, choice in zip(drafts, greedy):
        if proposal != choice:
            break
        accepted.append(proposal)
    return accepted + [greedy[len(accepted)]]
    # END SOLUTION
    # STUB raise NotImplementedError("exercise 3.2: walk along drafts while drafts[j] == greedy[j]; then add greedy[k], k = the number accepted")

# %%
checks.verify_greedy(verify_greedy)

# %% [markdown]
# ## Summary

# %%
checks.summary()
