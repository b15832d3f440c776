"""DoRA linear in plain PyTorch, as peft 0.21 computes it (peft/tuners/lora/dora.py, variants.py).

peft's DoRA layer, one active adapter, x already in the adapter dtype:
    n = ||W + s·B A||_row                      (per output row, DETACHED: no gradient flows through it)
    g = m / n                                  (m: lora_magnitude_vector, (out,))
    no dropout (or eval):  y = base(x) + (g - 1) ⊙ (base(x) - b) + g ⊙ s·(x Aᵀ) Bᵀ   = g ⊙ (x Wᵀ + s·(x Aᵀ)Bᵀ) + b
    dropout (training):    y = x Wᵀ + b + (g - 1) ⊙ (x_d Wᵀ) + g ⊙ s·(x_d Aᵀ) Bᵀ,  x_d = dropout(x)
The second form with x_d = x is the first, so one expression serves both.

`dora_linear` is the readable oracle (autograd does the gradients); `weight_norm` computes n without
materialising B A (out × in); `dora_linear_fwd` / `dora_linear_bwd` are the op's explicit forward and backward
(the LoRA part through the LoRA op's backend functions, `lora_fwd` / `lora_bwd`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .lora import _keep


def dora_linear(x, weight, bias, lora_A, lora_B, magnitude, scaling, keep=None, dropout_p=0.0):
    """peft's expression, with an explicit keep-mask for dropout (None: no dropout). The norm is taken of the
    materialised W + s·B A, as peft takes it, and detached."""
    cd = torch.promote_types(x.dtype, lora_A.dtype)
    xc, w = x.to(cd), weight.to(cd)
    xd = xc if keep is None else xc * keep.to(cd) / (1.0 - dropout_p)
    delta = (lora_B.to(cd) @ lora_A.to(cd)).detach()
    n = torch.linalg.norm(w.detach() + scaling * delta, dim=1).detach()
    g = magnitude / n
    lora = F.linear(F.linear(xd, lora_A.to(cd)), lora_B.to(cd))
    base = F.linear(x, weight, bias)
    # peft's branch without dropout takes base_result = result - bias (the base's dtype), its dropout branch
    # F.linear(x_d, W) (the adapters' dtype)
    no_bias = base if bias is None else base - bias
    base_result = no_bias if keep is None else F.linear(xd, w)
    y = base + (g - 1) * base_result + g * lora * scaling
    return y.to(x.dtype)


def weight_sq_norm(weight: torch.Tensor) -> torch.Tensor:
    """||W_o||² per output row, fp32."""
    w = weight.float()
    return (w * w).sum(1)


def weight_norm(weight, lora_A, lora_B, scaling, w_sq=None) -> torch.Tensor:
    """||W + s·B A||_row in fp32, without forming B A:
    ||W_o||² + 2s Σ_r B[o,r] (W Aᵀ)[o,r] + s² Σ_{r,r'} B[o,r] (A Aᵀ)[r,r'] B[o,r']."""
    with torch.no_grad():
        w, a, b = weight.float(), lora_A.float(), lora_B.float()
        if w_sq is None:
            w_sq = (w * w).sum(1)
        wa = w @ a.t()  # (out, r)
        bg = b @ (a @ a.t())  # (out, r)
        sq = w_sq + (2.0 * scaling) * (b * wa).sum(1) + (scaling * scaling) * (bg * b).sum(1)
        return sq.clamp_min_(0.0).sqrt_()


def _f32(t):
    return t if t.dtype == torch.float32 else t.float()


def dora_linear_fwd(x2d, weight, bias, lora_A, lora_B, g, scaling, p, seed, lora_fwd, scale=None):
    """Returns (y, t, u): t = x_d Aᵀ (fp32, (M, r)) and u = x_d Wᵀ + s·t Bᵀ (x's dtype, (M, out)), both saved for
    backward (dm = Σ_rows dy ⊙ u / n). Without dropout y = g ⊙ u + b, with u from the fused LoRA forward (and
    `scale(u, g, bias, dtype)`, a one-pass kernel, where given); with dropout y = (x - x_d) Wᵀ + b + g ⊙ u."""
    if p == 0.0:
        u, t = lora_fwd(x2d, weight, None, lora_A, lora_B, scaling, 0.0, 0)
        if scale is not None:
            return scale(u, g, bias, x2d.dtype), t, u
        y = u.float() * g
        if bias is not None:
            y += bias.float()
        return y.to(x2d.dtype), t, u
    keep = _keep(x2d.shape, x2d.device, p, seed)
    if x2d.dtype == lora_A.dtype:
        xd = x2d * keep / (1.0 - p)
        u, t = lora_fwd(xd, weight, None, lora_A, lora_B, scaling, 0.0, 0)
        y = F.linear(x2d - xd, weight, bias).float().addcmul_(u.float(), g)
        return y.to(x2d.dtype), t, u
    # fp32 adapters on a half base: peft's dropout branch runs x_d Wᵀ and the LoRA term in fp32 (u is fp32 here)
    xd = _xd32(x2d, keep, p)
    zw = F.linear(xd, weight.float())
    t = xd @ _f32(lora_A).t()
    lo = t @ _f32(lora_B).t()
    u = zw + scaling * lo
    y = F.linear(x2d, weight, bias).float() + (g - 1) * zw + (g * scaling) * lo
    return y.to(x2d.dtype), t, u


def _xd32(x2d, keep, p):
    return x2d.float() * keep / (1.0 - p)


def dora_linear_bwd(dy, x2d, weight, lora_A, lora_B, g, n, t, u, scaling, p, seed, need_dx, need_ab, need_m,
                    lora_bwd, scale_bwd=None):
    """Returns (dx or None, dA or None, dB or None, dm or None) for y as in dora_linear_fwd.
    With dy' = g ⊙ dy: dA, dB are LoRA's for dy' (on x_d); dm = Σ_rows dy ⊙ u / n;
    dx = dy' W + s(dy' B)A without dropout, and dy W + mask ⊙ (dy' W + s(dy' B)A - dy W)/(1-p) with it.
    `scale_bwd(dy, u, g)` -> (dy', Σ_rows dy ⊙ u), a one-pass kernel, where given."""
    dyf = _f32(dy)
    if scale_bwd is not None:
        dyg, col = scale_bwd(dy, u, g)
        dm = col.div_(n) if need_m else None
    else:
        dm = (dyf * _f32(u)).sum(0).div_(n) if need_m else None
        dyg = (dyf * g).to(dy.dtype)
    keep = None
    xd = x2d
    if p != 0.0:
        keep = _keep(x2d.shape, x2d.device, p, seed)
        if x2d.dtype != lora_A.dtype:  # fp32 adapters on a half base: peft's dropout branch in fp32
            return _bwd_mixed_dropout(dy, dyf, x2d, weight, lora_A, lora_B, g, t, scaling, p, keep, need_dx,
                                      need_ab, dm)
        xd = x2d * keep / (1.0 - p)
    # g ⊙ dy rounds to dy's dtype for the GEMM with W (peft rounds its base-path gradient so too); with fp32
    # adapters on a half base peft's LoRA path runs in fp32, so dA and dB are then taken from the fp32 g ⊙ dy.
    fused_ab = need_ab and dy.dtype == lora_A.dtype
    dx, d_a, d_b = (None, None, None)
    if need_dx or fused_ab:
        dx, d_a, d_b = lora_bwd(dyg, xd, weight, lora_A, lora_B, t, scaling, 0.0, 0, need_dx, fused_ab)
    if need_ab and not fused_ab:
        dyg32 = dyf * g
        dt = (dyg32 @ _f32(lora_B)).mul_(scaling)
        d_a = (dt.t() @ _f32(xd)).to(lora_A.dtype)
        d_b = (dyg32.t() @ t).mul_(scaling).to(lora_B.dtype)
    if need_dx and keep is not None:
        base = torch.mm(dy, weight).float()
        dxf = dx.float().sub_(base).mul_(keep).mul_(1.0 / (1.0 - p)).add_(base)
        dx = dxf.to(x2d.dtype)
    return dx, d_a, d_b, dm


def _bwd_mixed_dropout(dy, dyf, x2d, weight, lora_A, lora_B, g, t, scaling, p, keep, need_dx, need_ab, dm):
    """The backward of the fp32 dropout branch above (plain torch ops, as peft computes it)."""
    dyg = dyf * g
    dt = (dyg @ _f32(lora_B)).mul_(scaling)
    d_a = d_b = dx = None
    if need_ab:
        d_a = (dt.t() @ _xd32(x2d, keep, p)).to(lora_A.dtype)
        d_b = (dyg.t() @ t).mul_(scaling).to(lora_B.dtype)
    if need_dx:
        inner = (dyf * (g - 1)) @ weight.float() + dt @ _f32(lora_A)
        dx = (torch.mm(dy, weight).float() + inner.mul_(keep).mul_(1.0 / (1.0 - p))).to(x2d.dtype)
    return dx, d_a, d_b, dm
