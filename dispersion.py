"""Representation dispersion: Li, Li, Livescu & Zhou, "On the Predictive Power of Representation Dispersion in
Language Models" (arXiv 2506.24106, 2025), as a metric, a training objective, a model and a layer selector.

Paper -> code ('Find.': the paper's findings, 'App.': its applications; the tags (D), (X), (L), (XD) name the
equations here and in the comments below)
  (D)     dispersion D = 1/(N(N-1)) sum_{i!=j} (1 - cos(h_i, h_j))       dispersion(h): O(N*d) through the sum of
          = 1 - (|S|^2 - N) / (N(N-1)),  S = sum_i h_i/|h_i|              unit vectors, not the O(N^2) matrix
  (X)     between-set version 1/(N M) sum_{i,j} (1 - cos(a_i, b_j))      cross_dispersion(a, b)
  Find.   dispersion vs perplexity: per segment, across checkpoints       scored_segments, perplexity_and_dispersion
                                                                          (correlations: runtime.spearman)
  Find.   per layer and sub-layer, Spearman(dispersion, perplexity)       perplexity_groups (the authors' sort, group
          across perplexity-sampled segment groups                        and uniform sampling), layer_correlations
  App. 2  dispersion gap G = within(T) + between(T, T') over the rows    dispersion_gap (no text, no forward pass)
          of the output matrix: task tokens T, everyday tokens T'
  App. 3  kNN-LM (Khandelwal et al. 2020) keys from any layer or          build_datastore, knn_lm_perplexity,
          sub-layer ('ffn_in.L-1' = the usual key), choice by dispersion  choose_layer
  (L)     push-away training L = L_CE + lambda * L_aux, L_aux = -D        dispersion_loss, aux_loss
  (XD)    cross-domain L_aux = -(mean cosine distance over pairs of       between_domain_dispersion,
          token states from different domains only)                       aux_loss(scope='cross_domain')

What is embedded (as in the authors' analysis code, yanhong-lbh/rep_dispersion, analysis/): a segment's set is the
hidden state of EVERY token of a fixed-length chunk at one layer (default the last, after the final norm: 'final'),
no pooling; D is taken within each segment and averaged. The authors publish no training code: the auxiliary loss
follows the paper's description, all B*T final states of the batch as ONE set (scope 'batch'; 'sequence': one
set per window; 'cross_domain': only pairs from different domains, read from the batch's x.domains, see data.py).
A zero vector has no direction: every function here raises UserError on one. The training objective's flags
(--dispersion_weight, --dispersion_scope) are wired in objectives.py; the tutorial's experiments live in
bench/dispersion_experiments.py.
"""
import contextlib
import math

import torch
import torch.nn.functional as F

from runtime import UserError, spearman


# ----------------------------------------------------------------------------- the metric

def unit_vectors(h):
    """h / |h| along the last axis, in float32 (float64 kept); a zero vector is a UserError."""
    h = h if h.dtype == torch.float64 else h.float()
    norms = h.norm(dim=-1, keepdim=True)
    if bool((norms == 0).any()):
        raise UserError("dispersion: a zero vector has no direction (cosine undefined); remove it first")
    return h / norms


def dispersion(h):
    """Mean pairwise cosine distance of the N vectors of each set in h (..., N, d) -> (...), eq. (D).
    In [0, N/(N-1)]: 0 for vectors that all point the same way, 1 for orthogonal directions, N/(N-1) when
    the unit vectors sum to zero (e.g. antipodal pairs). Differentiable (the auxiliary loss uses it)."""
    if h.dim() < 2 or h.size(-2) < 2:
        raise UserError(f"dispersion needs at least two vectors per set, got shape {tuple(h.shape)}")
    N = h.size(-2)
    S = unit_vectors(h).sum(dim=-2)                          # (..., d) sum of unit vectors
    return 1 - (S.pow(2).sum(-1) - N) / (N * (N - 1))        # eq. (D): sum_{i!=j} u_i.u_j = |S|^2 - N


def cross_dispersion(a, b):
    """Mean cosine distance between every vector of a (N, d) and every vector of b (M, d), eq. (X):
    1 - mean_i(u_i) . mean_j(v_j), O((N + M) d)."""
    if a.dim() != 2 or b.dim() != 2 or len(a) < 1 or len(b) < 1:
        raise UserError(f"cross_dispersion needs two non-empty (N, d) sets, got {tuple(a.shape)}, {tuple(b.shape)}")
    return 1 - unit_vectors(a).mean(0) @ unit_vectors(b).mean(0)


def between_domain_dispersion(h, domains):
    """eq. (XD): mean cosine distance over the pairs of token states (h (B, T, d)) whose rows belong to different
    domains (domains (B,) ints); within-domain pairs are left out. With S_k the sum of domain k's unit vectors and
    n_k its count: sum over between pairs of u_i.u_j = |sum_k S_k|^2 - sum_k |S_k|^2, pairs = N^2 - sum_k n_k^2."""
    u = unit_vectors(h).reshape(-1, h.size(-1))                                        # (B*T, d)
    labels = torch.as_tensor(domains, device=h.device).long().repeat_interleave(h.size(1))  # (B*T,)
    present = labels.unique()
    if len(present) < 2:
        raise UserError(f"cross-domain dispersion: the batch holds one domain only (label {present.tolist()}); "
                        f"it needs rows of at least two domains")
    S_k = torch.zeros(int(labels.max()) + 1, u.size(1), dtype=u.dtype, device=u.device).index_add(0, labels, u)
    n_k = torch.bincount(labels).to(u.dtype)                                           # (K,)
    pairs = n_k.sum() ** 2 - n_k.pow(2).sum()
    return 1 - (S_k.sum(0).pow(2).sum() - S_k.pow(2).sum()) / pairs


# ----------------------------------------------------------------------------- representations of any model

KINDS = ("layers", "attn", "ffn_in", "mlp")  # residual stream, attention output, FFN input (after ln_2), FFN output


def layer_names(states):
    """Every representation of a hidden_states dict: layers.0 (embeddings)..layers.L, attn.i, ffn_in.i, mlp.i, final."""
    names = [f"{kind}.{i}" for kind in KINDS for i in range(len(states.get(kind, [])))]
    return names + (["final"] if "final" in states else [])


def pick(states, layer):
    """The (B, T, d) tensor called `layer` ('final', 'layers.3', 'attn.0', 'ffn_in.1', 'mlp.1') of hidden_states."""
    if layer == "final" and "final" in states:
        return states["final"]
    kind, _, index = str(layer).partition(".")
    if kind not in KINDS or kind not in states or not index.isdigit():
        raise UserError(f"unknown layer {layer!r}: use 'final', 'layers.I', 'attn.I', 'ffn_in.I' or 'mlp.I'")
    if int(index) >= len(states[kind]):
        raise UserError(f"layer index {index} out of range: {kind} has {len(states[kind])} entries "
                        f"(0..{len(states[kind]) - 1})")
    return states[kind][int(index)]


def tokens_of(batch):
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def fixed_batches(data, split, n_batches, batch_size, block_size, seed=0, device="cpu"):
    """The same n_batches (x, y) windows of a split every time (own generator): comparable across models."""
    gen = torch.Generator().manual_seed(seed)
    return [data.get_batch(split, batch_size, block_size, gen, device) for _ in range(n_batches)]


def chunk_batches(data, split, n_chunks, batch_size, block_size, seed=0, device="cpu"):
    """n_chunks distinct, non-overlapping block_size chunks of a split, in random order, as (x, y) batches: the
    authors' segments (they sample 512-token chunks of the corpus)."""
    available = (len(data.split(split)) - 1) // block_size
    if available < 1 or n_chunks < 1:
        raise UserError(f"the {split!r} split has {available} chunks of {block_size} tokens; asked for {n_chunks}")
    ix = torch.randperm(available, generator=torch.Generator().manual_seed(seed))[:n_chunks] * block_size
    return [data.batch_at(split, ix[i:i + batch_size], block_size, device) for i in range(0, len(ix), batch_size)]


@contextlib.contextmanager
def eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def layer_dispersion(model, batches):
    """{name: dispersion} for every representation model.hidden_states returns (see layer_names), each the
    within-segment dispersion averaged over all segments (rows) of the batches, as the paper computes it.
    Works on any model exposing hidden_states(idx) (GPT; MTP and CALM give the same dict format)."""
    sums, n_segments = {}, 0
    with eval_mode(model):
        for batch in batches:
            states = model.hidden_states(tokens_of(batch))
            for name in layer_names(states):
                sums[name] = sums.get(name, 0.0) + dispersion(pick(states, name)).sum().item()  # (B,) summed
            n_segments += tokens_of(batch).size(0)
    if n_segments == 0:
        raise UserError("layer_dispersion needs at least one batch")
    return {name: s / n_segments for name, s in sums.items()}


# ----------------------------------------------------------------------------- dispersion vs perplexity

def scored_segments(model, batches, layers=("final",)):
    """Per segment (row): mean next-token NLL (n,), {layer: dispersion of its token states (n,)} for each of
    `layers` (None: every representation), and the number of scored targets (n,) (targets -1, padding, skipped).
    Needs a GPT-like model (lm_head on 'final')."""
    nlls, disps, counts = [], {}, []
    with eval_mode(model):
        for x, y in batches:
            states = model.hidden_states(x)
            logits = model.lm_head(states["final"])                                     # (B, T, V)
            nll = F.cross_entropy(logits.float().transpose(1, 2), y, ignore_index=-1, reduction="none")  # (B, T)
            n = (y != -1).sum(1)                                                        # (B,)
            nlls.append(nll.sum(1) / n)
            counts.append(n)
            for name in (layer_names(states) if layers is None else layers):
                disps.setdefault(name, []).append(dispersion(pick(states, name)))      # (B,)
    if not nlls:
        raise UserError("segment statistics need at least one batch")
    return torch.cat(nlls), {k: torch.cat(v) for k, v in disps.items()}, torch.cat(counts)


def perplexity_groups(ppl, group_size, n_groups=None):
    """The authors' binning (step2_group_and_sample.py): sort segments by perplexity, cut into consecutive groups
    of group_size (an incomplete last group is dropped), then keep the groups whose mean perplexity is nearest to
    n_groups evenly spaced values between the lowest and the highest group mean (uniform in perplexity; a group
    nearest to two values is kept once). Returns the segment indices of the kept groups (G, group_size)."""
    if group_size < 1 or len(ppl) < group_size:
        raise UserError(f"group_size must be between 1 and the number of segments ({len(ppl)}), got {group_size}")
    ppl = torch.as_tensor(ppl, dtype=torch.float64)
    n = len(ppl) // group_size * group_size
    groups = ppl.argsort()[:n].view(-1, group_size)                                     # (all groups, group_size)
    if n_groups is None or n_groups >= len(groups):
        return groups
    means = ppl[groups].mean(1)                                                         # ascending
    targets = torch.linspace(means[0].item(), means[-1].item(), n_groups, dtype=torch.float64)
    nearest = (means[None, :] - targets[:, None]).abs().argmin(1)                       # (n_groups,)
    return groups[nearest.unique()]


def layer_correlations(model, batches, group_size, n_groups=None, layers=None):
    """The paper's layer-wise figure: for each representation (every layer and sub-layer unless `layers` is
    given), Spearman(group mean dispersion, group mean perplexity) over the perplexity-sampled segment groups.
    Returns ({layer: spearman}, group mean perplexities)."""
    nll, disps, _ = scored_segments(model, batches, layers)
    groups = perplexity_groups(nll.exp(), group_size, n_groups)
    g_ppl = nll.exp()[groups].mean(1)
    return {name: spearman(d[groups].mean(1), g_ppl) for name, d in disps.items()}, g_ppl


def perplexity_and_dispersion(model, batches, layer="final"):
    """One number each for a model (a checkpoint): perplexity over all tokens of the batches and the mean
    within-segment dispersion at `layer`. Across checkpoints or model sizes, the paper predicts the one with
    the higher dispersion to have the lower perplexity."""
    nll, disp, n = scored_segments(model, batches, [layer])
    keep = n > 0
    mean_nll = (nll[keep] * n[keep]).sum() / n.sum()                                    # mean over all tokens
    return {"ppl": mean_nll.exp().item(), "disp": disp[layer].mean().item()}


# ----------------------------------------------------------------------------- application 2: dispersion gap

def output_matrix(model):
    """The (V, d) output (unembedding) matrix: one row per token (tied to the input embedding in our GPT)."""
    head = getattr(model, "lm_head", None) or getattr(getattr(model, "trunk", None), "lm_head", None)  # GPT, MTP
    if head is None:
        raise UserError(f"{type(model).__name__} has no output (unembedding) matrix: the dispersion gap needs one")
    return head.weight


def token_set(tokens, vocab_size, what):
    ids = sorted({int(t) for t in (tokens.flatten().tolist() if torch.is_tensor(tokens) else tokens)})
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise UserError(f"{what} token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})")
    return ids


def dispersion_gap(model, task_tokens, reference_tokens):
    """App. 2, model selection without labels: G = within(T) + between(T, T') (a sum, not a difference), over the
    tokens' own vectors, the rows of the output matrix: no text, no forward pass. T = task tokens (for arithmetic:
    digits and operators), T' = everyday tokens; within = D(W[T]), eq. (D); between = D(W[T], W[T']), eq. (X).
    Duplicates count once; a token in both sets belongs to T (it is left out of T'). Larger G predicts the better
    model for the task, among checkpoints of one family."""
    W = output_matrix(model).detach()                                                   # (V, d)
    task = token_set(task_tokens, W.size(0), "task")
    ref = [t for t in token_set(reference_tokens, W.size(0), "reference") if t not in set(task)]
    if len(task) < 2:
        raise UserError(f"the dispersion gap needs at least two distinct task tokens, got {len(task)}")
    if not ref:
        raise UserError("the reference tokens are empty or all task tokens: the gap needs everyday tokens outside T")
    within, between = dispersion(W[task]).item(), cross_dispersion(W[task], W[ref]).item()
    return {"within": within, "between": between, "gap": within + between}


# ----------------------------------------------------------------------------- application 3: kNN-LM

def build_datastore(model, batches, layer):
    """kNN-LM datastore: key = representation `layer` of the context x[:t+1], value = the next token y[t].
    Returns (keys (N, d) float32, values (N,) int64)."""
    keys, values = [], []
    with eval_mode(model):
        for x, y in batches:
            h = pick(model.hidden_states(x), layer)                                     # (B, T, d)
            keep = y.reshape(-1) != -1                                                  # padding has no next token
            keys.append(h.reshape(-1, h.size(-1))[keep].float())
            values.append(y.reshape(-1)[keep])
    if not keys or sum(len(k) for k in keys) == 0:
        raise UserError("empty datastore: build_datastore needs at least one non-empty batch")
    return torch.cat(keys), torch.cat(values)


def knn_search(queries, keys, k, chunk=512):
    """Squared L2 distances and indices of the k nearest keys of every query: (M, k), (M, k). Brute force."""
    if len(keys) == 0:
        raise UserError("empty datastore: nothing to search")
    k = min(k, len(keys))
    key_sq = keys.pow(2).sum(1)                                                         # (N,)
    dists, idxs = [], []
    for q in queries.split(chunk):
        d2 = (q.pow(2).sum(1, keepdim=True) - 2 * q @ keys.T + key_sq).clamp_min(0)     # (m, N) |q - k|^2
        d, i = d2.topk(k, dim=1, largest=False)
        dists.append(d)
        idxs.append(i)
    return torch.cat(dists), torch.cat(idxs)


def knn_neighbours(model, batches, datastore, layer, k=16):
    """For every scored target y of the batches (targets -1 skipped), with the query the representation `layer`
    (the one the datastore keys come from): the squared distances to its k nearest keys (M, k), whether each
    neighbour's value is y (M, k), and the LM's log p_LM(y) (M,)."""
    keys, values = datastore
    dists, hits, lm = [], [], []
    with eval_mode(model):
        for x, y in batches:
            states = model.hidden_states(x)
            keep, target = y.flatten() != -1, y.flatten()[y.flatten() != -1]           # padding is not scored
            logits = model.lm_head(states["final"]).flatten(0, 1)[keep].float()       # (M, V)
            lm.append(-F.cross_entropy(logits, target, reduction="none"))             # log p_LM(y)
            q = pick(states, layer)
            d, i = knn_search(q.reshape(-1, q.size(-1))[keep].float(), keys, k)
            dists.append(d)
            hits.append(values[i] == target[:, None])
    if not lm:
        raise UserError("the kNN-LM needs at least one evaluation batch")
    return torch.cat(dists), torch.cat(hits), torch.cat(lm)


def knn_mix_perplexity(neighbours, weight=0.25, temperature=1.0):
    """Perplexity of p(y) = weight * p_kNN(y) + (1 - weight) * p_LM(y), p_kNN(y) = sum over the neighbours whose
    value is y of softmax_j(-|q - key_j|^2 / temperature) (Khandelwal et al. 2020), from knn_neighbours."""
    if not 0 <= weight <= 1:
        raise UserError(f"kNN-LM interpolation weight must be in [0, 1], got {weight}")
    if temperature <= 0:
        raise UserError(f"kNN-LM needs temperature > 0, got {temperature}")
    dist, hit, lm = neighbours
    log_w, log_1mw = torch.tensor([weight, 1 - weight], dtype=torch.float64).log()     # log 0 = -inf is fine
    knn = (torch.softmax(-dist / temperature, dim=1) * hit).sum(1).double().log()      # log p_kNN(y), (M,)
    return math.exp(-torch.logaddexp(log_w + knn, log_1mw + lm.double()).mean().item())


def knn_lm_perplexity(model, batches, datastore, layer, weight=0.25, k=16, temperature=1.0):
    """kNN-LM perplexity over the batches' tokens with keys and queries from `layer`. weight = 0 gives the LM's
    own perplexity; the paper predicts the best key layer is the most dispersed one (choose_layer)."""
    if k < 1:
        raise UserError(f"kNN-LM needs k >= 1, got {k}")
    return knn_mix_perplexity(knn_neighbours(model, batches, datastore, layer, k), weight, temperature)


def choose_layer(profile, candidates=None):
    """The paper's layer selector: the candidate representation with the highest dispersion in a
    layer_dispersion profile (no kNN-LM evaluation per layer needed)."""
    names = list(candidates) if candidates is not None else list(profile)
    missing = [n for n in names if n not in profile]
    if missing or not names:
        raise UserError(f"choose_layer: {missing or 'no candidates'} not in the profile")
    return max(names, key=lambda n: profile[n])


# ----------------------------------------------------------------------------- the training objective

SCOPES = ("batch", "sequence", "cross_domain")


def aux_loss(h, scope="batch", domains=None):
    """eq. (L): L_aux = -D of the final hidden states h (B, T, d): one set of B*T vectors ('batch'), one per row
    ('sequence'), or eq. (XD) the pairs of rows from different domains only ('cross_domain', domains (B,))."""
    if scope not in SCOPES:
        raise UserError(f"the dispersion scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    if scope == "cross_domain":
        if domains is None:
            raise UserError("--dispersion_scope cross_domain needs batches with domain labels (a mixed dataset A+B)")
        return -between_domain_dispersion(h, domains)
    sets = h.reshape(1, -1, h.size(-1)) if scope == "batch" else h                    # (1, B*T, d) or (B, T, d)
    return -dispersion(sets).mean()


def dispersion_loss(model, x, y, weight, scope="batch"):
    """eq. (L): L = L_CE + weight * L_aux on a GPT. weight = 0 is exactly next-token prediction (L_aux is then
    only measured, with no gradient). Returns (L, L_CE, L_aux), the last two detached."""
    h = model.body(model.embed(x))                                                     # (B, T, d) = ln_f(last)
    logits = model.lm_head(h)                                                          # (B, T, V)
    ce = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), ignore_index=-1)  # GPT.forward's loss
    with torch.set_grad_enabled(weight > 0 and torch.is_grad_enabled()):
        aux = aux_loss(h, scope, getattr(x, "domains", None))                          # labels: data.py, A+B data
    loss = ce + weight * aux if weight > 0 else ce
    return loss, ce.detach(), aux.detach()
