"""Bottleneck adapter in plain PyTorch.

`bottleneck_adapter` is the readable composition (autograd does the gradients) used as the test
oracle. `bottleneck_adapter_fwd` / `bottleneck_adapter_bwd` are the torch backend of the op: the
same explicit forward and backward the kernels implement, from the saved pre-activation z.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu")


def act(z: torch.Tensor, name: str) -> torch.Tensor:
    if name == "relu":
        return F.relu(z)
    if name == "gelu":
        return F.gelu(z)
    if name == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    if name == "silu":
        return F.silu(z)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


def act_grad(z: torch.Tensor, name: str) -> torch.Tensor:
    """d act(z) / dz, elementwise (the same closed forms the kernels use)."""
    if name == "relu":
        return (z > 0).to(z.dtype)
    if name == "gelu":
        return 0.5 * (1.0 + torch.erf(z * math.sqrt(0.5))) + z * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    if name == "gelu_tanh":
        k = math.sqrt(2.0 / math.pi)
        t = torch.tanh(k * (z + 0.044715 * z**3))
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * k * (1.0 + 3 * 0.044715 * z * z)
    if name == "silu":
        s = torch.sigmoid(z)
        return s * (1.0 + z * (1.0 - s))
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


def compute_dtype(x_dtype: torch.dtype, param_dtype: torch.dtype) -> torch.dtype:
    """Half activations with fp32 adapters compute in fp32 (peft's rule); else x's dtype."""
    return torch.promote_types(x_dtype, param_dtype)


def bottleneck_adapter(x, down_weight, down_bias, up_weight, up_bias, residual=None, activation="relu",
                       scaling=1.0):
    """(x or residual) + s · (act(x W_dᵀ + b_d) W_uᵀ + b_u), computed in the compute dtype."""
    work_dtype = compute_dtype(x.dtype, down_weight.dtype)
    cast = lambda t: None if t is None else t.to(work_dtype)
    h = act(F.linear(x.to(work_dtype), down_weight.to(work_dtype), cast(down_bias)), activation)
    out = F.linear(h, up_weight.to(work_dtype), cast(up_bias)) * scaling
    res = x if residual is None else residual
    return (res.to(work_dtype) + out).to(x.dtype)


def bottleneck_adapter_fwd(x2d, down_weight, down_bias, up_weight, up_bias, res2d, activation, scaling):
    """Returns (y, z): y (M, d) in x's dtype, z = x W_dᵀ + b_d (M, r) saved for backward in the
    compute dtype."""
    work_dtype = compute_dtype(x2d.dtype, down_weight.dtype)
    cast = lambda t: None if t is None else t.to(work_dtype)
    z = F.linear(x2d.to(work_dtype), down_weight.to(work_dtype), cast(down_bias))
    out = F.linear(act(z.float(), activation).to(work_dtype), up_weight.to(work_dtype), cast(up_bias))
    res = x2d if res2d is None else res2d
    y = (res.float() + out.float() * scaling).to(x2d.dtype)
    return y, z


def bottleneck_adapter_bwd(dy2d, x2d, z, down_weight, up_weight, activation, scaling, has_residual, need_dx,
                           need_params):
    """Returns (dx or None, d_down_w, d_down_b, d_up_w, d_up_b); the last four are None unless need_params.
    dx includes dy when there is no separate residual (then x is the residual). Computed in fp32, as the
    kernels accumulate (every product here has one small dimension, r)."""
    dyf = dy2d.float()
    zf = z.float()
    dz = (dyf @ up_weight.float()) * scaling * act_grad(zf, activation)
    dx = None
    if need_dx:
        dx = dz @ down_weight.float()
        if not has_residual:
            dx = dx + dyf
        dx = dx.to(x2d.dtype)
    if not need_params:
        return dx, None, None, None, None
    pdt = down_weight.dtype
    d_up_w = ((dyf.t() @ act(zf, activation)) * scaling).to(pdt)
    d_up_b = (dyf.sum(0) * scaling).to(pdt)
    d_down_w = (dz.t() @ x2d.float()).to(pdt)
    return dx, d_down_w, dz.sum(0).to(pdt), d_up_w, d_up_b
