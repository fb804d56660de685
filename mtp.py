"""Multi-token prediction: "Better & Faster Large Language Models via Multi-token Prediction"
(Gloeckle, Youbi Idrissi, Roziere, Lopez-Paz, Synnaeve; ICML 2024; arXiv 2404.19737).

    python train.py --objective mtp --n_future 4                 (--mtp_naive: all heads backpropagated at once)
    python sample.py --ckpt out/mtp/ckpt.pt --speculative --temperature 0
    python train.py --objective mtp --dataset polynomial --block_size 80   (sec. 4 synthetic tasks, see data.py)

Paper -> code
  sec. 2           shared trunk z = f_s(x_<=t), n heads P(x_t+i | x_<=t) = softmax(f_u(f_h_i(z))), i = 1..n:
                   MTP.trunk_hidden (z) and MTP.head_logits (head i, shared final norm f_n and unembedding f_u)
  sec. 2, L_n      L_n = - sum_t sum_i log P(x_t+i | x_<=t): mtp_loss. Heads are SUMMED (as in the paper), each
                   head's term the mean over its positions; positions whose target t+i lies past the window are
                   dropped. With n = 1 this is exactly the next-token loss (tested). So train.py's train_loss /
                   val_loss are sums over n heads; val_loss_h1 is the number to compare with an NTP model's val_loss.
  sec. 2, fig. 2   memory-efficient training: trunk once; then per head forward, loss, backward into z (only one
                   head's (B, T, V) logits alive at a time); then the trunk's backward once: mtp_forward_backward.
                   --mtp_naive computes all n losses, then one backward (n logits tensors alive).
  sec. 3.2         self-speculative decoding (blockwise parallel decoding, Stern et al. 2018): speculative_generate.
  sec. 4           induction and polynomial arithmetic: data.py's synthetic tasks; accuracy in mtp_evaluate.

Parameter budget (the paper's, and its released code's): --n_layer L is the TOTAL number of Transformer blocks.
The shared trunk has L - n blocks; head 1 is block L - n + 1 of an ordinary GPT of L - n + 1 blocks (self.trunk,
so plain next-token decoding is just self.trunk.generate); the n - 1 extra heads are one block each, reading the
same trunk output. L blocks in all, for every n: the heads replace trunk layers, and n = 1 is the NTP GPT.
"""
import sys
import time
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt import GPT, Block, KVCache, UserError, init_gpt2_weights


@dataclass
class MTPConfig:
    n_future: int = 4          # n: tokens predicted at every position (heads); 1 = next-token prediction
    mtp_naive: bool = False    # backpropagate all heads at once (for the memory comparison) instead of one by one


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

def mtp_loss(model, x, y, args):
    """L_n (sec. 2): sum of the n heads' losses, computed one head at a time (no (n, B, T, V) tensor)."""
    z = model.trunk_hidden(x)
    losses = [head_loss(model.head_logits(i, z), y, i) for i in range(model.n_future)]
    return sum(losses), {f"loss_h{i + 1}": l.item() for i, l in enumerate(losses)}


def mtp_forward_backward(model, x, y, args, scale=1.0):
    """Gradients of scale * L_n. Memory-efficient (fig. 2): one trunk forward, each head's forward + backward
    into a detached z (its logits freed before the next head), then one trunk backward with the summed dL/dz."""
    if args.mtp_naive:
        loss, logs = mtp_loss(model, x, y, args)
        (scale * loss).backward()
        return loss.detach(), logs
    z = model.trunk_hidden(x)                       # (B, T, d), graph through the trunk kept
    z_leaf = z.detach().requires_grad_()            # heads backpropagate into here: z_leaf.grad accumulates
    total, logs = 0.0, {}
    for i in range(model.n_future):
        loss_i = head_loss(model.head_logits(i, z_leaf), y, i)
        (scale * loss_i).backward()                 # frees head i's graph (and its logits) now
        total += loss_i.detach()
        logs[f"loss_h{i + 1}"] = loss_i.item()
    z.backward(z_leaf.grad)                         # the trunk, once, with sum_i dL_i/dz
    return total, logs


@torch.no_grad()
def mtp_evaluate(model, data, args):
    """Per-head validation losses val_loss_h1..hn (val_loss_h1 is comparable with an NTP model's val_loss; the
    batches are the ones train.py's val_loss uses), and on the synthetic tasks the accuracy of head 1
    (teacher-forced argmax, see data.TaskDataset.accuracy) on every validation split."""
    device = next(model.parameters()).device
    gen, sums = torch.Generator().manual_seed(args.seed + 1), [0.0] * model.n_future
    for _ in range(args.eval_iters):
        x, y = data.get_batch("val", args.batch_size, args.block_size, gen, device)
        sums = [s + v for s, v in zip(sums, mtp_loss(model, x, y, args)[1].values())]
    out = {f"val_loss_h{i + 1}": s / args.eval_iters for i, s in enumerate(sums)}
    if hasattr(data, "accuracy"):
        for split in data.splits:
            if split != "train":
                out[f"acc_{split.replace(':', '_')}"] = data.accuracy(lambda x: model.trunk(x)[0], split, 500,
                                                                      block_size=args.block_size, device=device)
    return out


# ----------------------------------------------------------------------------- self-speculative decoding (sec. 3.2)

def probabilities(logits, temperature, top_k):
    """What gpt.sample_logits samples from, as probabilities: softmax(logits / T) within the top-k. (..., V)"""
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[..., [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return F.softmax(logits, dim=-1)


@torch.no_grad()
def speculative_generate(model, idx, max_new_tokens, temperature=0.0, top_k=None, generator=None):
    """Decoding with head 1, accelerated by the other heads: (idx (1, T + max_new_tokens), stats).

    State: the KV cache holds every committed token but the last one; `drafts` are heads 2..n's proposals for the
    tokens after it. One forward runs [last token, drafts] (m <= n positions) and gives head 1's distribution
    after each position j, against which draft j+1 is checked; the first rejected draft is replaced by a token of
    head 1 (so every forward emits at least one), the cache is cropped back to the accepted positions, and heads
    2..n at the last accepted position propose the next drafts.
      temperature 0 (sec. 3.2, Stern et al. 2018): accept while the draft equals head 1's argmax; every emitted
        token is head 1's greedy choice given exactly the context plain greedy decoding sees, so the output is
        identical to model.generate(temperature=0), token for token.
      temperature > 0 (speculative sampling, Leviathan et al. 2023; Chen et al. 2023): drafts are sampled from the
        heads' distributions q; a draft x is accepted with probability min(1, p(x) / q(x)), p = head 1's; at a
        rejection the token is drawn from max(0, p - q) renormalised. Each emitted token is then distributed exactly
        as head 1's p (same temperature / top-k), i.e. as model.generate would sample, though not the same tokens.
    Past the context window gpt.generate re-encodes the last block_size tokens for every token; we do the same
    (one token per forward there: drafts cannot be verified in one pass against a sliding window)."""
    if idx.size(0) != 1:
        raise UserError("speculative decoding takes one prompt at a time (batch size 1)")
    if model.n_future < 2:
        raise UserError("speculative decoding needs extra heads to draft: this model has n_future = 1")
    n, bs = model.n_future, model.config.block_size
    if max_new_tokens <= 0:  # nothing to generate: the prompt, like GPT.generate
        return idx, dict(tokens=0, forwards=0, tokens_per_forward=0.0)
    target_len = idx.size(1) + max_new_tokens
    cache, drafts, q, forwards = None, [], None, 0
    draw = lambda probs: int(torch.multinomial(probs, 1, generator=generator))  # noqa: E731
    while idx.size(1) < target_len:
        if cache is None or len(cache) >= bs:  # first step, or the window is full: re-encode (as gpt.generate)
            cache = KVCache(model.n_layer)
            feed, start = idx[:, -bs:], 0
        else:                                   # [last committed token, drafts...], as many as fit and are needed
            m = min(1 + len(drafts), bs - len(cache), target_len - idx.size(1))
            feed, start = torch.cat([idx[:, -1:], torch.tensor([drafts[:m - 1]], dtype=idx.dtype,
                                                                  device=idx.device)], dim=1), len(cache)
        z = model.trunk_hidden(feed, start, cache)                              # (1, m, d)
        h = torch.stack([model.head_hidden(i, z, start, cache)[0] for i in range(n)])  # (n, m, d), KV for all m
        if start == 0:
            h = h[:, -1:]                    # a fresh window: only its last position's predictions are needed
        logits = model.trunk.lm_head(h)      # (n, m, V): every head after every position, one matmul (f_u shared)
        forwards += 1
        fed, k = feed[0].tolist(), 0
        if temperature == 0:
            greedy = logits[0].argmax(-1).tolist()                              # head 1's token after each position
            if start > 0:  # accept draft j + 1 while it equals head 1's choice after position j
                while k < len(fed) - 1 and fed[k + 1] == greedy[k]:
                    k += 1
            last = k if start > 0 else -1                                      # position whose predictions we keep
            free = greedy[last]                                                 # head 1's token there, free
            drafts = logits[1:, last].argmax(-1).tolist()                       # heads 2..n there: next drafts
        else:
            p = probabilities(logits[0], temperature, top_k)                    # (m, V) head 1
            free = None
            if start > 0:
                while k < len(fed) - 1:
                    x, pj, qj = fed[k + 1], p[k], q[k]
                    if torch.rand(1, generator=generator, device=p.device) * qj[x] >= pj[x]:  # reject w.p. 1 - p/q
                        free = draw((pj - qj).clamp(min=0))                     # residual distribution
                        break
                    k += 1
            last = k if start > 0 else -1
            free = draw(p[last]) if free is None else free
            q = probabilities(logits[1:, last], temperature, top_k)             # (n-1, V) proposals of heads 2..n
            drafts = [draw(qi) for qi in q]
        if start > 0:
            cache.crop(start + k + 1)                                          # roll back rejected positions
        new = fed[1:k + 1] + [free]                                            # accepted drafts + head 1's token
        idx = torch.cat([idx, torch.tensor([new], dtype=idx.dtype, device=idx.device)], dim=1)
    new = idx.size(1) - (target_len - max_new_tokens)
    return idx, dict(tokens=new, forwards=forwards, tokens_per_forward=new / forwards)


def speculative_report(model, idx, max_new_tokens, temperature=0.0, top_k=None, generator=None):
    """Speculative vs the cached decoder of gpt.py (same temperature / top-k) on one prompt: output, tokens per
    forward, wall-clock of both, speed-up, and (greedy only) whether the two outputs are identical."""
    t = time.perf_counter()
    out, stats = speculative_generate(model, idx, max_new_tokens, temperature, top_k, generator)
    stats["seconds"] = time.perf_counter() - t
    t = time.perf_counter()
    ref = model.generate(idx, max_new_tokens, temperature, top_k, generator=generator)
    stats["baseline_seconds"] = time.perf_counter() - t
    stats["speedup"] = stats["baseline_seconds"] / stats["seconds"]
    stats["identical"] = bool(torch.equal(out, ref)) if temperature == 0 else None
    return out, stats


def mtp_generate(model, idx, args, generator=None):
    if not getattr(args, "speculative", False):
        return model.generate(idx, args.max_new_tokens, args.temperature, args.top_k, generator=generator)
    if model.n_future < 2:
        raise UserError("--speculative needs extra heads: this checkpoint was trained with --n_future 1")
    out, s = speculative_report(model, idx, args.max_new_tokens, args.temperature, args.top_k, generator)
    check = (f"identical to greedy: {s['identical']}" if args.temperature == 0 else
             "speculative sampling: each token distributed as head 1's")
    print(f"speculative (n={model.n_future}): {s['tokens']} tokens in {s['forwards']} forwards = "
          f"{s['tokens_per_forward']:.2f} tokens/forward | {s['seconds']:.3f}s vs {s['baseline_seconds']:.3f}s "
          f"cached {'greedy' if args.temperature == 0 else 'sampling'} = {s['speedup']:.2f}x | {check}",
          file=sys.stderr)
    return out


def mtp_draw(model, ctx, n_tokens, generator, args):
    """BrierLM's sampler: ancestral sampling with head 1 (the model's next-token distribution)."""
    return model.generate(ctx, n_tokens, temperature=1.0, generator=generator)[:, -n_tokens:]


def mtp_build(gcfg, args, data):
    return MTP(gcfg, args.n_future)


OBJECTIVES = {"mtp": dict(config=MTPConfig, build=mtp_build, loss=mtp_loss, forward_backward=mtp_forward_backward,
                          evaluate=mtp_evaluate, generate=mtp_generate, draw=mtp_draw)}


def speculative_benchmark(model, data, n_prompts=8, prompt_len=32, new_tokens=128, split="val", seed=0,
                          temperature=0.0):
    """Self-speculative vs cached decoding (greedy, or sampling at a temperature) on prompts drawn from a data
    split: accepted tokens per forward (over all prompts, and per prompt), total wall-clock of each, speed-up, and
    (greedy) whether every output was identical to plain greedy decoding."""
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    prompts, _ = data.get_batch(split, n_prompts, prompt_len, gen, device)
    sampler = torch.Generator(device).manual_seed(seed) if temperature > 0 else None
    tokens = forwards = spec_s = greedy_s = 0
    identical, per_prompt = True, []
    for p in prompts:
        _, s = speculative_report(model, p[None], new_tokens, temperature, generator=sampler)
        per_prompt.append(s["tokens_per_forward"])
        tokens, forwards = tokens + s["tokens"], forwards + s["forwards"]
        spec_s, greedy_s = spec_s + s["seconds"], greedy_s + s["baseline_seconds"]
        identical = identical and s["identical"]
    return dict(tokens_per_forward=tokens / max(forwards, 1), speculative_s=spec_s, greedy_s=greedy_s,
                speedup=greedy_s / spec_s, identical=identical, per_prompt=per_prompt)
