"""The one FLOPs formula every comparison in this repository uses (bench/table.py, the tutorials).

Training FLOPs per token (2 per multiply-add, x3 for forward + backward; norms, softmax, GELU and other
elementwise work are left out; attention at the full window T, the nanoGPT / PaLM convention):
  d width, L blocks, V vocabulary, T block_size (tokens), a block has 12 d^2 weights
  ntp, dispersion   6 (12 L d^2 + d V) + 12 L d T                (the dispersion loss is O(d) per token: left out)
  mtp, n heads      6 (12 L d^2 + n d V) + 12 L d T              (L - n trunk blocks + n one-block heads = L blocks)
  calm, K tokens    per chunk, divided by K (calm_flops_parts: each part apart, e.g. the head's share):
                    backbone   6 * 12 L d^2 + 12 L d (T/K)        (no unembedding: the generative head replaces it)
                    compress   6 (2K + 2) d^2                    (Linear(K d -> 2d), Linear(2d -> d))
                    head       energy / mse: 6 d w + 6 N (s w + 6 H w^2 + w^2 + w l)   (cond_in once; noise_in, H
                                 blocks of 6 w^2 and the output MLP for each of N samples; mse: N = 1)
                               flow / diffusion: 6 d w + 6 N (2 l w + F w + (5 H + 3) w^2)   (c_in once; per
                                 sample x_in, time MLP F -> w -> w, H AdaLN blocks of 5 w^2, output modulation
                                 2 w^2 and projection w l; F = 256 time features)
                    encoder    2 (K A 7.5 a^2 + K a^2 + A 7.5 a^2 + 2 a l)  (frozen, forward only: the targets)
                    w head width (--head_dim, 0: d / 2), N num_samples, s noise_size, H head_layers, l latent_dim,
                    a ae_dim, A ae_layers (7.5 a^2 per SwiGLU layer: up a x 5a, down 2.5a x a); the energy-score
                    distances and the heads' sampling steps (inference only) are left out
  autoencoder       6 (2 K A 7.5 a^2 + 2 K a^2 + 2 A 7.5 a^2 + 2 a l + l a + K a V) / K   (ae_flops, apart)
"""
import calm
import calm_comparison_heads
from mtp import MTP


def train_flops_per_token(model, block_size, num_samples=8):
    """Training FLOPs per token of a GPT (ntp, dispersion), MTP or CALM model (energy head drawing num_samples
    samples, --num_samples) for windows of block_size tokens, as in the module docstring."""
    if isinstance(model, calm.CALM):
        return sum(calm_flops_parts(model, num_samples).values()) / model.K
    gpt, n = (model.trunk, model.n_future) if isinstance(model, MTP) else (model, 1)
    c = gpt.config
    L = model.n_layer if isinstance(model, MTP) else c.n_layer
    return 6 * (12 * L * c.n_embd ** 2 + n * c.n_embd * c.vocab_size) + 12 * L * c.n_embd * block_size


def calm_flops_parts(model, num_samples=8):
    """Training FLOPs per chunk of each part of a CALM model: {backbone, compress, head, encoder} (docstring)."""
    c, K = model.backbone.config, model.K
    d, L, T = c.n_embd, c.n_layer, c.block_size            # backbone block_size is in chunks (T / K)
    head, ae = model.head, model.ae
    N = 1 if isinstance(head, calm_comparison_heads.MSEHead) else num_samples
    lat, a, A = ae.l, ae.wte.embedding_dim, len(ae.enc_tok)
    if isinstance(head, calm.EnergyHead):  # the MSE head is the energy head's network
        H, s, w = len(head.blocks), head.noise_size, head.noise_in[0].out_features
        head_flops = 6 * d * w + 6 * N * (s * w + 6 * H * w * w + w * w + w * lat)
    else:
        H, w, F = len(head.net.blocks), head.net.x_in.out_features, calm_comparison_heads.FREQ
        head_flops = 6 * d * w + 6 * N * (2 * lat * w + F * w + (5 * H + 3) * w * w)
    return dict(backbone=6 * 12 * L * d * d + 12 * L * d * T, compress=6 * (2 * K + 2) * d * d, head=head_flops,
                encoder=2 * (K * A * 7.5 * a * a + K * a * a + A * 7.5 * a * a + 2 * a * lat))


def ae_flops_per_token(ae):
    """Training FLOPs per token of CALM's autoencoder (module docstring, last line)."""
    K, a, A, lat, V = ae.K, ae.wte.embedding_dim, len(ae.enc_tok), ae.l, ae.wte.num_embeddings
    return 6 * (2 * K * A * 7.5 * a * a + 2 * K * a * a + 2 * A * 7.5 * a * a + 2 * a * lat + lat * a + K * a * V) / K
