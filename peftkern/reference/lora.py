"""LoRA linear in plain PyTorch.

`lora_linear` is the readable composition (autograd does the gradients) used as the test oracle.
`lora_linear_fwd` / `lora_linear_bwd` are the torch backend of the op: the same explicit forward
and backward the kernels implement, with the dropout mask regenerated from the seed, not stored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dropout_keep(shape, p: float, seed: int, device) -> torch.Tensor:
    """Bernoulli(1 - p) keep-mask drawn from a private generator seeded with `seed`."""
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return torch.rand(shape, generator=g, device=device) >= p


def lora_linear(x, weight, bias, lora_A, lora_B, scaling, keep=None, dropout_p=0.0):
    """y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ with an explicit keep-mask (or no dropout)."""
    xd = x if keep is None else x * keep.to(x.dtype) / (1.0 - dropout_p)
    cdt = torch.promote_types(x.dtype, lora_A.dtype)
    lora = F.linear(F.linear(xd.to(cdt), lora_A.to(cdt)), lora_B.to(cdt)) * scaling
    return (F.linear(x, weight, bias) + lora).to(x.dtype)


def _drop(x2d, p, seed):
    if p == 0.0:
        return x2d
    keep = dropout_keep(x2d.shape, p, seed, x2d.device)
    return x2d * keep.to(x2d.dtype) / (1.0 - p)


def lora_linear_fwd(x2d, weight, bias, lora_A, lora_B, scaling, p, seed):
    """Returns (y, t) with t = drop(x) Aᵀ in float32, saved for backward."""
    cdt = torch.promote_types(x2d.dtype, lora_A.dtype)
    t = F.linear(_drop(x2d, p, seed).to(cdt), lora_A.to(cdt)).float()
    lora = F.linear(t.to(cdt), lora_B.to(cdt)) * scaling
    y = (F.linear(x2d, weight, bias) + lora).to(x2d.dtype)
    return y, t


def lora_linear_bwd(dy, x2d, weight, lora_A, lora_B, t, scaling, p, seed, need_dx, need_ab=True):
    """Returns (dx or None, dA or None, dB or None). The dropout mask is drawn once and used for dA and dx."""
    dyf = dy.float()
    dt = (dyf @ lora_B.float()) * scaling
    keep = None if p == 0.0 else dropout_keep(x2d.shape, p, seed, x2d.device).float() / (1.0 - p)
    d_a = d_b = None
    if need_ab:
        d_b = (dyf.t() @ t * scaling).to(lora_B.dtype)
        xd = x2d.float() if keep is None else x2d.float() * keep
        d_a = (dt.t() @ xd).to(lora_A.dtype)
    dx = None
    if need_dx:
        lora_dx = dt @ lora_A.float()
        if keep is not None:
            lora_dx *= keep
        dx = ((dy @ weight).float() + lora_dx).to(x2d.dtype)
    return dx, d_a, d_b
