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
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


class UserError(Exception):
    """Bad input from the user: scripts print the message as one line and exit non-zero, with no traceback."""


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
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim)  # (hs/2,)
    angles = torch.outer(torch.arange(max_len).float(), inv_freq)               # (T, hs/2)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    # rotate each pair (x1_i, x2_i) by the angle of its position and frequency; x (B, nh, T, hs), cos/sin (T, hs/2)
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class KVCache:
    """Keys and values of every attention layer seen so far: layers[i] = [k, v], each (B, n_head, T_seen, hs)."""

    def __init__(self, n_layer):
        self.layers = [[None, None] for _ in range(n_layer)]

    def __len__(self):
        k = self.layers[0][0]
        return 0 if k is None else k.size(2)

    def crop(self, n):
        """Forget every position >= n (roll back rejected speculative tokens)."""
        for kv in self.layers:
            if kv[0] is not None:
                kv[0], kv[1] = kv[0][:, :, :n], kv[1][:, :, :n]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        hs = cfg.n_embd // cfg.n_head
        self.q_norm = nn.RMSNorm(hs) if cfg.qk_norm else None
        self.k_norm = nn.RMSNorm(hs) if cfg.qk_norm else None

    def forward(self, x, rope=None, kv=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv is not None:  # append to the cache; attend over everything seen so far
            if kv[0] is not None:
                k, v = torch.cat([kv[0], k], dim=2), torch.cat([kv[1], v], dim=2)
            kv[0], kv[1] = k, v
        Tk, p = k.size(2), self.dropout if self.training else 0.0
        if Tk == T:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        elif T == 1:  # one new query may see the whole cache
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        else:  # T new queries after Tk - T cached ones: query i sees keys 0 .. Tk - T + i
            mask = torch.ones(T, Tk, dtype=torch.bool, device=x.device).tril(diagonal=Tk - T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


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
            collect["attn"].append(a)
            collect.setdefault("ffn_in", []).append(f)
            collect["mlp"].append(m)
            collect["layers"].append(x)
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
        cos, sin = rope_tables(cfg.n_embd // cfg.n_head, cfg.block_size)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(init_gpt2_weights)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer)
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def num_params(self, non_embedding=True):
        n = sum(p.numel() for p in self.parameters())
        return n - (self.wpe.weight.numel() if non_embedding and self.wpe is not None else 0)

    def rope_at(self, start, T):
        """cos/sin rows for absolute positions start .. start+T-1 (None with learned positions)."""
        if start + T > self.config.block_size:
            raise UserError(f"sequence of {start + T} positions exceeds block_size={self.config.block_size}")
        return None if self.wpe is not None else (self.rope_cos[start:start + T], self.rope_sin[start:start + T])

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
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss

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
            h = self.body(self.embed(new, start), start, cache)
            logits = self.lm_head(h[:, -1])  # (B, V): only the last position is sampled from
            idx = torch.cat([idx, sample_logits(logits, temperature, top_k, generator)], dim=1)
        return idx


def sample_logits(logits, temperature=1.0, top_k=None, generator=None):
    """One token per row of logits (B, V): argmax when temperature == 0, else softmax(logits / T) within top-k."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)  # (B, 1)


def init_gpt2_weights(module):
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
