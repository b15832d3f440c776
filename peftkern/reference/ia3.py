"""IA3 linear in plain PyTorch.

`ia3_linear` is peft's own computation (peft/tuners/ia3/layer.py, Linear.forward), used as the test
oracle (in fp64) and as "torch in the same dtype". `ia3_linear_fwd` / `ia3_linear_bwd` are the torch
backend of the op: the same explicit forward and backward the kernels implement.

What backward keeps (see ops/ia3.py): the output case saves the output y itself and rebuilds
Z = xWᵀ + b as y / l; the feed-forward case saves x.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ia3_linear(x, weight, bias, ia3_l, feedforward=False):
    """peft's IA3 Linear: the product is taken in ia3_l's precision, the result cast to x's dtype."""
    compute_dtype = torch.promote_types(x.dtype, ia3_l.dtype)
    if feedforward:
        return F.linear((x.to(compute_dtype) * ia3_l.to(compute_dtype)).to(x.dtype), weight, bias)
    z = F.linear(x, weight, bias)
    return (z.to(compute_dtype) * ia3_l.to(compute_dtype)).to(z.dtype)


def ia3_linear_fwd(x2d, weight, bias, ia3_l, feedforward):
    return ia3_linear(x2d, weight, bias, ia3_l, feedforward)


def ia3_linear_bwd(dy, saved, weight, ia3_l, feedforward, need_dx, need_dl):
    """Returns (dx or None, dl or None).

    Output case (saved = y):   dx = (dy ⊙ l) W,   dl = Σ_m dy ⊙ y / l.
    Feed-forward (saved = x):  g = dy W,  dx = g ⊙ l,  dl = Σ_m g ⊙ x.
    """
    lf = ia3_l.float()
    if feedforward:
        g = (dy @ weight).float()
        dx = (g * lf).to(dy.dtype) if need_dx else None
        dl = (g * saved.float()).sum(0).to(ia3_l.dtype) if need_dl else None
        return dx, dl
    dx = (dy.float() * lf).to(dy.dtype) @ weight if need_dx else None
    dl = ((dy.float() * saved.float()).sum(0) / lf).to(ia3_l.dtype) if need_dl else None
    return dx, dl
