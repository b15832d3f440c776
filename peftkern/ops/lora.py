"""peftkern::lora_linear — y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ as a torch.library op.

The op returns (y, t) with t = drop(x) Aᵀ (fp32, (M, r)) so autograd can save it: backward then
needs x, t and the dropout seed — never the dropped x nor its mask. Backward is an op too
(peftkern::lora_linear_backward), so torch.compile and FSDP see two opaque nodes and no graph break.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend, _host_ext, _validate
from ..reference import lora as ref
from ._out import standalone

_MAX_SEED = 2**31 - 1


def _triton():
    from ..triton import lora as tri  # imported lazily: no Triton work at `import peftkern`

    return tri


CUDA_DECODE_MAX_M = 16


def _fwd_backends(x2d, weight, lora_A, p):
    def cuda_ok():
        if _backend.requested_backend() == "auto":
            # Opt-in until the current decode kernel has run on a GPU (benchmarks/NOTES.md).
            return "the cuda LoRA decode kernel is opt-in (PEFTKERN_BACKEND=cuda) until verified on a GPU"
        if p > 0.0:
            return "the cuda decode kernel has no dropout (it serves inference)"
        if x2d.shape[0] > CUDA_DECODE_MAX_M:
            return f"the cuda decode kernel takes M <= {CUDA_DECODE_MAX_M} rows, got {x2d.shape[0]}"
        if lora_A.shape[0] > 128:
            return "the cuda decode kernel takes rank r <= 128"
        if lora_A.dtype not in (torch.float32, x2d.dtype):
            return "the cuda decode kernel takes adapters in fp32 or in x's dtype"
        if not weight.is_contiguous():
            return "the cuda decode kernel reads a contiguous weight (copying it per call would cost more)"
        return None  # it also returns t, so a backward (on triton) still works

    # The Triton kernels take any rank (ranks past 128 run in chunks: triton/lora.py).
    return {"torch": lambda: None, "triton": lambda: None, "cuda": cuda_ok}


def _bwd_backends(r):
    """Backends of the backward (and of an eager forward); every one takes any rank `r`."""
    return {"torch": lambda: None, "triton": lambda: None}


def _fwd_impl(backend: str):
    return _triton().lora_linear_fwd if backend == "triton" else ref.lora_linear_fwd


def _bwd_impl(backend: str):
    return _triton().lora_linear_bwd if backend == "triton" else ref.lora_linear_bwd


@torch.library.custom_op("peftkern::lora_linear", mutates_args=())
def lora_linear_op(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
    scaling: float, dropout_p: float, seed: Tensor | None,
) -> tuple[Tensor, Tensor]:
    _validate.lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p)  # before any backend runs
    _validate.seed("seed", seed)
    x2d = x.reshape(-1, x.shape[-1])
    s = int(seed.item()) if seed is not None else 0
    backend = _backend.dispatch("lora_linear", x.device, _fwd_backends(x2d, weight, lora_A, dropout_p))
    if backend == "cuda":
        y, t = torch.ops.peftkern_cuda.lora_decode(x2d.contiguous(), weight.contiguous(),
                                                   bias.contiguous() if bias is not None else None,
                                                   lora_A.contiguous(), lora_B.contiguous(), scaling)
    else:
        y, t = _fwd_impl(backend)(x2d, weight, bias, lora_A, lora_B, scaling, dropout_p, s)
    return standalone(y, (*x.shape[:-1], weight.shape[0])), t


@lora_linear_op.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    _validate.lora_linear_args(x, weight, bias, lora_A, lora_B, scaling, dropout_p)  # torch._check on symbolic dims
    _validate.seed("seed", seed)
    m = x.shape[:-1].numel()
    y = x.new_empty((*x.shape[:-1], weight.shape[0]))
    t = x.new_empty((m, lora_A.shape[0]), dtype=torch.float32)
    return y, t


@torch.library.custom_op("peftkern::lora_linear_backward", mutates_args=())
def lora_linear_backward_op(
    dy: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, t: Tensor,
    scaling: float, dropout_p: float, seed: Tensor | None, need_dx: bool, need_ab: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (dx, dA, dB); dx is an empty (0,) tensor when need_dx is False, dA and dB when need_ab is
    False (frozen adapters: their two reductions over M are skipped). `backend` is the one requested
    around the forward (use_backend does not reach autograd's CUDA thread)."""
    _validate.lora_linear_backward(dy, x, weight, lora_A, lora_B, t, scaling, dropout_p, seed)
    x2d = x.reshape(-1, x.shape[-1])
    dy2d = dy.reshape(-1, dy.shape[-1])
    s = int(seed.item()) if seed is not None else 0
    backend = _backend.dispatch("lora_linear_backward", x.device, _bwd_backends(lora_A.shape[0]), requested=backend)
    dx, d_a, d_b = _bwd_impl(backend)(dy2d, x2d, weight, lora_A, lora_B, t, scaling, dropout_p, s, need_dx, need_ab)
    dx = standalone(dx, x.shape) if need_dx else x.new_empty((0,))
    if not need_ab:
        d_a, d_b = lora_A.new_empty((0,)), lora_B.new_empty((0,))
    return dx, d_a, d_b


@lora_linear_backward_op.register_fake
def _(dy, x, weight, lora_A, lora_B, t, scaling, dropout_p, seed, need_dx, need_ab, backend):
    _validate.lora_linear_backward_args(dy, x, weight, lora_A, lora_B, t, scaling, dropout_p, seed)
    _validate.backend_name(backend)
    dx = x.new_empty(x.shape) if need_dx else x.new_empty((0,))
    if not need_ab:
        return dx, lora_A.new_empty((0,)), lora_B.new_empty((0,))
    return dx, lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape)


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed = inputs
    _, t = output
    ctx.save_for_backward(x, weight, lora_A, lora_B, t, seed)
    ctx.scaling = scaling
    ctx.dropout_p = dropout_p
    ctx.has_bias = bias is not None
    ctx.backend = _backend.backward_backend(cuda_backward=False)
    ctx.mark_non_differentiable(t)  # t is saved for backward, not a result to differentiate


def _backward(ctx, dy, _dt):
    x, weight, lora_A, lora_B, t, seed = ctx.saved_tensors
    need_dx, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
    dy = dy.contiguous()
    dx = d_a = d_b = None
    if need_dx or need_a or need_bb:
        dx, d_a, d_b = torch.ops.peftkern.lora_linear_backward(
            dy, x, weight, lora_A, lora_B, t, ctx.scaling, ctx.dropout_p, seed, need_dx, need_a or need_bb,
            ctx.backend)
    return (dx if need_dx else None, *_base_grads(dy, x, need_w, need_b and ctx.has_bias),
            d_a if need_a else None, d_b if need_bb else None, None, None, None)


def _base_grads(dy, x, need_w, need_b):
    """dW, db of a trainable base (the slow path: plain torch ops, visible to the compiler)."""
    if not (need_w or need_b):
        return None, None
    dy2d = dy.reshape(-1, dy.shape[-1])
    d_w = dy2d.t() @ x.reshape(-1, x.shape[-1]) if need_w else None
    return d_w, (dy2d.sum(0) if need_b else None)


lora_linear_op.register_autograd(_backward, setup_context=_setup_context)


def draw_seed(dropout_p: float) -> Tensor | None:
    """A dropout seed from torch's default CPU generator, so torch.manual_seed reproduces a run. Made on the
    CPU explicitly: under torch.set_default_device("cuda") a device seed would cost a sync at .item()."""
    if dropout_p == 0.0:
        return None
    return torch.randint(0, _MAX_SEED, (), dtype=torch.int64, device="cpu")


_DRAW_SEED = draw_seed  # the module's own; a replaced draw_seed is seen by identity


# ------------------------------------------------------------------------------------------ eager path
# In eager mode the op's own dispatch (custom-op wrapper, argument defaults, redispatch, a seed tensor and
# its .item(), a backend choice rebuilt per call) cost more host time than the work on small layers. Eager
# calls therefore run the same backend functions through a plain autograd.Function; torch.compile, export,
# meta tensors, tensor subclasses and functorch transforms keep the custom op (one opaque node each way).


def _eager(x: Tensor) -> bool:
    return (not torch.compiler.is_compiling() and type(x) is torch.Tensor and not x.is_meta
            and not torch._C._get_tracing_state() and not torch._C._are_functorch_transforms_active())


_eager_backends: dict[tuple, tuple[str, str]] = {}


def _backends(device, r: int) -> tuple[str, str]:
    """(forward, backward) backend for an eager call, chosen as the op chooses them, once per (device, request,
    environment) (no choice depends on the rank `r` any more); ("", ...) for an explicit cuda request, whose
    decode kernel depends on M."""
    key = (device, _backend.choice_key())
    got = _eager_backends.get(key)
    if got is None:
        got = _eager_backends[key] = _choose_backends(device, r)
    return got


def _choose_backends(device, r: int) -> tuple[str, str]:
    req = _backend.requested_backend()
    if req == "cuda":
        return "", "triton"  # the LoRA backward has no CUDA C++ kernel: the cuda backend runs Triton's
    fwd = _backend.dispatch("lora_linear", device, _eager_fwd_backends(r, req), requested=req)
    return fwd, _backend.dispatch("lora_linear_backward", device, _bwd_backends(r), requested=req)


def _eager_fwd_backends(r: int, req: str):
    impls = _bwd_backends(r)  # the forward's torch/triton limits are the backward's
    impls["cuda"] = lambda: ("the cuda LoRA decode kernel is opt-in (PEFTKERN_BACKEND=cuda) until verified on a GPU"
                             if req == "auto" else "the cuda decode kernel is not requested")
    return impls


def _rows(t: Tensor) -> Tensor:
    return t if t.dim() == 2 else t.reshape(-1, t.shape[-1])


def _contiguous_rows(t: Tensor) -> Tensor:
    """`t`'s rows, contiguous (the backward's products read dy by rows; most calls get it so already)."""
    rows = _rows(t)
    return rows if rows.is_contiguous() else rows.contiguous()


class _LoraLinearEager(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, p, seed, seed_t, fwd_backend, bwd_backend):
        keep = None
        if fwd_backend == bwd_backend == "torch" and p > 0.0:
            # The torch backend keeps its bool mask (1 byte per element of x) rather than draw it again in backward:
            # on the host a draw costs more than the kernels' regeneration does on a GPU.
            y, t, keep = ref.lora_linear_fwd(_rows(x), weight, bias, lora_A, lora_B, scaling, p, seed, want_keep=True)
        else:
            y, t = _fwd_impl(fwd_backend)(_rows(x), weight, bias, lora_A, lora_B, scaling, p, seed)
        # The seed tensor is saved as the op saves it, so both paths keep the same bytes for backward (but the mask).
        ctx.save_for_backward(x, weight, lora_A, lora_B, t, seed_t, keep)
        ctx.scaling, ctx.dropout_p, ctx.seed, ctx.backend = scaling, p, seed, bwd_backend
        ctx.has_bias = bias is not None
        return y if x.dim() == 2 else standalone(y, (*x.shape[:-1], weight.shape[0]))

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, t, _, keep = ctx.saved_tensors
        need_dx, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
        dx = d_a = d_b = None
        if need_dx or need_a or need_bb:
            dy2d = _contiguous_rows(dy)
            args = (dy2d, _rows(x), weight, lora_A, lora_B, t, ctx.scaling, ctx.dropout_p, ctx.seed, need_dx,
                    need_a or need_bb)
            dx, d_a, d_b = ref.lora_linear_bwd(*args, keep=keep) if keep is not None else _bwd_impl(ctx.backend)(*args)
            if need_dx and x.dim() != 2:
                dx = dx.reshape(x.shape)
        return (dx, *_base_grads(dy, x, need_w, need_b and ctx.has_bias), d_a if need_a else None,
                d_b if need_bb else None, None, None, None, None, None, None)


class _LoraLinearEagerFp32(torch.autograd.Function):
    """The torch backend for fp32 x and adapters (the CPU case): the fewest host calls each way
    (reference.lora.lora_linear_fwd_fp32). It keeps the bool mask for backward (1 byte per element of x; peft's
    F.dropout path keeps 8)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, p, seed):
        y, ts, keep = ref.lora_linear_fwd_fp32(x, weight, bias, lora_A, lora_B, scaling, p, seed)
        # x and W only where a gradient needs them (a 4-bit base's W is rebuilt in backward when saved: _dequant.py)
        w_grad = weight.requires_grad or (bias is not None and bias.requires_grad)
        ctx.save_for_backward(x if lora_A.requires_grad or w_grad else None, weight if x.requires_grad else None,
                              lora_A, lora_B, ts, keep)
        ctx.scaling, ctx.p, ctx.has_bias, ctx.x_shape = scaling, p, bias is not None, x.shape
        return y if x.dim() == 2 else standalone(y, (*x.shape[:-1], weight.shape[0]))

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, ts, keep = ctx.saved_tensors
        need_dx, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
        dx = d_a = d_b = None
        if need_dx or need_a or need_bb:
            dy2d = _contiguous_rows(dy)
            dx, d_a, d_b = ref.lora_linear_bwd_fp32(dy2d, None if x is None else _rows(x), weight, lora_A, lora_B,
                                                    ts, ctx.scaling, ctx.p, keep, need_dx, need_a, need_bb)
            if dx is not None and len(ctx.x_shape) != 2:
                dx = dx.reshape(ctx.x_shape)
        return (dx, *_base_grads(dy, x, need_w, need_b and ctx.has_bias), d_a, d_b, None, None, None)


def _lora_linear_eager(x, weight, bias, lora_A, lora_B, scaling, p):
    fwd, bwd = _backends(x.device, lora_A.shape[0])
    if not fwd:  # an explicit cuda request: the op decides per call (its decode kernel depends on M)
        return None
    fp32_torch = fwd == bwd == "torch" and x.dtype == lora_A.dtype == torch.float32
    if fp32_torch and x.is_cpu:
        host = _host_ext.module()
        if host is not None:  # the same math as one C++ autograd node (_host_ext.py): no Python per call or in backward
            # The seed is drawn in C++ (the same value: test_host_ext.py), unless draw_seed was replaced (tests
            # record seeds that way): then every draw still goes through it.
            seed = -1 if draw_seed is _DRAW_SEED or p == 0.0 else int(draw_seed(p))
            return host.lora_linear_fp32(x, weight, bias, lora_A, lora_B, scaling, p, seed)
    # With dropout the mask comes from a seed even under no_grad: reentrant checkpointing runs the forward without
    # grad and recomputes it with grad, and the seed (drawn from torch's generator) is what repeats.
    seed_t = draw_seed(p)
    seed = int(seed_t) if seed_t is not None else 0
    grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or lora_A.requires_grad
                                        or lora_B.requires_grad or (bias is not None and bias.requires_grad))
    if fp32_torch:
        if grad:
            return _LoraLinearEagerFp32.apply(x, weight, bias, lora_A, lora_B, scaling, p, seed)
        y = ref.lora_linear_fwd_fp32(x, weight, bias, lora_A, lora_B, scaling, p, seed)[0]
    elif grad:
        return _LoraLinearEager.apply(x, weight, bias, lora_A, lora_B, scaling, p, seed, seed_t, fwd, bwd)
    else:
        y, _ = _fwd_impl(fwd)(_rows(x), weight, bias, lora_A, lora_B, scaling, p, seed)
    return y if x.dim() == 2 else standalone(y, (*x.shape[:-1], weight.shape[0]))


def _checked(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
             scaling: float, dropout_p: float) -> Tensor:
    """`lora_linear` for a caller that has checked every argument as `lora_linear` checks them (the integrations'
    per-layer plans check the weights once per layer state and x per call): the same path without the checks."""
    if _eager(x):
        y = _lora_linear_eager(x, weight, bias, lora_A, lora_B, scaling, dropout_p)
        if y is not None:
            return y
    y, _ = torch.ops.peftkern.lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, draw_seed(dropout_p))
    return y


# The integrations' entry (tests count its calls by replacing it); a projection group run member by member calls
# _checked itself, so a group is one call of lora_linear_group_checked, not that plus one per member.
lora_linear_checked = _checked


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                scaling: float, dropout_p: float = 0.0) -> Tensor:
    """Fused LoRA linear: ``x @ weight.T + bias + scaling * (dropout(x) @ lora_A.T) @ lora_B.T``.

    x: (..., in); weight: (out, in); bias: (out,) or None; lora_A: (r, in); lora_B: (out, r).
    x and weight share a dtype (fp32/fp16/bf16); lora_A/lora_B may be fp32 on a half base, as peft
    keeps them. The result has x's dtype. Dropout is applied when dropout_p > 0 (pass 0.0 in eval),
    from a seed drawn from torch's default generator; the mask is regenerated in backward.
    Under autocast every float operand is cast to autocast's dtype, as autocast casts F.linear's (peft's layer under
    autocast), and the result has that dtype.
    """
    if isinstance(x, Tensor) and (torch.compiler.is_compiling() or torch._C._is_any_autocast_enabled()):
        dt = _backend.autocast_dtype(x.device.type)
        if dt is not None:
            x, weight, bias, lora_A, lora_B = (t.to(dt) if isinstance(t, Tensor) and t.is_floating_point() else t
                                               for t in (x, weight, bias, lora_A, lora_B))
            _validate.lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p)
            with torch.autocast(x.device.type, enabled=False):  # cast already: no recast inside
                return lora_linear_checked(x, weight, bias, lora_A, lora_B, float(scaling), float(dropout_p))
    _validate.lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p)
    return lora_linear_checked(x, weight, bias, lora_A, lora_B, float(scaling), float(dropout_p))
