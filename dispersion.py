"""Representation dispersion: Li, Li, Livescu & Zhou, "On the Predictive Power of Representation Dispersion in
Language Models" (arXiv 2506.24106, 2025), as a metric, a training objective and a layer selector.

Paper (as numbered in the paper note) -> code; the equation tags are the ones the comments below cite
  (D)     dispersion D = 1/(N(N-1)) sum_{i!=j} (1 - cos(h_i, h_j))       dispersion(h): O(N*d) through the sum of
          = 1 - (|S|^2 - N) / (N(N-1)),  S = sum_i h_i/|h_i|              unit vectors, not the O(N^2) matrix
  (X)     between-set version 1/(N M) sum_{i,j} (1 - cos(a_i, b_j))      cross_dispersion(a, b)
  Find.   dispersion vs perplexity: per segment, across checkpoints       segment_stats, group_by_perplexity,
                                                                          perplexity_and_dispersion, correlation
  Find.   the profile over every layer and attention / MLP sub-layer      layer_dispersion (any model exposing
                                                                          hidden_states(idx): GPT, MTP, CALM)
  App. 2  the dispersion gap for model selection                         dispersion_gap
  App. 3  kNN-LM (Khandelwal et al. 2020) keys from layer l, layer choice build_datastore, knn_lm_perplexity,
          by maximum dispersion                                           choose_layer
  (L)     push-away training L = L_CE + lambda * L_aux, L_aux = -D        OBJECTIVES['dispersion'] (train.py)

What is embedded (checked against the authors' analysis code, yanhong-lbh/rep_dispersion, prerprocess.py and
step3_compute_dispersion_and_plot.py): text is cut into fixed-length segments; a segment's representation set is
the hidden state of EVERY token of the segment at the chosen layer (default the last one, after the final norm,
i.e. Hugging Face's hidden_states[-1] = our 'final'), with no pooling; D is computed within each segment and averaged
over segments. layer_dispersion and the evaluation below do exactly that with one segment per (B, T) window row.
The authors' repository has no training code, so the auxiliary loss follows the note: all B*T final-layer token
states of the batch form ONE set (--dispersion_scope batch); --dispersion_scope sequence uses one set per window.
Zero vectors have no direction (cosine undefined): every function here raises UserError on one, none drops it.
"""
import contextlib
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gpt import GPT, UserError


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


# ----------------------------------------------------------------------------- representations of any model

def layer_names(states):
    """Every representation in a hidden_states dict: layers.0 (embeddings) .. layers.L, attn.i, mlp.i, final."""
    names = [f"{kind}.{i}" for kind in ("layers", "attn", "mlp") for i in range(len(states.get(kind, [])))]
    return names + (["final"] if "final" in states else [])


def pick(states, layer):
    """The (B, T, d) tensor called `layer` ('final', 'layers.3', 'attn.0', 'mlp.1') in a hidden_states dict."""
    if layer == "final" and "final" in states:
        return states["final"]
    kind, _, index = str(layer).partition(".")
    if kind not in ("layers", "attn", "mlp") or kind not in states or not index.isdigit():
        raise UserError(f"unknown layer {layer!r}: use 'final', 'layers.I', 'attn.I' or 'mlp.I'")
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


# ----------------------------------------------------------------------------- application (a): vs perplexity

def segment_stats(model, batches, layer="final"):
    """Per segment (row): mean next-token NLL and dispersion of its token states at `layer`. The paper's main
    analysis unit: one model, many segments; lower-perplexity segments are predicted to be more dispersed.
    Returns (nll (n,), disp (n,)); perplexity = nll.exp(). Needs a GPT-like model (lm_head on 'final')."""
    return scored_segments(model, batches, layer)[:2]


def scored_segments(model, batches, layer="final"):
    """segment_stats plus the number of scored targets per row (targets -1, padding, are skipped)."""
    nlls, disps, counts = [], [], []
    with eval_mode(model):
        for x, y in batches:
            states = model.hidden_states(x)
            logits = model.lm_head(states["final"])                                     # (B, T, V)
            nll = F.cross_entropy(logits.float().transpose(1, 2), y, ignore_index=-1, reduction="none")  # (B, T)
            n = (y != -1).sum(1)                                                        # (B,)
            nlls.append(nll.sum(1) / n)
            counts.append(n)
            disps.append(dispersion(pick(states, layer)))                             # (B,)
    if not nlls:
        raise UserError("segment statistics need at least one batch")
    return torch.cat(nlls), torch.cat(disps), torch.cat(counts)


def group_by_perplexity(ppl, disp, group_size):
    """The authors' binning: sort segments by perplexity, average consecutive groups of group_size (an incomplete
    last group is dropped). Returns (mean ppl per group, mean dispersion per group)."""
    if group_size < 1 or len(ppl) < group_size:
        raise UserError(f"group_size must be between 1 and the number of segments ({len(ppl)}), got {group_size}")
    order = ppl.argsort()
    n = len(ppl) // group_size * group_size
    return (ppl[order][:n].view(-1, group_size).mean(1), disp[order][:n].view(-1, group_size).mean(1))


def perplexity_and_dispersion(model, batches, layer="final"):
    """One number each for a model (a checkpoint): perplexity over all tokens of the batches and the mean
    within-segment dispersion at `layer`. Across checkpoints or model sizes, the paper predicts the one with
    the higher dispersion to have the lower perplexity."""
    nll, disp, n = scored_segments(model, batches, layer)
    keep = n > 0
    mean_nll = (nll[keep] * n[keep]).sum() / n.sum()                                    # mean over all tokens
    return {"ppl": mean_nll.exp().item(), "disp": disp.mean().item()}


def correlation(xs, ys):
    """Pearson and Spearman (Pearson of the ranks, no tie correction) correlation of two sequences."""
    x, y = torch.as_tensor(xs, dtype=torch.float64), torch.as_tensor(ys, dtype=torch.float64)
    if x.shape != y.shape or x.dim() != 1 or len(x) < 3:
        raise UserError("correlation needs two equally long sequences of at least 3 numbers")

    def pearson(a, b):
        a, b = a - a.mean(), b - b.mean()
        return (a @ b / (a.norm() * b.norm())).item()
    ranks = lambda v: v.argsort().argsort().double()  # noqa: E731
    return {"pearson": pearson(x, y), "spearman": pearson(ranks(x), ranks(y))}


# ----------------------------------------------------------------------------- application (b): dispersion gap

def dispersion_gap(model, task_batches, reference_batches, layer="final"):
    """Model selection without labels. All token states (at `layer`) of task text form one set T, those of
    everyday reference text one set R. within = D(T), eq. (D); between = D(T, R), eq. (X);
    gap = between - within: how far the task's representations sit from everyday text relative to their own
    spread. Compared across candidate models on the same texts, a larger gap predicts better task performance
    (our reading of the paper's application; the note flags the published formula as garbled)."""
    def token_states(batches):
        with eval_mode(model):
            hs = [pick(model.hidden_states(tokens_of(b)), layer) for b in batches]
        if not hs:
            raise UserError("dispersion_gap needs at least one task batch and one reference batch")
        return torch.cat([h.reshape(-1, h.size(-1)) for h in hs])      # (N, d)
    task, ref = token_states(task_batches), token_states(reference_batches)
    within, between = dispersion(task).item(), cross_dispersion(task, ref).item()
    return {"within": within, "between": between, "gap": between - within}


# ----------------------------------------------------------------------------- application (c): kNN-LM

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


def knn_log_prob(queries, targets, datastore, k=16, temperature=1.0):
    """log p_kNN(target | query) (M,): p_kNN(y) = sum over the k neighbours whose value is y of
    softmax_j(-|q - key_j|^2 / temperature) (Khandelwal et al. 2020). -inf when no neighbour predicts y."""
    keys, values = datastore
    dist, idx = knn_search(queries.float(), keys, k)
    weights = torch.softmax(-dist / temperature, dim=1)                                 # (M, k)
    hit = values[idx] == targets.unsqueeze(1)                                           # (M, k)
    return (weights * hit).sum(1).log()


def knn_lm_perplexity(model, batches, datastore, layer, weight=0.25, k=16, temperature=1.0):
    """Perplexity of the kNN-LM p(y) = weight * p_kNN(y) + (1 - weight) * p_LM(y) over the batches' tokens, with
    the query the representation `layer` (the same one the datastore keys were built from). weight = 0 gives
    the LM's own perplexity; the paper predicts the best key layer is the most dispersed one (choose_layer)."""
    if not 0 <= weight <= 1:
        raise UserError(f"kNN-LM interpolation weight must be in [0, 1], got {weight}")
    if temperature <= 0 or k < 1:
        raise UserError(f"kNN-LM needs k >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    log_w, log_1mw = torch.tensor([weight, 1 - weight], dtype=torch.float64).log()     # log 0 = -inf is fine
    total, count = 0.0, 0
    with eval_mode(model):
        for x, y in batches:
            states = model.hidden_states(x)
            logits = model.lm_head(states["final"])                                     # (B, T, V)
            keep = y.flatten() != -1                                                    # padding is not scored
            lm = -F.cross_entropy(logits.flatten(0, 1)[keep].float(), y.flatten()[keep], reduction="none")  # log p_LM
            q = pick(states, layer)
            knn = knn_log_prob(q.reshape(-1, q.size(-1))[keep], y.flatten()[keep], datastore, k, temperature)
            mix = torch.logaddexp(log_w + knn.double(), log_1mw + lm.double())         # log of the interpolation
            total -= mix.sum().item()
            count += mix.numel()
    if count == 0:
        raise UserError("knn_lm_perplexity needs at least one evaluation batch")
    return math.exp(total / count)


def choose_layer(profile, candidates=None):
    """The paper's layer selector: the candidate representation with the highest dispersion in a
    layer_dispersion profile (no kNN-LM evaluation per layer needed)."""
    names = list(candidates) if candidates is not None else list(profile)
    missing = [n for n in names if n not in profile]
    if missing or not names:
        raise UserError(f"choose_layer: {missing or 'no candidates'} not in the profile")
    return max(names, key=lambda n: profile[n])


def knn_layer_sweep(model, store_batches, eval_batches, layers, **knn_kwargs):
    """{layer: kNN-LM perplexity} with the datastore keyed by each layer in turn (what choose_layer avoids)."""
    return {layer: knn_lm_perplexity(model, eval_batches, build_datastore(model, store_batches, layer), layer,
                                     **knn_kwargs) for layer in layers}


# ----------------------------------------------------------------------------- the training objective

@dataclass
class DispersionConfig:
    dispersion_weight: float = 0.1     # lambda in L = L_CE + lambda * L_aux; 0 is exactly next-token prediction
    dispersion_scope: str = "batch"    # 'batch': all B*T final states form one set (the note); 'sequence': per window


def check_config(args):
    lam = args.dispersion_weight
    if not math.isfinite(lam) or lam < 0:
        raise UserError(f"--dispersion_weight must be a finite number >= 0, got {lam}")
    if args.dispersion_scope not in ("batch", "sequence"):
        raise UserError(f"--dispersion_scope must be 'batch' or 'sequence', got {args.dispersion_scope!r}")


def build(gcfg, args, data):
    check_config(args)
    return GPT(gcfg)  # a plain GPT: the objective changes the loss only


def aux_loss(h, scope="batch"):
    """eq. (L): L_aux = -D of the final hidden states h (B, T, d), one set of B*T vectors or one per row."""
    sets = h.reshape(1, -1, h.size(-1)) if scope == "batch" else h                    # (1, B*T, d) or (B, T, d)
    return -dispersion(sets).mean()


def dispersion_loss(model, x, y, args):
    h = model.body(model.embed(x))                                                     # (B, T, d) = ln_f(last)
    logits = model.lm_head(h)                                                          # (B, T, V)
    ce = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), ignore_index=-1)  # GPT.forward's loss
    lam = args.dispersion_weight
    if lam == 0:  # exactly NTP: the auxiliary term is only measured, never in the graph
        with torch.no_grad():
            aux = aux_loss(h, args.dispersion_scope)
        loss = ce
    else:
        aux = aux_loss(h, args.dispersion_scope)
        loss = ce + lam * aux                                                          # eq. (L)
    disp = -aux.item()
    if model.training:  # running (exponential moving) average of the training batches' dispersion
        prev = getattr(model, "running_dispersion", None)
        model.running_dispersion = disp if prev is None else 0.9 * prev + 0.1 * disp
    return loss, {"ce": ce.item(), "aux": aux.item(), "disp_run": getattr(model, "running_dispersion", disp)}


def evaluate(model, data, args):
    """Perplexity (cross-entropy only) and last-layer dispersion on val (val_ppl, val_disp), and on every per-domain
    'val:<domain>' split of a cross-domain dataset (val_ppl_<domain>, e.g. --dataset shakespeare+pystdlib;
    a file:PATH domain is named by the file's stem)."""
    out = {}
    for split in ["val"] + sorted(s for s in data.splits if s.startswith("val:")):
        batches = fixed_batches(data, split, args.eval_iters, args.batch_size, args.block_size, args.seed + 1,
                                args.device)
        stats = perplexity_and_dispersion(model, batches)
        domain = split[len("val:"):]
        suffix = "_" + (os.path.splitext(os.path.basename(domain))[0] if domain.startswith("file:") else domain) \
            if domain else ""
        out[f"val_ppl{suffix}"], out[f"val_disp{suffix}"] = stats["ppl"], stats["disp"]
    return out


def generate(model, idx, args, generator=None):
    from train import ntp_generate  # a plain GPT samples like NTP
    return ntp_generate(model, idx, args, generator)


OBJECTIVES = {"dispersion": dict(config=DispersionConfig, build=build, loss=dispersion_loss, evaluate=evaluate,
                                 generate=generate)}


# ----------------------------------------------------------------------------- experiment drivers (tutorial)

def run_training(argv, quiet=True):
    """train.main(argv), its printout captured when quiet; returns the checkpoint path. UserError if it fails."""
    import train
    train.run_quietly(argv) if quiet else train.main(argv)
    return os.path.join(argv[argv.index("--out_dir") + 1], "ckpt.pt")


def train_with_snapshots(argv, snapshot_iters, eval_batches, layer="final", device="cpu"):
    """Train one run in stages (train.py --resume), measuring perplexity and dispersion of the checkpoint at
    every iteration of snapshot_iters, on the same eval batches. The lr schedule spans the whole run.
    Returns [{'iter', 'ppl', 'disp', 'model'}] (model: the checkpoint at that iteration, eval mode)."""
    from sample import load_model
    final, rows = max(snapshot_iters), []
    for n, it in enumerate(sorted(snapshot_iters)):
        stage = argv + ["--max_iters", str(it), "--lr_decay_iters", str(final)] + (["--resume"] if n else
                                                                                 ["--overwrite"])
        model = load_model(run_training(stage), device)[0]
        rows.append(dict(iter=it, model=model, **perplexity_and_dispersion(model, eval_batches, layer)))
    return rows
