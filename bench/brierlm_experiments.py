"""Measurements behind tutorials/brierlm.ipynb (not the metric itself: that is brierlm.py)."""
import numpy as np
import torch
import torch.nn.functional as F

import brierlm


@torch.no_grad()
def temperature_sweep(model, data, args, temperatures, n_batches=10, batch_size=16, seed=0, split="val"):
    """Why accuracy is not a proper score: scale a token model's logits by 1/T and measure, exactly from its
    probabilities, the accuracy of a sample (E 1{x=y} = P_T(y)), the Brier-1 score 2 P_T(y) - sum P_T^2 and the
    cross-entropy. Sharpening (T < 1) raises sample accuracy; the proper scores are best near the model's own
    (T = 1) distribution. Returns {T: {'sample_acc', 'brier1', 'cross_entropy'}}."""
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    batches = [data.get_batch(split, batch_size, args.block_size, gen, device) for _ in range(n_batches)]
    logits = [model(x)[0].flatten(0, 1).float() for x, _ in batches]  # (B*T, V) each
    ys = [y.flatten() for _, y in batches]
    out = {}
    for T in temperatures:
        acc, b1, ce = [], [], []
        for lg, y in zip(logits, ys):
            p = F.softmax(lg / T, -1)
            acc.append(p.gather(1, y.view(-1, 1)).mean().item())
            b1.append(brierlm.exact_brier1(lg / T, y).mean().item())
            ce.append(F.cross_entropy(lg / T, y).item())
        out[T] = dict(sample_acc=float(np.mean(acc)), brier1=float(np.mean(b1)), cross_entropy=float(np.mean(ce)))
    return out
