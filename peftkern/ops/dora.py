"""peftkern::dora_linear — peft's DoRA linear as a torch.library op (math in reference/dora.py).

    n = ||W + s·B A||_row (detached, fp32, from peftkern::dora_weight_norm without forming B A), g = m / n
    y = x Wᵀ + b + (g - 1) ⊙ (x_d Wᵀ) + g ⊙ s·(x_d Aᵀ) Bᵀ
(x_d = x without dropout: then y = g ⊙ (x Wᵀ + s·x Aᵀ Bᵀ) + b)

The op returns (y, t, u) with t = x_d Aᵀ (fp32, (M, r)) and u = x_d Wᵀ + s·t Bᵀ ((M, out): x's dtype; fp32 for
fp32 adapters on a half base with dropout, where peft's dropout branch runs in fp32), saved for backward (dm
needs u); the dropout mask comes from a seed and is drawn again in backward, never stored. The LoRA
part runs on the LoRA op's backend functions (torch or Triton: the fused LoRA GEMM), so the `triton` backend runs
the Triton LoRA kernels, and the magnitude scale (y = g ⊙ u + b; backward g ⊙ dy with Σ_rows dy ⊙ u) one
Triton pass each way (triton/dora.py; torch ops on the torch backend); the row norm and the dropout-path base
GEMM are torch ops on every backend.
Backward is an op too (peftkern::dora_linear_backward).
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

from .. import _backend, _validate
from ..reference import dora as ref
from . import lora as _lora
from ._out import standalone


def _backends():
    return {"torch": lambda: None, "triton": lambda: None}


def _triton():
    from ..triton import dora as tri  # imported lazily: no Triton work at `import peftkern`

    return tri


def _scale_impl(backend: str):
    """The magnitude scale's one-pass kernel on the triton backend (torch ops in reference/dora.py otherwise)."""
    return _triton().dora_scale if backend == "triton" else None


def _scale_bwd_impl(backend: str):
    return _triton().dora_scale_bwd if backend == "triton" else None


def _check(x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scaling, dropout_p, fake=False) -> None:
    if fake:  # torch._check on symbolic dims
        _validate.lora_linear_args(x, weight, bias, lora_A, lora_B, scaling, dropout_p)
    else:  # the common valid call in a few attribute reads, else every check
        _validate.lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p)
    _validate.tensor("magnitude", magnitude, ndim=1)
    out_f = weight.shape[0]
    _validate._req(magnitude.shape[0] == out_f, ValueError,
                   lambda: f"magnitude must have shape ({out_f},), got {tuple(magnitude.shape)}")
    _validate.same_device(x=x, magnitude=magnitude)
    if weight_norm is not None:
        _validate.tensor("weight_norm", weight_norm, ndim=1)
        _validate._req(weight_norm.dtype == torch.float32, TypeError,
                       lambda: f"weight_norm must be float32, got {weight_norm.dtype}")
        _validate._req(weight_norm.shape[0] == out_f, ValueError,
                       lambda: f"weight_norm must have shape ({out_f},), got {tuple(weight_norm.shape)}")
        _validate.same_device(x=x, weight_norm=weight_norm)


def _check_saved(dy, x, weight, lora_A, t, u) -> None:
    """The backward op's dy and saved t, u against x and the weights."""
    _validate.tensor("dy", dy, min_ndim=1)
    lead, out_f, r = x.shape[:-1], weight.shape[0], lora_A.shape[0]
    m = lead.numel()
    _validate._req(dy.dtype == x.dtype, TypeError, lambda: f"dy must have x's dtype {x.dtype}, got {dy.dtype}")
    _validate._req(dy.shape == (*lead, out_f), ValueError,
                   lambda: f"dy must have shape {(*lead, out_f)}, got {tuple(dy.shape)}")
    _validate._req(t.dtype == torch.float32 and t.shape == (m, r), ValueError,
                   lambda: f"t must be float32 of shape {(m, r)}, got {t.dtype} {tuple(t.shape)}")
    _validate._req(u.shape == (m, out_f), ValueError, lambda: f"u must have shape {(m, out_f)}, got {tuple(u.shape)}")


# ------------------------------------------------------------------------------------------------ row norm


@torch.library.custom_op("peftkern::dora_weight_norm", mutates_args=())
def dora_weight_norm_op(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
                        weight_sq_norm: Tensor | None) -> Tensor:
    """||W + s·B A||_row in fp32, (out,), from ||W||² (given, or computed) and r-sized products (no B A)."""
    torch._check(lora_A.shape[1] == weight.shape[1] and lora_B.shape[0] == weight.shape[0]
                 and lora_B.shape[1] == lora_A.shape[0], lambda: "dora_weight_norm: weight, lora_A, lora_B shapes")
    return ref.weight_norm(weight, lora_A, lora_B, scaling, weight_sq_norm)


@dora_weight_norm_op.register_fake
def _(weight, lora_A, lora_B, scaling, weight_sq_norm):
    torch._check(lora_A.shape[1] == weight.shape[1] and lora_B.shape[0] == weight.shape[0]
                 and lora_B.shape[1] == lora_A.shape[0], lambda: "dora_weight_norm: weight, lora_A, lora_B shapes")
    return weight.new_empty((weight.shape[0],), dtype=torch.float32)


# (id(weight), transposed) -> (weakref, data_ptr, _version, shape, dtype, ||W||² per row)
_sq_cache: dict[tuple, tuple] = {}


def weight_sq_norm(weight: Tensor, transposed: bool = False) -> Tensor:
    """||W||² per row (fp32) of a frozen weight (per column of `weight` when `transposed`: transformers' Conv1D
    stores (in, out)), cached per tensor: invalidated when the tensor is freed, moved, or written in place (its
    data_ptr or _version changes). Not cached under torch.compile."""
    w = weight.detach()
    if torch.compiler.is_compiling() or type(weight) not in (Tensor, torch.nn.Parameter):
        return ref.weight_sq_norm(w.t() if transposed else w)
    key = (id(weight), transposed)
    hit = _sq_cache.get(key)
    state = (weight.data_ptr(), weight._version, weight.shape, weight.dtype)
    if hit is not None and hit[0]() is weight and hit[1:5] == state:
        return hit[5]
    sq = ref.weight_sq_norm(w.t() if transposed else w)
    _sq_cache[key] = (weakref.ref(weight, lambda _r, k=key: _sq_cache.pop(k, None)), *state, sq)
    return sq


def dora_weight_norm(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
                     weight_sq_norm: Tensor | None = None) -> Tensor:
    """peft's (detached) DoRA weight norm ||W + s·B A||_row, fp32."""
    return torch.ops.peftkern.dora_weight_norm(weight.detach(), lora_A.detach(), lora_B.detach(), float(scaling),
                                               weight_sq_norm)


# ------------------------------------------------------------------------------------------------ linear


def _g(magnitude, weight_norm):
    return magnitude.float() / weight_norm


@torch.library.custom_op("peftkern::dora_linear", mutates_args=())
def dora_linear_op(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor,
    weight_norm: Tensor, scaling: float, dropout_p: float, seed: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    _check(x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scaling, dropout_p)
    _validate.seed("seed", seed)
    x2d = x.reshape(-1, x.shape[-1])
    s = int(seed.item()) if seed is not None else 0
    # No CUDA C++ DoRA kernel: a cuda request runs Triton's (as the LoRA op's backward does; not a fallback)
    backend = _backend.dispatch("dora_linear", x.device, _backends(), requested=_backend.backward_backend(False))
    y, t, u = ref.dora_linear_fwd(x2d, weight, bias, lora_A, lora_B, _g(magnitude, weight_norm), scaling,
                                  dropout_p, s, _lora._fwd_impl(backend), _scale_impl(backend))
    return standalone(y, (*x.shape[:-1], weight.shape[0])), t, u


@dora_linear_op.register_fake
def _(x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scaling, dropout_p, seed):
    _check(x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scaling, dropout_p, fake=True)
    _validate.seed("seed", seed)
    m = x.shape[:-1].numel()
    y = x.new_empty((*x.shape[:-1], weight.shape[0]))
    u_dtype = x.dtype if dropout_p == 0.0 or x.dtype == lora_A.dtype else torch.float32  # see reference/dora.py
    return y, x.new_empty((m, lora_A.shape[0]), dtype=torch.float32), x.new_empty((m, weight.shape[0]), dtype=u_dtype)


@torch.library.custom_op("peftkern::dora_linear_backward", mutates_args=())
def dora_linear_backward_op(
    dy: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor, weight_norm: Tensor,
    t: Tensor, u: Tensor, scaling: float, dropout_p: float, seed: Tensor | None, need_dx: bool, need_ab: bool,
    need_m: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dA, dB, dm); a gradient not needed is an empty (0,) tensor."""
    _check(x, weight, None, lora_A, lora_B, magnitude, weight_norm, scaling, dropout_p)
    _check_saved(dy, x, weight, lora_A, t, u)
    _validate.seed("seed", seed)
    _validate.backend_name(backend)
    x2d = x.reshape(-1, x.shape[-1])
    dy2d = dy.reshape(-1, dy.shape[-1]).contiguous()
    s = int(seed.item()) if seed is not None else 0
    backend = _backend.dispatch("dora_linear_backward", x.device, _backends(), requested=backend)
    dx, d_a, d_b, dm = ref.dora_linear_bwd(dy2d, x2d, weight, lora_A, lora_B, _g(magnitude, weight_norm),
                                           weight_norm, t, u, scaling, dropout_p, s, need_dx, need_ab, need_m,
                                           _lora._bwd_impl(backend), _scale_bwd_impl(backend))
    dx = standalone(dx, x.shape) if need_dx else x.new_empty((0,))
    if not need_ab:
        d_a, d_b = lora_A.new_empty((0,)), lora_B.new_empty((0,))
    dm = dm.to(magnitude.dtype) if need_m else magnitude.new_empty((0,))
    return dx, d_a, d_b, dm


@dora_linear_backward_op.register_fake
def _(dy, x, weight, lora_A, lora_B, magnitude, weight_norm, t, u, scaling, dropout_p, seed, need_dx, need_ab,
      need_m, backend):
    _check(x, weight, None, lora_A, lora_B, magnitude, weight_norm, scaling, dropout_p, fake=True)
    _check_saved(dy, x, weight, lora_A, t, u)
    _validate.seed("seed", seed)
    _validate.backend_name(backend)
    dx = x.new_empty(x.shape) if need_dx else x.new_empty((0,))
    d_a, d_b = ((lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape)) if need_ab
                else (lora_A.new_empty((0,)), lora_B.new_empty((0,))))
    dm = magnitude.new_empty(magnitude.shape) if need_m else magnitude.new_empty((0,))
    return dx, d_a, d_b, dm


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scaling, dropout_p, seed = inputs
    _, t, u = output
    ctx.save_for_backward(x, weight, lora_A, lora_B, magnitude, weight_norm, t, u, seed)
    ctx.scaling, ctx.dropout_p = scaling, dropout_p
    ctx.has_bias = bias is not None
    ctx.backend = _backend.backward_backend(cuda_backward=False)
    ctx.mark_non_differentiable(t, u)


def _backward(ctx, dy, _dt, _du):
    x, weight, lora_A, lora_B, magnitude, weight_norm, t, u, seed = ctx.saved_tensors
    need_dx, need_w, need_b, need_a, need_bb, need_m = ctx.needs_input_grad[:6]
    dy = dy.contiguous()
    dx = d_a = d_b = dm = None
    if need_dx or need_a or need_bb or need_m:
        dx, d_a, d_b, dm = torch.ops.peftkern.dora_linear_backward(
            dy, x, weight, lora_A, lora_B, magnitude, weight_norm, t, u, ctx.scaling, ctx.dropout_p, seed,
            need_dx, need_a or need_bb, need_m, ctx.backend)
    d_w = d_bias = None
    if need_w or (need_b and ctx.has_bias):  # a trainable base: plain torch ops (the slow path)
        dy2d = dy.reshape(-1, dy.shape[-1])
        if need_w:
            d_w = _base_weight_grad(dy2d, x.reshape(-1, x.shape[-1]), _g(magnitude, weight_norm), ctx.dropout_p,
                                    seed).to(weight.dtype)
        if need_b and ctx.has_bias:
            d_bias = dy2d.sum(0)
    return (dx if need_dx else None, d_w, d_bias, d_a if need_a else None, d_b if need_bb else None,
            dm if need_m else None, None, None, None, None)


def _base_weight_grad(dy2d, x2d, g, p, seed):
    """dW of y = x Wᵀ + (g - 1) ⊙ x_d Wᵀ + ...: dyᵀ x + ((g - 1) ⊙ dy)ᵀ x_d (the norm is detached)."""
    dyf, xf = dy2d.float(), x2d.float()
    if p == 0.0:
        return (dyf * g).t() @ xf
    from ..reference.lora import _keep

    xd = xf * _keep(x2d.shape, x2d.device, p, int(seed.item())) / (1.0 - p)
    return dyf.t() @ xf + (dyf * (g - 1)).t() @ xd


dora_linear_op.register_autograd(_backward, setup_context=_setup_context)


def dora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor,
                scaling: float, dropout_p: float = 0.0, weight_norm: Tensor | None = None,
                weight_sq_norm: Tensor | None = None) -> Tensor:
    """peft's DoRA linear: ``x Wᵀ + b + (g - 1)·(drop(x) Wᵀ) + g·s·(drop(x) Aᵀ) Bᵀ`` with
    ``g = magnitude / ||W + s·B A||_row`` (the norm detached, as peft detaches it).

    x: (..., in); weight: (out, in); bias: (out,) or None; lora_A: (r, in); lora_B: (out, r); magnitude: (out,).
    Shapes and dtypes as `lora_linear` takes them. `weight_norm` (fp32, (out,)) skips the norm computation;
    `weight_sq_norm` (||W||² per row, fp32) lets the norm skip its pass over W (see `weight_sq_norm()`).
    Dropout (dropout_p > 0, training) is drawn from a seed of torch's default generator.
    """
    _check(x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scaling, dropout_p)
    scaling, dropout_p = float(scaling), float(dropout_p)
    if weight_norm is None:
        weight_norm = dora_weight_norm(weight, lora_A, lora_B, scaling, weight_sq_norm)
    y, _, _ = torch.ops.peftkern.dora_linear(x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scaling,
                                             dropout_p, _lora.draw_seed(dropout_p))
    return y
