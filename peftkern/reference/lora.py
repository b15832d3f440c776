"""LoRA linear in plain PyTorch.

`lora_linear` is the readable composition (autograd does the gradients) used as the test oracle.
`lora_linear_fwd` / `lora_linear_bwd` are the torch backend of the op: the same explicit forward
and backward the kernels implement, with the dropout mask regenerated from the seed, not stored.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

# One reseeded generator per thread and device: making one per call costs more than the mask.
_generators = threading.local()


def _generator(device: torch.device) -> torch.Generator:
    gens = _generators.__dict__
    g = gens.get(device)
    if g is None:
        g = gens[device] = torch.Generator(device=device)
    return g


def dropout_keep(shape, p: float, seed: int, device) -> torch.Tensor:
    """Bernoulli(1 - p) keep-mask drawn from a private generator seeded with `seed`."""
    return _keep(shape, torch.device(device), p, seed).bool()


def _keep(shape, device: torch.device, p: float, seed: int) -> torch.Tensor:
    """The bool keep-mask for `seed`: uniform draws >= p, i.e. Bernoulli(1 - p). On the CPU a uniform draw and a
    compare take 2/3 of the time of bernoulli_ (24 vs 36 us for 32 x 172), with two host calls either way."""
    return _uniform(shape, device, seed) >= p


def _uniform(shape, device: torch.device, seed: int) -> torch.Tensor:
    g = _generator(device)
    g.manual_seed(seed)
    return torch.rand(shape, device=device, generator=g)


_zeros: dict = {}  # (device, dtype) -> a 0-dim zero: addmm's ignored input (beta=0), so alpha scales in the same call


def _mm(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha · a b in one call."""
    if alpha == 1.0:
        return torch.mm(a, b)
    key = (a.device, a.dtype)
    zero = _zeros.get(key)
    if zero is None:
        zero = _zeros[key] = torch.zeros((), device=a.device, dtype=a.dtype)
    return torch.addmm(zero, a, b, beta=0, alpha=alpha)


def lora_linear(x, weight, bias, lora_A, lora_B, scaling, keep=None, dropout_p=0.0):
    """y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ with an explicit keep-mask (or no dropout)."""
    xd = x if keep is None else x * keep.to(x.dtype) / (1.0 - dropout_p)
    compute_dtype = torch.promote_types(x.dtype, lora_A.dtype)
    lora = F.linear(F.linear(xd.to(compute_dtype), lora_A.to(compute_dtype)), lora_B.to(compute_dtype)) * scaling
    return (F.linear(x, weight, bias) + lora).to(x.dtype)


_scalars: dict = {}  # (device, value) -> 0-dim fp32 tensor: a Python float argument costs ~1.5 us to wrap per call


def _scalar(device: torch.device, value: float) -> torch.Tensor:
    key = (device, value)
    t = _scalars.get(key)
    if t is None:
        if len(_scalars) > 256:  # scalings and probabilities are per layer: a few values, unless a caller sweeps
            _scalars.clear()
        with torch.inference_mode(False):  # a cached inference tensor could not meet autograd later
            t = _scalars[key] = torch.tensor(value, dtype=torch.float32, device=device)
    return t


def lora_linear_fwd_fp32(x, weight, bias, lora_A, lora_B, scaling, p, seed):
    """The eager torch backend for fp32 x and adapters, in as few host calls as possible. Returns (y, ts, keep):
    y in rows, ts = s' (x * keep) Aᵀ with s' = scaling / (1 - p) (so no product needs an alpha), and keep the bool
    mask `seed` gives (None without dropout), for lora_linear_bwd_fp32."""
    x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    dev = x2d.device
    if p == 0.0:
        keep = None
        ts = F.linear(x2d, lora_A).mul_(_scalar(dev, scaling))
    else:
        keep = _uniform(x2d.shape, dev, seed) >= _scalar(dev, p)  # a 0-dim tensor: no Python float to wrap
        ts = F.linear(x2d * (keep * _scalar(dev, scaling / (1.0 - p))), lora_A)
    return F.linear(x2d, weight, bias).addmm_(ts, lora_B.t()), ts, keep


def lora_linear_bwd_fp32(dy, x2d, weight, lora_A, lora_B, ts, scaling, p, keep, need_dx, need_a, need_b):
    """(dx, dA, dB) of lora_linear_fwd_fp32, each None when not needed. The bool mask is kept (1 byte per element of
    x) and made the fp32 s'·keep once here: one more call than keeping that, 3 bytes less."""
    dt = torch.mm(dy, lora_B)  # the gradient of (x * keep) Aᵀ; without dropout scaled here instead
    if keep is None:
        dt.mul_(_scalar(dy.device, scaling))
    else:
        keep = keep * _scalar(dy.device, scaling / (1.0 - p))
    d_b = torch.mm(dy.t(), ts) if need_b else None
    d_a = torch.mm(dt.t(), x2d if keep is None else x2d * keep) if need_a else None
    dx = None
    if need_dx:
        dx = torch.mm(dt, lora_A)
        if keep is not None:
            dx.mul_(keep)
        dx.addmm_(dy, weight)
    return dx, d_a, d_b


def lora_linear_fwd(x2d, weight, bias, lora_A, lora_B, scaling, p, seed, want_keep=False):
    """Returns (y, t) with t = drop(x) Aᵀ in float32, saved for backward; with want_keep, (y, t, keep) with the
    bool keep-mask (None without dropout) for a backward that takes it instead of drawing it again."""
    keep = None if p == 0.0 else _keep(x2d.shape, x2d.device, p, seed)
    xd = x2d if keep is None else x2d * keep
    inv_keep = 1.0 / (1.0 - p)
    if x2d.dtype == lora_A.dtype == torch.float32:  # the common CPU case, in as few calls as possible
        t = _mm(xd, lora_A.t(), inv_keep)
        y = F.linear(x2d, weight, bias).addmm_(t, lora_B.t(), alpha=scaling)
    else:  # a half base: the skinny LoRA products in fp32 (as the kernels compute them), one rounding at the end
        t = _mm(_f32(xd), _f32(lora_A).t(), inv_keep)
        y = F.linear(x2d, weight, bias).float().addmm_(t, _f32(lora_B).t(), alpha=scaling).to(x2d.dtype)
    return (y, t, keep) if want_keep else (y, t)


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.float()


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def lora_linear_bwd(dy, x2d, weight, lora_A, lora_B, t, scaling, p, seed, need_dx, need_ab=True, keep=None):
    """Returns (dx or None, dA or None, dB or None). The dropout mask (`keep`, or drawn again from the seed) serves
    dA and dx."""
    dyf = _f32(dy)
    dt = _mm(dyf, _f32(lora_B), scaling)
    if keep is None and p != 0.0:
        keep = _keep(x2d.shape, x2d.device, p, seed)
    inv_keep = 1.0 / (1.0 - p)
    d_a = d_b = None
    if need_ab:
        d_b = _as(_mm(dyf.t(), t, scaling), lora_B.dtype)
        xf = _f32(x2d)
        d_a = _as(_mm(dt.t(), xf if keep is None else xf * keep, inv_keep), lora_A.dtype)
    dx = None
    if need_dx:
        lora_dx = _mm(dt, _f32(lora_A), inv_keep)
        if keep is not None:
            lora_dx.mul_(keep)
        dx = lora_dx.addmm_(dy, weight) if dy.dtype == torch.float32 else (torch.mm(dy, weight).float() + lora_dx)
        dx = _as(dx, x2d.dtype)
    return dx, d_a, d_b
