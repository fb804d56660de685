"""Multi-token prediction: "Better & Faster Large Language Models via Multi-token Prediction"
(Gloeckle, Youbi Idrissi, Roziere, Lopez-Paz, Synnaeve; ICML 2024; arXiv 2404.19737).

Paper -> code
  sec. 2           shared trunk z = f_s(x_<=t), n heads P(x_t+i | x_<=t) = softmax(f_u(f_h_i(z))), i = 1..n:
                   MTP.trunk_hidden (z) and MTP.head_logits (head i, shared final norm f_n and unembedding f_u)
  sec. 2, eq. L_n  L_n = - sum_t sum_i log P(x_t+i | x_<=t): mtp_loss, one head_loss per head. Heads are SUMMED
                   (as in the paper), each head's term the mean over its positions; positions whose target t+i lies
                   past the window are dropped. With n = 1 this is exactly the next-token loss (tested). So a
                   training loss is a sum over n heads; head 1's loss is the number to compare with an NTP model.
  sec. 2, fig. 2   memory-efficient training: trunk once; then per head forward, loss, backward into z (only one
                   head's (B, T, V) logits alive at a time); then the trunk's backward once: forward_backward.
                   (mtp_loss(...).backward() is the naive schedule: n logits tensors alive at once.)
  sec. 3.2         self-speculative decoding (blockwise parallel decoding, Stern et al. 2018): speculative_generate,
                   with its two acceptance rules accept_greedy and accept_sampled.
  sec. 4           induction and polynomial arithmetic: data.py's synthetic tasks.

Parameter budget (the paper's, and its released code's): n_layer L is the TOTAL number of Transformer blocks.
The shared trunk has L - n blocks; head 1 is block L - n + 1 of an ordinary GPT of L - n + 1 blocks (self.trunk,
so plain next-token decoding is just self.trunk.generate); the n - 1 extra heads are one block each, reading the
same trunk output. L blocks in all, for every n: the heads replace trunk layers, and n = 1 is the NTP GPT.

    python train.py --objective mtp --n_future 4
    python sample.py --ckpt out/mtp/ckpt.pt --speculative --temperature 0
"""
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt import GPT, Block, KVCache, init_gpt2_weights, probabilities
from runtime import UserError


class MTP(nn.Module):
    def __init__(self, gcfg, n_future):
        super().__init__()
        if n_future < 1:
            raise UserError(f"--n_future must be at least 1, got {n_future}")
        if n_future > gcfg.n_layer:
            raise UserError(f"--n_future {n_future} needs --n_layer >= {n_future}: each head replaces a trunk layer")
        if n_future > gcfg.block_size:
            raise UserError(f"--n_future {n_future} is larger than --block_size {gcfg.block_size}")
        self.n_future, self.n_layer = n_future, gcfg.n_layer
        self.trunk = GPT(replace(gcfg, n_layer=gcfg.n_layer - n_future + 1))  # shared blocks + head 1, ln_f, lm_head
        self.heads = nn.ModuleList([Block(gcfg) for _ in range(n_future - 1)])  # heads 2..n
        self.heads.apply(init_gpt2_weights)
        std = 0.02 / (2 * gcfg.n_layer) ** 0.5  # GPT-2's residual scaling, for the TOTAL depth
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                if name.startswith("heads."):
                    nn.init.normal_(p, mean=0.0, std=std)
                else:  # rescale the trunk's (drawn for its own depth): no new random numbers, so n = 1 == GPT
                    p.data.mul_((len(self.trunk.blocks) / gcfg.n_layer) ** 0.5)

    @property
    def config(self):
        return self.trunk.config

    def head_blocks(self):
        return [self.trunk.blocks[-1], *self.heads]  # head 1 (the trunk GPT's last block), heads 2..n

    def trunk_hidden(self, idx, start=0, cache=None):
        """z = f_s(x): the shared blocks' output (B, T, d), before any head. Cache layers: see head_logits."""
        x, rope = self.trunk.embed(idx, start), self.trunk.rope_at(start, idx.size(1))
        for i, block in enumerate(self.trunk.blocks[:-1]):
            x = block(x, rope, cache.layers[i] if cache is not None else None)
        return x

    def head_hidden(self, i, z, start=0, cache=None):
        """f_n(f_h_i(z)), head i = 0..n-1 (0 is the next-token head): (B, T, d). Cache layer of head i: L - n + i."""
        kv = cache.layers[len(self.trunk.blocks) - 1 + i] if cache is not None else None
        return self.trunk.ln_f(self.head_blocks()[i](z, self.trunk.rope_at(start, z.size(1)), kv))

    def head_logits(self, i, z, start=0, cache=None):
        return self.trunk.lm_head(self.head_hidden(i, z, start, cache))  # (B, T, V): shared unembedding f_u

    def forward(self, idx, targets=None):
        """All heads at once (naive): logits (n, B, T, V) and, with targets, the summed loss L_n."""
        z = self.trunk_hidden(idx)
        logits = torch.stack([self.head_logits(i, z) for i in range(self.n_future)])
        loss = None if targets is None else sum(head_loss(logits[i], targets, i) for i in range(self.n_future))
        return logits, loss

    def hidden_states(self, idx):
        """The next-token path (trunk + head 1), in GPT.hidden_states' format (what dispersion.py reads)."""
        return self.trunk.hidden_states(idx)

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True, generator=None):
        """Ordinary decoding with head 1 only (the extra heads are simply not run)."""
        return self.trunk.generate(idx, max_new_tokens, temperature, top_k, use_cache, generator)


def head_loss(logits, y, i):
    """Cross-entropy of head i (0-based: predicts x_t+i+1) at every position t whose target is in the window.
    logits (B, T, V); y (B, T) next-token targets, so x_t+i+1 = y[:, t + i]; -1 targets are ignored."""
    T = y.size(1)
    return F.cross_entropy(logits[:, :T - i].reshape(-1, logits.size(-1)), y[:, i:].reshape(-1), ignore_index=-1)


# ----------------------------------------------------------------------------- training (sec. 2)

def mtp_loss(model, x, y):
    """L_n (sec. 2): the sum of the n heads' losses, computed one head at a time (no (n, B, T, V) tensor).
    Returns (L_n, [loss of head 1, .., loss of head n])."""
    z = model.trunk_hidden(x)                       # (B, T, d)
    losses = [head_loss(model.head_logits(i, z), y, i) for i in range(model.n_future)]
    return sum(losses), losses


def forward_backward(model, x, y, scale=1.0):
    """Gradients of scale * L_n. Memory-efficient (fig. 2): one trunk forward, each head's forward + backward
    into a detached z (its logits freed before the next head), then one trunk backward with the summed dL/dz.
    Returns (L_n, [loss of each head]), detached."""
    z = model.trunk_hidden(x)                       # (B, T, d), graph through the trunk kept
    z_leaf = z.detach().requires_grad_()            # heads backpropagate into here: z_leaf.grad accumulates
    losses = []
    for i in range(model.n_future):
        loss_i = head_loss(model.head_logits(i, z_leaf), y, i)
        (scale * loss_i).backward()                 # frees head i's graph (and its logits) now
        losses.append(loss_i.detach())
    z.backward(z_leaf.grad)                         # the trunk, once, with sum_i dL_i/dz
    return sum(losses), losses


# ----------------------------------------------------------------------------- self-speculative decoding (sec. 3.2)

@torch.no_grad()
def speculative_generate(model, idx, max_new_tokens, temperature=0.0, top_k=None, generator=None):
    """Decoding with head 1, accelerated by the other heads: (idx (1, T + max_new_tokens), stats).

    State: the KV cache holds every committed token but the last one; `drafts` are heads 2..n's proposals for the
    tokens after it. One forward runs [last token, drafts] (m <= n positions) and gives head 1's distribution
    after each position j, against which draft j+1 is checked; the first rejected draft is replaced by a token of
    head 1 (so every forward emits at least one), the cache is cropped back to the accepted positions, and heads
    2..n at the last accepted position propose the next drafts.
      temperature 0 (sec. 3.2, Stern et al. 2018): accept_greedy; the output is identical to
        model.generate(temperature=0), token for token.
      temperature > 0 (speculative sampling, Leviathan et al. 2023; Chen et al. 2023): accept_sampled; each
        emitted token is distributed exactly as head 1's (same temperature / top-k), as model.generate samples.
    Past the context window gpt.generate re-encodes the last block_size tokens for every token; we do the same
    (one token per forward there: drafts cannot be verified in one pass against a sliding window)."""
    if idx.size(0) != 1:
        raise UserError("speculative decoding takes one prompt at a time (batch size 1)")
    if model.n_future < 2:
        raise UserError("speculative decoding needs extra heads to draft: this model has n_future = 1")
    target_len = idx.size(1) + max_new_tokens
    cache, drafts, q, forwards = None, [], None, 0
    while idx.size(1) < target_len:
        if cache is None or len(cache) >= model.config.block_size:  # first step, or the window is full: re-encode
            cache, start, feed = KVCache(model.n_layer), 0, idx[:, -model.config.block_size:]
        else:                                   # [last committed token, drafts...], as many as fit and are needed
            m = min(1 + len(drafts), model.config.block_size - len(cache), target_len - idx.size(1))
            start, feed = len(cache), torch.tensor([idx[0, -1:].tolist() + drafts[:m - 1]], device=idx.device)
        z = model.trunk_hidden(feed, start, cache)                              # (1, m, d)
        h = torch.stack([model.head_hidden(i, z, start, cache)[0] for i in range(model.n_future)])  # (n, m, d)
        logits = model.trunk.lm_head(h if start > 0 else h[:, -1:])  # (n, m, V): each head after each position
        forwards += 1
        fed = feed[0].tolist() if start > 0 else feed[0, -1:].tolist()  # a fresh window: its last position only
        if temperature == 0:
            k, token, drafts = accept_greedy(fed, logits)
        else:
            k, token, drafts, q = accept_sampled(fed, logits, q, temperature, top_k, generator)
        if start > 0:
            cache.crop(start + k + 1)                                          # roll back rejected positions
        new = fed[1:k + 1] + [token]                                           # accepted drafts + head 1's token
        idx = torch.cat([idx, torch.tensor([new], dtype=idx.dtype, device=idx.device)], dim=1)
    new = idx.size(1) - (target_len - max_new_tokens)
    return idx, dict(tokens=new, forwards=forwards, tokens_per_forward=new / max(forwards, 1))


def accept_greedy(fed, logits):
    """fed = [last committed token, drafts..] (m), logits (n, m, V). Accept draft j + 1 while it equals head 1's
    argmax after position j. Returns (k accepted drafts, head 1's token after them, the next drafts of heads 2..n)."""
    greedy = logits[0].argmax(-1).tolist()                  # head 1's token after each position
    k = 0
    while k < len(fed) - 1 and fed[k + 1] == greedy[k]:
        k += 1
    return k, greedy[k], logits[1:, k].argmax(-1).tolist()


def accept_sampled(fed, logits, q, temperature, top_k, generator):
    """Speculative sampling: draft x_j+1 (drawn from q_j, the drafting head's distribution) is accepted with
    probability min(1, p_j(x) / q_j(x)), p = head 1's; at the first rejection the token is drawn from
    max(0, p_j - q_j) renormalised, otherwise from p after the last draft. Returns (k, token, next drafts, their q)."""
    draw = lambda probs: int(torch.multinomial(probs, 1, generator=generator))  # noqa: E731
    p = probabilities(logits[0], temperature, top_k)        # (m, V) head 1
    k, token = 0, None
    while k < len(fed) - 1:
        x, pj, qj = fed[k + 1], p[k], q[k]
        if torch.rand(1, generator=generator, device=p.device) * qj[x] >= pj[x]:  # reject with prob. 1 - p/q
            token = draw((pj - qj).clamp(min=0))            # the residual distribution
            break
        k += 1
    token = draw(p[k]) if token is None else token
    q = probabilities(logits[1:, k], temperature, top_k)    # (n-1, V) proposals of heads 2..n
    return k, token, [draw(qi) for qi in q], q
