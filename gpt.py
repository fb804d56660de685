"""The tiny GPT core that every objective in this repository shares.

A decoder-only Transformer in the layout of GPT-2 / nanoGPT's model.py (pre-norm blocks, GELU MLP, tied input
and output embeddings, GPT-2 initialisation), with two options from current practice:
  - rotary position embeddings (RoPE, Su et al. 2021), the default; learned absolute positions with pos='learned';
  - QK-norm (RMS-normalise queries and keys per head before the dot product, Dehghani et al. 2023), qk_norm=True.

What the paper files use:
  GPT.forward(idx, targets)   logits (B, T, V) and the next-token cross-entropy
  GPT.embed / GPT.body        the two halves of forward: tokens -> vectors, vectors -> final hidden states
                              (CALM feeds its own input vectors to body; MTP stacks its heads on body's blocks)
  GPT.hidden_states(idx)      every layer's residual stream and the attention / MLP sub-layer outputs, one pass
  GPT.generate(...)           ancestral / greedy sampling with a KV cache (the fair baseline for speed comparisons)
  KVCache                     per-layer keys and values; crop(n) rolls back (speculative decoding needs it)
  probabilities, sample_logits  softmax(logits / T) within the top-k, and one token drawn from it

Read top to bottom: RoPE by its definition (rope_tables, apply_rope), the attention, MLP, block and GPT; the last
section is a faster way to compute apply_rope inside the attention (RotatePairs), equal to it and tested so.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from runtime import UserError


@dataclass
class GPTConfig:
    block_size: int = 128      # longest context (tokens, or chunks for CALM)
    vocab_size: int = 50257    # GPT-2 BPE; 256 for the byte tokenizer
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = False         # biases in Linear and LayerNorm (GPT-2 had them)
    pos: str = "rope"          # 'rope' (rotary) or 'learned' (absolute, GPT-2)
    qk_norm: bool = False


def rope_tables(head_dim, max_len, base=10000.0):
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim)  # theta_i = base^(-2i/hs), (hs/2,)
    angles = torch.outer(torch.arange(max_len).float(), inv_freq)               # t * theta_i, (T, hs/2)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """RoPE, the definition: rotate each pair (x1_i, x2_i) = (x_i, x_{i+hs/2}) by the angle t * theta_i of its
    position t and frequency i. x (B, nh, T, hs), cos/sin (T, hs/2). The attention computes the same numbers in
    place (CausalSelfAttention.queries_keys_values)."""
    (x1, x2), cos, sin = x.chunk(2, dim=-1), cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class KVCache:
    """Keys and values of every attention layer seen so far: layers[i] = [k, v], each (B, n_head, T_seen, hs)."""

    def __init__(self, n_layer):
        self.layers = [[None, None] for _ in range(n_layer)]

    def __len__(self):
        return 0 if self.layers[0][0] is None else self.layers[0][0].size(2)

    def crop(self, n):
        """Forget every position >= n (roll back rejected speculative tokens)."""
        for kv in self.layers:
            kv[:] = [t if t is None else t[:, :, :n] for t in kv]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        hs = cfg.n_embd // cfg.n_head
        self.q_norm, self.k_norm = (nn.RMSNorm(hs), nn.RMSNorm(hs)) if cfg.qk_norm else (None, None)
        # the rows RotatePairs needs: every query and key head in the order 0, hs/2, 1, hs/2 + 1, ...; v as it is
        rows = torch.arange(3 * cfg.n_embd).view(3, cfg.n_head, 2, hs // 2)
        self.register_buffer("rows", torch.cat([rows[:2].transpose(2, 3).flatten(), rows[2].flatten()]), False)

    def forward(self, x, rope=None, kv=None):
        B, T, C = x.shape
        q, k, v = self.queries_keys_values(x, rope)                     # (B, nh, T, hs) each; q, k rotated
        if kv is not None:  # append to the cache; attend over everything seen so far
            if kv[0] is not None:
                k, v = torch.cat([kv[0], k], dim=2), torch.cat([kv[1], v], dim=2)
            kv[0], kv[1] = k, v
        Tk, p = k.size(2), self.dropout if self.training else 0.0
        # T new queries after Tk - T cached keys: query i sees keys 0 .. Tk - T + i (causal if T = Tk, all if T = 1)
        mask = None if T in (1, Tk) else torch.ones(T, Tk, dtype=torch.bool, device=x.device).tril(diagonal=Tk - T)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=T == Tk)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C)))

    def queries_keys_values(self, x, rope=None):
        """q, k, v (B, nh, T, hs) of x (B, T, C). The textbook computation is

            q, k, v = c_attn(x).split(C), each cut into nh heads of hs
            q, k = q_norm(q), k_norm(k)                              (only with qk_norm)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  (rope = the tables at these positions)

        and this computes the same numbers, forward and backward (tests/test_gpt.py), in fewer passes over memory:
        c_attn's rows are read in an order that puts each rotary pair side by side (q.k is the same sum in any
        order of coordinates), and RotatePairs turns every pair of q and k in place as one complex multiply."""
        B, T, C = x.shape
        nh, hs = self.n_head, C // self.n_head
        rows, dims = (self.rows, self.rows[:hs]) if rope is not None else (slice(None), slice(None))
        qkv = F.linear(x, self.c_attn.weight[rows], None if self.c_attn.bias is None else self.c_attn.bias[rows])
        if self.q_norm is not None:  # RMS-normalise each query and key head (weights in the same order as q, k)
            q, k, v = (t.unflatten(2, (nh, hs)) for t in qkv.split(C, dim=2))
            q, k = (F.rms_norm(t, (hs,), n.weight[dims], n.eps) for t, n in ((q, self.q_norm), (k, self.k_norm)))
            qkv = torch.cat([q, k, v], dim=2).flatten(2)
        if rope is not None:
            qkv = RotatePairs.apply(qkv, rope)
        return [t.view(B, T, nh, hs).transpose(1, 2) for t in qkv.split(C, dim=2)]


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x, rope=None, kv=None, collect=None):
        a = self.attn(self.ln_1(x), rope, kv)
        x = x + a
        f = self.ln_2(x)  # the FFN's input after its norm (the usual kNN-LM key)
        m = self.mlp(f)
        x = x + m
        if collect is not None:  # sub-layer outputs and the residual stream, for representation analysis
            for key, value in (("attn", a), ("ffn_in", f), ("mlp", m), ("layers", x)):
                collect.setdefault(key, []).append(value)
        return x


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if cfg.pos not in ("rope", "learned"):
            raise UserError(f"pos must be 'rope' or 'learned', got {cfg.pos!r}")
        if cfg.n_embd % cfg.n_head or (cfg.n_embd // cfg.n_head) % 2:
            raise UserError(f"n_embd={cfg.n_embd} must split into n_head={cfg.n_head} heads of even size")
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.pos == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied input/output embeddings
        self.register_buffer("rope", torch.stack(rope_tables(cfg.n_embd // cfg.n_head, cfg.block_size), -1), False)
        self.apply(init_gpt2_weights)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer)
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def rope_at(self, start, T):
        """RotatePairs' rot at positions start.. (once per forward): (cos, sin) for every q/k pair, (T, C, 2)."""
        if start + T > self.config.block_size:
            raise UserError(f"sequence of {start + T} positions exceeds block_size={self.config.block_size}")
        return None if self.wpe is not None else self.rope[start:start + T].repeat(1, 2 * self.config.n_head, 1)

    def embed(self, idx, start=0):
        x = self.wte(idx)  # (B, T, d)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(start, start + idx.size(1), device=idx.device))
        return self.drop(x)

    def body(self, x, start=0, cache=None, collect=None):
        """Run every block on input vectors x (B, T, d) at positions start.., return ln_f(hidden) (B, T, d)."""
        rope = self.rope_at(start, x.size(1))
        for i, block in enumerate(self.blocks):
            x = block(x, rope, cache.layers[i] if cache is not None else None, collect)
        return self.ln_f(x)

    def forward(self, idx, targets=None, cache=None):
        start = len(cache) if cache is not None else 0
        logits = self.lm_head(self.body(self.embed(idx, start), start, cache))  # (B, T, V)
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)

    def hidden_states(self, idx):
        """One forward pass, returning {'layers': [embedding, block 1 .. block L outputs] (L+1 tensors),
        'attn': [L attention outputs], 'ffn_in': [L ln_2 outputs], 'mlp': [L MLP outputs], 'final': ln_f(last
        layer)}, each (B, T, d)."""
        x = self.embed(idx)
        collect = {"layers": [x], "attn": [], "mlp": []}
        collect["final"] = self.body(x, 0, None, collect)
        return collect

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True, generator=None):
        """Append max_new_tokens tokens to idx (B, T). temperature=0 is greedy. The model always sees the last
        block_size tokens; with the cache, a full window is re-encoded, so both paths give the same tokens."""
        cache = None
        for _ in range(max_new_tokens):
            if cache is not None and len(cache) < self.config.block_size:
                new, start = idx[:, -1:], len(cache)  # one new token; the rest is cached
            else:  # first step, or the window is full: encode the last block_size tokens afresh
                cache = KVCache(len(self.blocks)) if use_cache else None
                new, start = idx[:, -self.config.block_size:], 0
            logits = self.lm_head(self.body(self.embed(new, start), start, cache)[:, -1])  # (B, V): the last position
            idx = torch.cat([idx, sample_logits(logits, temperature, top_k, generator)], dim=1)
        return idx


def probabilities(logits, temperature=1.0, top_k=None):
    """softmax(logits / temperature) over the top_k largest logits of each row (..., V); the rest get 0."""
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[..., [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return F.softmax(logits, dim=-1)


def sample_logits(logits, temperature=1.0, top_k=None, generator=None):
    """One token per row of logits (B, V): argmax when temperature == 0, else a draw from probabilities()."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    return torch.multinomial(probabilities(logits, temperature, top_k), 1, generator=generator)  # (B, 1)


def init_gpt2_weights(module):
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


# ----------------------------------------------------------------------------- speed: RoPE in one in-place pass

class RotatePairs(torch.autograd.Function):
    """apply_rope on q and k in one in-place pass. qkv (B, T, 3C) holds each pair side by side (x1_0, x2_0, x1_1, ..:
    c_attn's rows are read in that order; q.k is the same sum in any order), so a pair is a complex number x1 + i x2,
    turned by e^(i t theta_i) = cos + i sin, rot (T, C, 2); the gradient turns back, in place on split's fresh one."""

    @staticmethod
    def forward(ctx, qkv, rot):
        ctx.mark_dirty(qkv)
        ctx.save_for_backward(rot)
        return RotatePairs.turn_(qkv, rot, 1)

    @staticmethod
    @torch.autograd.function.once_differentiable  # in place: no second derivative through it
    def backward(ctx, grad):
        return RotatePairs.turn_(grad, ctx.saved_tensors[0], -1), None

    @staticmethod
    def turn_(qkv, rot, sign):  # rotate by sign * angle
        qk = qkv[:, :, :2 * rot.size(1)].unflatten(-1, (-1, 2))  # q and k as pairs (B, T, C, 2)
        if qk.element_size() >= 4 and qk.device.type in ("cpu", "cuda") and not torch.compiler.is_compiling():
            turn = torch.view_as_complex(rot)
            torch.view_as_complex(qk).mul_(turn if sign > 0 else turn.conj())
        else:  # bf16 / fp16 have no complex type, inductor compiles none, MPS lacks some: the same in real arithmetic
            x1, x2, cos, sin = qk[..., 0].float(), qk[..., 1].float(), rot[..., 0], sign * rot[..., 1]
            qk.copy_(torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1))
        return qkv
