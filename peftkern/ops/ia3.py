"""peftkern::ia3_linear — IA3 on a linear layer as a torch.library op.

  feedforward=False (keys / values):  y = (x Wᵀ + b) ⊙ l,  l: (out,)   peft scales the bias too
  feedforward=True  (MLP input):      y = (x ⊙ l) Wᵀ + b,  l: (in,)

What backward keeps, and why:
  * feed-forward: x (in its own dtype). dl[k] = Σ_m x[m,k]·(dy W)[m,k] is reduced in the epilogue of
    the dx GEMM, which holds the (dy W) tile. peft keeps an fp32 copy of x instead (2x the bytes
    on a half base).
  * output case: the output y itself, and Z = xWᵀ + b is rebuilt as y / l: dl[n] = Σ_m dy·y / l[n]
    is one pass over dy and y (fusing it into the dx GEMM stalled that GEMM's pipeline on an H100;
    see triton/ia3.py). Saving x instead would cost a second GEMM in backward (recomputing Z), is
    no smaller for square layers and bigger for GQA's narrow k/v projections; saving y is never
    more than peft's saved Z, and is shared with whatever downstream also saves y (attention saves
    V). It needs y rounded once from fp32, which both the Triton epilogue and the cuda path do.
    Limits: an entry of l that is exactly 0 makes its dl NaN (y carries no Z there); peft itself
    divides by l to unmerge. Modifying y in place before backward is caught by autograd's version
    check (as for any op that saves its result). x is kept only when the base weight is trainable.
Backward is an op too (peftkern::ia3_linear_backward); it runs on the backend that was requested
when the forward ran (passed as an argument, so it survives autograd's worker threads and compile).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _backend, _validate
from ..reference import ia3 as ref
from ._out import standalone


def _triton():
    from ..triton import ia3 as tri  # imported lazily: no Triton work at `import peftkern`

    return tri


def _bwd_backends():
    return {"torch": lambda: None, "triton": lambda: None, "cuda": lambda: None}


def _fwd_backends(feedforward: bool):
    def cuda_ok():
        if not feedforward and not hasattr(torch.ops.aten.mm, "dtype"):
            return f"the output case needs a GEMM with fp32 output (aten::mm.dtype), not in torch {torch.__version__}"
        return None

    return {"torch": lambda: None, "triton": lambda: None, "cuda": cuda_ok}


# ---------------------------------------------------------------- cuda backend
# cuBLAS GEMMs plus the CUDA kernels of csrc/ia3/ia3.cu: a weight with l folded in where the fold's
# rounding is harmless (one weight-sized pass, cheap next to a training-size GEMM), the fp32-output
# GEMM + one rounding for the output-case forward (backward rebuilds Z = y / l), column reductions.


def _fold(t2d: Tensor, lf: Tensor, dim: int) -> Tensor:
    return torch.ops.peftkern_cuda.ia3_scale(t2d.contiguous(), lf, dim)


def _cuda_fwd(x2d, weight, bias, ia3_l, feedforward):
    lf = ia3_l.float().contiguous()
    if feedforward:
        return F.linear(x2d, _fold(weight, lf, 1), bias)
    wt = weight.t()
    z = x2d @ wt if x2d.dtype == torch.float32 else torch.ops.aten.mm.dtype(x2d, wt, torch.float32)
    return torch.ops.peftkern_cuda.ia3_bias_scale(z, bias.contiguous() if bias is not None else None, lf, x2d.dtype)


def _cuda_bwd(dy, saved, weight, ia3_l, feedforward, need_dx, need_dl):
    lf = ia3_l.float().contiguous()
    colsum = torch.ops.peftkern_cuda.ia3_colsum_mul
    if feedforward:
        g = dy @ weight
        dl, dx = colsum(g, saved.contiguous() if need_dl else g, lf, False, need_dx)
        return (dx if need_dx else None), (dl.to(ia3_l.dtype) if need_dl else None)
    dx = dy @ _fold(weight, lf, 0) if need_dx else None
    dl = colsum(dy, saved.contiguous(), lf, True, False)[0].to(ia3_l.dtype) if need_dl else None
    return dx, dl


# ---------------------------------------------------------------- the ops


def _unit(t: Tensor | None) -> Tensor | None:
    """A 1-D tensor the Triton kernels index with unit stride (a strided view would be read wrong)."""
    return t if t is None or t.stride(0) == 1 else t.contiguous()


@torch.library.custom_op("peftkern::ia3_linear", mutates_args=())
def ia3_linear_op(x: Tensor, weight: Tensor, bias: Tensor | None, ia3_l: Tensor, feedforward: bool) -> Tensor:
    _validate.ia3_linear(x, weight, bias, ia3_l, feedforward)  # before any backend runs
    x2d = x.reshape(-1, x.shape[-1])
    backend = _backend.dispatch("ia3_linear", x.device, _fwd_backends(feedforward))
    if backend == "cuda":
        y = _cuda_fwd(x2d, weight, bias, ia3_l, feedforward)
    elif backend == "triton":  # the kernel reads bias and l with unit stride
        y = _triton().ia3_linear_fwd(x2d, weight, _unit(bias), _unit(ia3_l), feedforward)
    else:
        y = ref.ia3_linear_fwd(x2d, weight, bias, ia3_l, feedforward)
    return standalone(y, (*x.shape[:-1], weight.shape[0]))


@ia3_linear_op.register_fake
def _(x, weight, bias, ia3_l, feedforward):
    _validate.ia3_linear_args(x, weight, bias, ia3_l, feedforward)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("peftkern::ia3_linear_backward", mutates_args=())
def ia3_linear_backward_op(
    dy: Tensor, saved: Tensor | None, weight: Tensor, ia3_l: Tensor, feedforward: bool,
    need_dx: bool, need_dl: bool, backend: str,
) -> tuple[Tensor, Tensor]:
    """Returns (dx, dl); each is an empty (0,) tensor when not needed. `saved` is the forward's
    output y (output case) or x (feed-forward), and may be None when need_dl is False."""
    _validate.ia3_linear_backward(dy, saved, weight, ia3_l, feedforward, need_dl)
    dy2d = dy.reshape(-1, dy.shape[-1])
    s2d = saved.reshape(-1, saved.shape[-1]) if saved is not None else None
    name = _backend.dispatch("ia3_linear_backward", dy.device, _bwd_backends(), requested=backend)
    impl = {"cuda": _cuda_bwd, "triton": lambda *a: _triton().ia3_linear_bwd(*a)}.get(name, ref.ia3_linear_bwd)
    dx, dl = impl(dy2d, s2d, weight, _unit(ia3_l) if name == "triton" else ia3_l, feedforward, need_dx, need_dl)
    dx = standalone(dx, (*dy.shape[:-1], weight.shape[1])) if need_dx else dy.new_empty((0,))
    return dx, (dl if need_dl else ia3_l.new_empty((0,)))


@ia3_linear_backward_op.register_fake
def _(dy, saved, weight, ia3_l, feedforward, need_dx, need_dl, backend):
    _validate.ia3_linear_backward_args(dy, saved, weight, ia3_l, feedforward, need_dl)
    _validate.backend_name(backend)
    dx = dy.new_empty((*dy.shape[:-1], weight.shape[1])) if need_dx else dy.new_empty((0,))
    return dx, (torch.empty_like(ia3_l) if need_dl else ia3_l.new_empty((0,)))


def _setup_context(ctx, inputs, output):
    x, weight, bias, ia3_l, feedforward = inputs
    need_x, need_w, need_b, need_l = ctx.needs_input_grad[:4]
    if feedforward:
        saved = x if (need_l or need_w) else None
        x_for_dw = None  # dW reads `saved`
    else:
        saved = output if need_l else None
        x_for_dw = x if need_w else None
    ctx.save_for_backward(saved, x_for_dw, weight, ia3_l)
    ctx.feedforward = feedforward
    ctx.has_bias = bias is not None
    ctx.backend = _backend.backward_backend(cuda_backward=True)  # IA3 has a CUDA backward (_cuda_bwd)


def _backward(ctx, dy):
    saved, x_for_dw, weight, ia3_l = ctx.saved_tensors
    need_x, need_w, need_b, need_l = ctx.needs_input_grad[:4]
    ff = ctx.feedforward
    dy = dy.contiguous()
    dx, dl = torch.ops.peftkern.ia3_linear_backward(dy, saved, weight, ia3_l, ff, need_x, need_l, ctx.backend)
    d_w = d_b = None
    if need_w or (need_b and ctx.has_bias):
        # A trainable base is the slow path: plain torch ops, visible to the compiler.
        dy2d = dy.reshape(-1, dy.shape[-1])
        lf = ia3_l.float()
        if ff:
            if need_w:
                x2d = saved.reshape(-1, saved.shape[-1])
                d_w = dy2d.t() @ (x2d.to(lf.dtype) * lf).to(x2d.dtype)
            d_b = dy2d.sum(0) if need_b and ctx.has_bias else None
        else:
            if need_w:
                dz = (dy2d.float() * lf).to(dy.dtype)
                d_w = dz.t() @ x_for_dw.reshape(-1, x_for_dw.shape[-1])
            d_b = (dy2d.float().sum(0) * lf).to(dy.dtype) if need_b and ctx.has_bias else None
    return (dx if need_x else None), d_w, d_b, (dl if need_l else None), None


ia3_linear_op.register_autograd(_backward, setup_context=_setup_context)


def ia3_linear(x: Tensor, weight: Tensor, bias: Tensor | None, ia3_l: Tensor, feedforward: bool = False) -> Tensor:
    """Fused IA3 linear, peft's semantics.

    feedforward=False: ``(x @ weight.T + bias) * ia3_l`` with ia3_l of shape (out,) (bias scaled too).
    feedforward=True:  ``(x * ia3_l) @ weight.T + bias`` with ia3_l of shape (in,).
    x: (..., in); weight: (out, in); bias: (out,) or None. ia3_l may also be given in peft's layout,
    (out, 1) or (1, in); it may be float32 on a half base (peft's default). The result has x's dtype.
    """
    if (isinstance(ia3_l, torch.Tensor) and ia3_l.dim() == 2 and isinstance(weight, torch.Tensor)
            and weight.dim() == 2 and ia3_l.shape == ((1, weight.shape[1]) if feedforward else (weight.shape[0], 1))):
        ia3_l = ia3_l.reshape(-1)  # a view: the gradient reaches peft's parameter
    _validate.ia3_linear(x, weight, bias, ia3_l, feedforward)
    return torch.ops.peftkern.ia3_linear(x, weight, bias, ia3_l, feedforward)
