"""peftkern::prefix_attention — attention over [prefix ; sequence] keys without concatenating them.

The op returns (out, lse) with lse the fp32 logsumexp of each query row, so backward recomputes the
probabilities instead of saving them. Backward is an op too (peftkern::prefix_attention_backward).
Backends: torch (reference, any device), triton (flash-style kernels), and for the backward only
cuda = the Triton attention kernels + the CUDA C++ reduction of a shared prefix's gradient over
the batch (the forward has no CUDA C++ kernel, so a cuda request runs it on triton, logged).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from .. import _backend, _validate
from ..reference import prefix as ref


def _triton():
    from ..triton import prefix as tri  # imported lazily: no Triton work at `import peftkern`

    return tri


def _triton_ok(q, k, prefix_k):
    return lambda: _triton().unsupported(q, k, prefix_k)


def _cuda_reduce(part: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.ops.peftkern_cuda.prefix_grad_reduce(part.contiguous(), dtype)


@torch.library.custom_op("peftkern::prefix_attention", mutates_args=())
def prefix_attention_op(
    q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor, key_padding_mask: Tensor | None,
    causal: bool, softmax_scale: float,
) -> tuple[Tensor, Tensor]:
    _validate.prefix_attention(q, k, v, prefix_k, prefix_v, causal, key_padding_mask, softmax_scale)
    impls = {"torch": lambda: None, "triton": _triton_ok(q, k, prefix_k)}
    backend = _backend.dispatch("prefix_attention", q.device, impls)
    impl = _triton().prefix_attention_fwd if backend == "triton" else ref.prefix_attention_fwd
    return impl(q, k, v, prefix_k, prefix_v, causal, key_padding_mask, softmax_scale)


@prefix_attention_op.register_fake
def _(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, softmax_scale):
    _validate.prefix_attention_args(q, k, v, prefix_k, prefix_v, causal, key_padding_mask, softmax_scale)
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


def _bwd_backends(q, k, prefix_k):
    def cuda_ok():
        if prefix_k.dim() != 3:
            return "the cuda kernel reduces a shared prefix's gradient; this prefix is per-batch"
        return _backend.triton_unavailable(q.device) or _triton().unsupported(q, k, prefix_k)

    return {"torch": lambda: None, "triton": _triton_ok(q, k, prefix_k), "cuda": cuda_ok}


@torch.library.custom_op("peftkern::prefix_attention_backward", mutates_args=())
def prefix_attention_backward_op(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor, out: Tensor, lse: Tensor,
    key_padding_mask: Tensor | None, causal: bool, softmax_scale: float, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (dq, dk, dv, dprefix_k, dprefix_v). `backend` is the one requested around the forward."""
    _validate.prefix_attention_backward(dout, q, k, v, prefix_k, prefix_v, out, lse, key_padding_mask, causal,
                                        softmax_scale)
    backend = _backend.dispatch("prefix_attention_backward", q.device, _bwd_backends(q, k, prefix_k),
                                requested=backend)
    args = (dout, q, k, v, prefix_k, prefix_v, out, lse, causal, key_padding_mask, softmax_scale)
    if backend == "torch":
        return ref.prefix_attention_bwd(*args)
    if backend == "cuda":
        return _triton().prefix_attention_bwd(*args, sum_partials=_cuda_reduce)
    return _triton().prefix_attention_bwd(*args)


@prefix_attention_backward_op.register_fake
def _(dout, q, k, v, prefix_k, prefix_v, out, lse, key_padding_mask, causal, softmax_scale, backend):
    _validate.prefix_attention_backward_args(dout, q, k, v, prefix_k, prefix_v, out, lse, key_padding_mask, causal,
                                             softmax_scale)
    _validate.backend_name(backend)
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), prefix_k.new_empty(prefix_k.shape),
            prefix_v.new_empty(prefix_v.shape))


def _setup_context(ctx, inputs, output):
    q, k, v, prefix_k, prefix_v, key_padding_mask, causal, softmax_scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, out, lse, key_padding_mask)
    ctx.causal = causal
    ctx.softmax_scale = softmax_scale
    ctx.backend = _backend.backward_backend(cuda_backward=True)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, prefix_k, prefix_v, out, lse, key_padding_mask = ctx.saved_tensors
    grads = torch.ops.peftkern.prefix_attention_backward(
        dout, q, k, v, prefix_k, prefix_v, out, lse, key_padding_mask, ctx.causal, ctx.softmax_scale, ctx.backend)
    need = ctx.needs_input_grad
    return (*[g if need[i] else None for i, g in enumerate(grads)], None, None, None)


prefix_attention_op.register_autograd(_backward, setup_context=_setup_context)


def prefix_attention(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor, causal: bool = True,
                     key_padding_mask: Tensor | None = None, softmax_scale: float | None = None) -> Tensor:
    """Attention of q over the keys [prefix ; sequence], the prefix read in place (never concatenated).

    q: (B, H, L, D); k, v: (B, Hkv, S, D) with H a multiple of Hkv (GQA / MQA: head h reads kv head
    h // (H / Hkv)); prefix_k, prefix_v: (Hkv, P, D) shared by the batch, or (B, Hkv, P, D). Every
    query sees all P prefix positions; with `causal`, query i sees sequence key j <= i + (S - L)
    (bottom-right aligned); `key_padding_mask` (B, S) bool (True = attend) masks sequence keys only, so
    a row whose sequence keys are all masked still attends the prefix. Default scale 1/sqrt(D).
    Returns (B, H, L, D) in q's dtype; gradients reach q, k, v and the prefix (a shared prefix's
    gradient is summed over the batch). Under autocast every operand is cast to the autocast dtype
    first, as autocast does for scaled_dot_product_attention.
    """
    dev = q.device.type
    dt = _backend.autocast_dtype(dev)
    if dt is not None:
        q, k, v, prefix_k, prefix_v = (t.to(dt) for t in (q, k, v, prefix_k, prefix_v))
    _validate.prefix_attention(q, k, v, prefix_k, prefix_v, causal, key_padding_mask, softmax_scale)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    # Autocast off inside: the torch backend's fp32 upcasts must not be cast back down.
    with torch.autocast(dev, enabled=False) if dt is not None else contextlib.nullcontext():
        out, _ = torch.ops.peftkern.prefix_attention(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale)
    return out
