"""peftkern::bottleneck_adapter — y = res + s · (act(x W_dᵀ + b_d) W_uᵀ + b_u) as a torch.library op.

res is `residual` when given (parallel adapters: x is the sublayer input, residual its output), else
x itself (serial Houlsby / Pfeiffer adapters). The op returns (y, z) with z = x W_dᵀ + b_d, (M, r) in
the compute dtype, so autograd can save it: backward then needs x, z and the weights — never the
activation output, nor a copy of the residual. Backward is an op too
(peftkern::bottleneck_adapter_backward); the residual's gradient is dy itself.

Dtypes: x and residual share one of fp32/fp16/bf16. The four adapter tensors share one dtype, either
x's or fp32 (fp32 adapters on a half x compute in fp32, as peft does). The result has x's dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend, _validate
from ..reference import adapter as ref
from ._out import standalone

ACTIVATIONS = ref.ACTIVATIONS
CUDA_MAX_R = 128


def _triton():
    from ..triton import adapter as tri  # imported lazily: no Triton work at `import peftkern`

    return tri


def _fwd_backends(x, down_weight):
    def cuda_ok():
        if x.dtype == torch.float32 or down_weight.dtype != x.dtype:
            return "the cuda adapter kernel takes fp16/bf16 x with adapters of x's dtype"
        if down_weight.shape[0] > CUDA_MAX_R:
            return f"the cuda adapter kernel takes r <= {CUDA_MAX_R}, got {down_weight.shape[0]}"
        return None  # it also returns z, so a backward (on triton) still works

    return {"torch": lambda: None, "triton": lambda: None, "cuda": cuda_ok}


def _unit(t: Tensor | None) -> Tensor | None:
    """A 1-D tensor the Triton kernels index with unit stride (a strided view would be read wrong)."""
    return t if t is None or t.stride(0) == 1 else t.contiguous()


def _bwd_backends():
    return {"torch": lambda: None, "triton": lambda: None}


@torch.library.custom_op("peftkern::bottleneck_adapter", mutates_args=())
def bottleneck_adapter_op(
    x: Tensor, down_weight: Tensor, down_bias: Tensor | None, up_weight: Tensor, up_bias: Tensor | None,
    residual: Tensor | None, activation: str, scaling: float,
) -> tuple[Tensor, Tensor]:
    _validate.bottleneck_adapter(x, down_weight, down_bias, up_weight, up_bias, residual, activation, scaling)
    d = x.shape[-1]
    x2d = x.reshape(-1, d)
    res2d = None if residual is None else residual.reshape(-1, d)
    compute_dtype = ref.compute_dtype(x.dtype, down_weight.dtype)
    backend = _backend.dispatch("bottleneck_adapter", x.device, _fwd_backends(x, down_weight))
    if backend == "cuda":
        c = lambda t: None if t is None else t.contiguous()
        y, z = torch.ops.peftkern_cuda.bottleneck_adapter(
            x2d.contiguous(), down_weight.contiguous(), c(down_bias), up_weight.contiguous(), c(up_bias), c(res2d),
            activation, scaling)
    elif backend == "triton":  # the kernel reads the biases with unit stride
        y, z = _triton().bottleneck_adapter_fwd(x2d, down_weight, _unit(down_bias), up_weight, _unit(up_bias), res2d,
                                                activation, scaling, compute_dtype)
    else:
        y, z = ref.bottleneck_adapter_fwd(x2d, down_weight, down_bias, up_weight, up_bias, res2d, activation, scaling)
    return standalone(y, x.shape), z


@bottleneck_adapter_op.register_fake
def _(x, down_weight, down_bias, up_weight, up_bias, residual, activation, scaling):
    _validate.bottleneck_adapter_args(x, down_weight, down_bias, up_weight, up_bias, residual, activation, scaling)
    m = x.shape[:-1].numel()
    compute_dtype = ref.compute_dtype(x.dtype, down_weight.dtype)
    return x.new_empty(x.shape), x.new_empty((m, down_weight.shape[0]), dtype=compute_dtype)


@torch.library.custom_op("peftkern::bottleneck_adapter_backward", mutates_args=())
def bottleneck_adapter_backward_op(
    dy: Tensor, x: Tensor, z: Tensor, down_weight: Tensor, up_weight: Tensor, activation: str, scaling: float,
    has_residual: bool, need_dx: bool, need_params: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (dx, d_down_w, d_down_b, d_up_w, d_up_b). dx includes dy when has_residual is False (x was
    the residual). A gradient not asked for (need_dx / need_params False) is an empty (0,) tensor."""
    _validate.bottleneck_adapter_backward(dy, x, z, down_weight, up_weight, activation, scaling)
    d = x.shape[-1]
    x2d = x.reshape(-1, d)
    dy2d = dy.reshape(-1, d)
    backend = _backend.dispatch("bottleneck_adapter_backward", x.device, _bwd_backends(), requested=backend)
    if backend == "triton":
        compute_dtype = ref.compute_dtype(x.dtype, down_weight.dtype)
        out = _triton().bottleneck_adapter_bwd(dy2d, x2d, z, down_weight, up_weight, activation, scaling,
                                               has_residual, need_dx, need_params, compute_dtype)
    else:
        out = ref.bottleneck_adapter_bwd(dy2d, x2d, z, down_weight, up_weight, activation, scaling, has_residual,
                                         need_dx, need_params)
    dx, *params = out
    dx = standalone(dx, x.shape) if need_dx else x.new_empty((0,))
    params = [p if need_params else down_weight.new_empty((0,)) for p in params]
    return (dx, *params)


@bottleneck_adapter_backward_op.register_fake
def _(dy, x, z, down_weight, up_weight, activation, scaling, has_residual, need_dx, need_params, backend):
    _validate.bottleneck_adapter_backward_args(dy, x, z, down_weight, up_weight, activation, scaling)
    _validate.backend_name(backend)
    dx = x.new_empty(x.shape) if need_dx else x.new_empty((0,))
    r, d = down_weight.shape
    if not need_params:
        e = down_weight.new_empty((0,))
        return dx, e, e.clone(), e.clone(), e.clone()
    return (dx, down_weight.new_empty((r, d)), down_weight.new_empty((r,)), up_weight.new_empty((d, r)),
            up_weight.new_empty((d,)))


def _setup_context(ctx, inputs, output):
    x, down_weight, down_bias, up_weight, up_bias, residual, activation, scaling = inputs
    _, z = output
    ctx.save_for_backward(x, z, down_weight, up_weight)
    ctx.activation = activation
    ctx.scaling = scaling
    ctx.has_residual = residual is not None
    ctx.has_bias = (down_bias is not None, up_bias is not None)
    ctx.backend = _backend.backward_backend(cuda_backward=False)
    ctx.mark_non_differentiable(z)  # z is saved for backward, not a result to differentiate


def _backward(ctx, dy, _dz):
    x, z, down_weight, up_weight = ctx.saved_tensors
    need_x, need_dw, need_db, need_uw, need_ub, need_res = ctx.needs_input_grad[:6]
    need_params = need_dw or need_db or need_uw or need_ub
    d_res = dy if (ctx.has_residual and need_res) else None
    if not (need_x or need_params):
        return None, None, None, None, None, d_res, None, None
    dx, d_dw, d_db, d_uw, d_ub = torch.ops.peftkern.bottleneck_adapter_backward(
        dy.contiguous(), x, z, down_weight, up_weight, ctx.activation, ctx.scaling, ctx.has_residual, need_x,
        need_params, ctx.backend)
    pick = lambda need, g, has=True: g if (need and has) else None
    return (pick(need_x, dx), pick(need_dw, d_dw), pick(need_db, d_db, ctx.has_bias[0]), pick(need_uw, d_uw),
            pick(need_ub, d_ub, ctx.has_bias[1]), d_res, None, None)


bottleneck_adapter_op.register_autograd(_backward, setup_context=_setup_context)


def bottleneck_adapter(x: Tensor, down_weight: Tensor, down_bias: Tensor | None, up_weight: Tensor,
                       up_bias: Tensor | None, residual: Tensor | None = None, activation: str = "relu",
                       scaling: float = 1.0) -> Tensor:
    """Fused bottleneck adapter: ``(x if residual is None else residual) + scaling * (act(x @ down_weight.T +
    down_bias) @ up_weight.T + up_bias)``.

    x: (..., d); down_weight: (r, d); down_bias: (r,) or None; up_weight: (d, r); up_bias: (d,) or None;
    residual: like x, or None (then x is the residual). activation: "relu", "gelu" (exact erf), "gelu_tanh"
    or "silu". x / residual are fp32, fp16 or bf16; the adapter tensors share x's dtype or are fp32 (then
    the adapter computes in fp32). The result has x's dtype. Gradients flow to x, residual and all four
    adapter tensors; backward saves x and z = x W_dᵀ + b_d only.
    """
    _validate.bottleneck_adapter(x, down_weight, down_bias, up_weight, up_bias, residual, activation, scaling)
    y, _ = torch.ops.peftkern.bottleneck_adapter(x, down_weight, down_bias, up_weight, up_bias, residual,
                                                 activation, float(scaling))
    return y
