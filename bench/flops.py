"""The one FLOPs formula every comparison in this repository uses (bench/table.py, the tutorials).

Training FLOPs per token (2 per multiply-add, x3 for forward + backward; norms, softmax, GELU and other
elementwise work are left out; attention at the full window T, the nanoGPT / PaLM convention):
  d width, L blocks, V vocabulary, T block_size (tokens), a block has 12 d^2 weights
  ntp, dispersion   6 (12 L d^2 + d V) + 12 L d T                (the dispersion loss is O(d) per token: left out)
  mtp, n heads      6 (12 L d^2 + n d V) + 12 L d T              (L - n trunk blocks + n one-block heads = L blocks)
  calm, K tokens    per chunk, divided by K:
                    backbone   6 * 12 L d^2 + 12 L d (T/K)        (no unembedding: the energy head replaces it)
                    compress   6 (2K + 2) d^2                    (Linear(K d -> 2d), Linear(2d -> d))
                    head       6 d^2 + 6 N (s d + 6 H d^2 + d^2 + d l)   (cond_in once; noise_in, H head blocks of
                                                                  6 d^2 and the output MLP for each of N samples)
                    encoder    2 (K A 7.5 a^2 + K a^2 + A 7.5 a^2 + 2 a l)  (frozen, forward only: the targets)
                    N num_samples, s noise_size, H head_layers, l latent_dim, a ae_dim, A ae_layers (7.5 a^2 per
                    SwiGLU layer: up a x 5a, down 2.5a x a); the energy-score distances are elementwise: left out
  autoencoder       6 (2 K A 7.5 a^2 + 2 K a^2 + 2 A 7.5 a^2 + 2 a l + l a + K a V) / K   (ae_flops, apart)
"""
import calm
from mtp import MTP


def train_flops_per_token(model, block_size, num_samples=8):
    """Training FLOPs per token of a GPT (ntp, dispersion), MTP or CALM model (energy head drawing num_samples
    samples, --num_samples) for windows of block_size tokens, as in the module docstring."""
    if isinstance(model, calm.CALM):
        c, K = model.backbone.config, model.K
        d, L, T = c.n_embd, c.n_layer, c.block_size            # backbone block_size is in chunks (T / K)
        head, ae = model.head, model.ae
        N = 1 if model.head_kind == "mse" else num_samples
        s, H, lat = head.noise_size, len(head.blocks), ae.l
        a, A = ae.wte.embedding_dim, len(ae.enc_tok)
        backbone = 6 * 12 * L * d * d + 12 * L * d * T
        compress = 6 * (2 * K + 2) * d * d
        energy_head = 6 * d * d + 6 * N * (s * d + 6 * H * d * d + d * d + d * lat)
        encoder = 2 * (K * A * 7.5 * a * a + K * a * a + A * 7.5 * a * a + 2 * a * lat)
        return (backbone + compress + energy_head + encoder) / K
    gpt, n = (model.trunk, model.n_future) if isinstance(model, MTP) else (model, 1)
    c = gpt.config
    L = model.n_layer if isinstance(model, MTP) else c.n_layer
    return 6 * (12 * L * c.n_embd ** 2 + n * c.n_embd * c.vocab_size) + 12 * L * c.n_embd * block_size


def ae_flops_per_token(ae):
    """Training FLOPs per token of CALM's autoencoder (module docstring, last line)."""
    K, a, A, lat, V = ae.K, ae.wte.embedding_dim, len(ae.enc_tok), ae.l, ae.wte.num_embeddings
    return 6 * (2 * K * A * 7.5 * a * a + 2 * K * a * a + 2 * A * 7.5 * a * a + 2 * a * lat + lat * a + K * a * V) / K
