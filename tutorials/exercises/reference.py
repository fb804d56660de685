"""The ONE door from the exercises to the repository: every call that the exercise notebooks and their checks
(checks.py) make into gpt.py, calm.py, brierlm.py, mtp.py and dispersion.py goes through a function here.

If a repository function is renamed or changes its signature, fix the wrapper below and nothing else: the
exercises and checks only ever see these names and signatures. Each wrapper says which repository function it
stands for. (Run `python -m pytest tests/test_exercises.py` after such a fix: it executes every exercise.)
"""
import os
import sys


def repository_root():
    """The nearest folder above this file that holds the repository (its gpt.py): the clone this kit lies in, as
    tutorials/exercises/ or as a students' handout folder copied anywhere inside it (build.py --handout)."""
    here = folder = os.path.dirname(os.path.abspath(__file__))
    while not os.path.exists(os.path.join(folder, "gpt.py")):
        if os.path.dirname(folder) == folder:
            raise ImportError(f"reference.py: no repository (gpt.py) in {here} or any folder above it: the exercises "
                              "must lie inside a clone of the repository")
        folder = os.path.dirname(folder)
    return folder


ROOT = repository_root()
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

import brierlm  # noqa: E402
import calm  # noqa: E402
import dispersion  # noqa: E402
import gpt  # noqa: E402
import mtp  # noqa: E402


# ----------------------------------------------------------------------------- core (gpt.py)

def rope_tables(head_dim, max_len, base=10000.0):
    """cos, sin tables (max_len, head_dim / 2) of the rotary angles: gpt.rope_tables."""
    return gpt.rope_tables(head_dim, max_len, base)


def apply_rope(x, cos, sin):
    """Rotate x (B, nh, T, hs) with tables (T, hs/2); pairs are (x[..., i], x[..., i + hs/2]): gpt.apply_rope."""
    return gpt.apply_rope(x, cos, sin)


@torch.no_grad()
def attention_after_cache(B, n_head, head_dim, n_cached, n_new, seed=0):
    """One case of attention with a KV cache, computed by gpt.CausalSelfAttention: random inputs of n_cached + n_new
    positions go through its query/key/value projection; the first n_cached keys and values are put in its cache
    and the last n_new positions are run through forward() (no RoPE; the output projection set to the identity).
    Returns q (B, nh, n_new, hs), k and v (B, nh, n_cached + n_new, hs), and the module's output (B, nh, n_new, hs)."""
    torch.manual_seed(seed)
    C = n_head * head_dim
    attn = gpt.CausalSelfAttention(gpt.GPTConfig(n_embd=C, n_head=n_head)).eval()
    torch.nn.init.eye_(attn.c_proj.weight)
    x = torch.randn(B, n_cached + n_new, C)
    q, k, v = (t.view(B, -1, n_head, head_dim).transpose(1, 2) for t in attn.c_attn(x).split(C, dim=2))
    kv = [k[:, :, :n_cached], v[:, :, :n_cached]] if n_cached else [None, None]
    y = attn(x[:, n_cached:], None, kv)                                     # (B, n_new, C)
    return q[:, :, n_cached:], k, v, y.view(B, n_new, n_head, head_dim).transpose(1, 2)


def tiny_gpt(vocab_size=48, block_size=32, n_layer=2, n_head=2, n_embd=32, seed=0, pos="rope"):
    """A small random GPT (eval mode) for the checks: gpt.GPT(gpt.GPTConfig(...))."""
    torch.manual_seed(seed)
    cfg = gpt.GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head,
                        n_embd=n_embd, pos=pos)
    return gpt.GPT(cfg).eval()


def new_cache(model):
    """An empty KV cache for every attention layer of a GPT: gpt.KVCache."""
    return gpt.KVCache(len(model.blocks))


def cache_length(cache):
    """How many positions the cache holds: len(gpt.KVCache)."""
    return len(cache)


def logits_with_cache(model, idx, cache):
    """Logits (B, T, V) of the new tokens idx (B, T), which come after the len(cache) positions already cached;
    appends their keys and values to the cache: gpt.GPT.forward(idx, cache=cache)."""
    return model(idx, cache=cache)[0]


def token_embedding(model):
    """The token embedding module of a GPT (a forward hook on it sees every batch of tokens fed): GPT.wte."""
    return model.wte


def greedy_generate(model, idx, max_new_tokens, use_cache):
    """Greedy continuation (B, T + max_new_tokens): gpt.GPT.generate(temperature=0)."""
    return model.generate(idx, max_new_tokens, temperature=0, use_cache=use_cache)


# ----------------------------------------------------------------------------- CALM (calm.py)

def energy_loss(x, y, alpha=1.0):
    """Negative energy score per position: x (N, P, l) model samples, y (M, P, l) targets -> (P,): calm.energy_loss."""
    return calm.energy_loss(x, y, alpha)


def tiny_autoencoder(vocab_size=40, chunk_size=4, latent_dim=8, ae_dim=32, seed=0, kl_clip=0.5, kl_weight=1e-3):
    """(model, args) of a small random CALM autoencoder in eval mode: calm.Autoencoder(vocab, calm.AEConfig(...))."""
    torch.manual_seed(seed)
    args = calm.AEConfig(chunk_size=chunk_size, latent_dim=latent_dim, ae_dim=ae_dim, kl_clip=kl_clip,
                         kl_weight=kl_weight)
    return calm.Autoencoder(vocab_size, args).eval(), args


def encode(ae, chunks):
    """Posterior mean and log std (..., l) of token chunks (..., K): calm.Autoencoder.encode."""
    return ae.encode(chunks)


def decode(ae, z):
    """Logits (..., K, V) of latents z (..., l): calm.Autoencoder.decode."""
    return ae.decode(z)


def autoencoder_loss(ae, tokens, args):
    """The autoencoder's training loss on tokens (B, T) in eval mode (z = mu: no sampling, dropout or masking):
    calm.ae_loss(model, x)[0] (the settings are the autoencoder's own, ae.cfg)."""
    assert not ae.training, "the deterministic reference needs the autoencoder in eval mode"
    return calm.ae_loss(ae, tokens)[0]


def autoencoder_kl(ae, tokens, args):
    """The clipped KL term calm.ae_loss computes (and logs) on tokens (B, T), eval mode: calm.ae_loss(...)[1]['kl']."""
    assert not ae.training, "the deterministic reference needs the autoencoder in eval mode"
    return calm.ae_loss(ae, tokens)[1]["kl"]


# ----------------------------------------------------------------------------- BrierLM (brierlm.py)

def two_sample_estimates(x1, x2, y, max_n):
    """Brier-1..max_n estimates per position (N, max_n) from two samples and the reference:
    brierlm.two_sample_estimates."""
    return brierlm.two_sample_estimates(x1, x2, y, max_n)


def exact_brier1(logits, y):
    """2 p(y) - sum_x p(x)^2 per row of logits (N, V): brierlm.exact_brier1."""
    return brierlm.exact_brier1(logits, y)


def brierlm_score(briers):
    """100 x geometric mean of Brier-1..n, each clamped at 0: brierlm.brierlm_from_briers."""
    return brierlm.brierlm_from_briers(briers)


# ----------------------------------------------------------------------------- MTP (mtp.py)

def tiny_mtp(n_future=4, vocab_size=32, block_size=24, n_layer=6, n_head=2, n_embd=32, seed=0):
    """A small random multi-token model (n_layer blocks in all: n_layer - n_future shared trunk blocks, then
    n_future one-block heads): mtp.MTP(gpt.GPTConfig, n)."""
    torch.manual_seed(seed)
    cfg = gpt.GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    return mtp.MTP(cfg, n_future)


def n_heads(model):
    """The number of output heads n: mtp.MTP.n_future."""
    return model.n_future


def trunk_hidden(model, idx):
    """z = f_s(x): the shared trunk's output (B, T, d): mtp.MTP.trunk_hidden."""
    return model.trunk_hidden(idx)


def head_logits(model, i, z):
    """Logits (B, T, V) of head i (0 = next token) on the trunk output z: mtp.MTP.head_logits."""
    return model.head_logits(i, z)


def head_loss(logits, y, i):
    """Cross-entropy of head i (predicts y[:, t + i] at position t; -1 targets ignored): mtp.head_loss."""
    return mtp.head_loss(logits, y, i)


def unembedding(model):
    """The shared output projection f_u every head goes through (a module; hooks see each head's logits)."""
    return model.trunk.lm_head


def trunk_parameter(model):
    """A parameter only the shared trunk uses (its first block's attention; needs n_layer > n_future): a hook
    on it counts trunk backwards."""
    return model.trunk.blocks[0].attn.c_attn.weight


def trunk_first_block(model):
    """The trunk's first block (a module; needs n_layer > n_future): a forward hook on it counts trunk forwards."""
    return model.trunk.blocks[0]


def mtp_efficient_backward(model, x, y):
    """Gradients of L_n, head by head (fig. 2): mtp.forward_backward; returns the loss."""
    return float(mtp.forward_backward(model, x, y)[0])


def mtp_naive_loss(model, x, y):
    """L_n = sum over heads, all heads' logits alive at once: mtp.MTP.forward(x, y)[1]."""
    return model(x, y)[1]


@torch.no_grad()
def mtp_step(model, feed, start, cache):
    """One forward of [tokens] (list) at positions start.. with the cache: for every fed position j, head 1's
    greedy next token greedy[j] and heads 2..n's greedy proposals proposals[j] (lists). The pieces of
    mtp.speculative_generate (trunk_hidden, head_hidden, the shared lm_head)."""
    idx = torch.tensor([feed])
    z = model.trunk_hidden(idx, start, cache)
    h = torch.stack([model.head_hidden(i, z, start, cache)[0] for i in range(model.n_future)])  # (n, m, d)
    best = model.trunk.lm_head(h).argmax(-1)                                                # (n, m)
    return best[0].tolist(), best[1:].T.tolist()


def mtp_new_cache(model):
    """An empty KV cache for every block of a multi-token model (trunk and heads): gpt.KVCache(model.n_layer)."""
    return gpt.KVCache(model.n_layer)


def crop_cache(cache, n):
    """Forget every cached position >= n: gpt.KVCache.crop."""
    cache.crop(n)


def speculative_generate(model, idx, max_new_tokens):
    """Greedy self-speculative decoding: (tokens (1, T + new), number of forwards): mtp.speculative_generate."""
    out, stats = mtp.speculative_generate(model, idx, max_new_tokens, temperature=0.0)
    return out, stats["forwards"]


def mtp_greedy(model, idx, max_new_tokens):
    """Plain greedy decoding with head 1 only: mtp.MTP.generate(temperature=0)."""
    return model.generate(idx, max_new_tokens, temperature=0)


def mtp_block_size(model):
    return model.config.block_size


# ----------------------------------------------------------------------------- dispersion (dispersion.py)

def dispersion_of(h):
    """Mean pairwise cosine distance of each set of vectors h (..., N, d) -> (...): dispersion.dispersion."""
    return dispersion.dispersion(h)


def dispersion_objective(model, x, y, weight):
    """The training loss L_CE + weight * L_aux with one set of all B*T final states (scope 'batch'):
    dispersion.dispersion_loss(model, x, y, weight, 'batch')[0]."""
    return dispersion.dispersion_loss(model, x, y, weight, "batch")[0]


def final_hidden_and_logits(model, x):
    """ln_f(last hidden state) (B, T, d) and the logits (B, T, V) of a GPT: gpt.GPT.body / embed / lm_head."""
    h = model.body(model.embed(x))
    return h, model.lm_head(h)
