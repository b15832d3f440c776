"""LoRA on a bitsandbytes 4-bit (NF4 / FP4) base: y = x deq(W)ᵀ + b + s · (drop(x) Aᵀ) Bᵀ.

Design (dequant-then-GEMM, ops/_dequant.py): `peftkern::dequantize_4bit` (a Triton kernel on CUDA / under the
interpreter, torch on CPU) writes the frozen weight in the compute dtype as a per-call temporary, and
`ops.lora.lora_linear_checked` runs the fused LoRA GEMM on it (same kernels, dropout seed and masks as plain LoRA).
The temporary is freed when the forward returns: autograd does not keep it, because the saved copy of the weight is
replaced by a recipe (saved_tensors_hooks) and the backward dequantises again for dx = dy W. No persistent
full-precision copy. Inference at M <= 16 rows (decode) takes `peftkern::lora_linear_4bit_decode` instead: the
Triton GEMV reads the packed weight once and dequantises it in registers (no temporary written and read back).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _validate
from ..reference import lora as _lora_ref
from ..reference import quant as ref
from . import _dequant
from ._out import standalone

_DTYPES = {torch.float32, torch.float16, torch.bfloat16}


def _triton():
    from ..triton import quant as tri  # imported lazily: no Triton work at `import peftkern`

    return tri


class _State:
    """The fields of a bitsandbytes QuantState the kernels read, from plain tensors (op arguments)."""

    __slots__ = ("absmax", "blocksize", "code", "dtype", "nested", "offset", "shape", "state2")

    def __init__(self, code, absmax, code2, absmax2, offset, shape, blocksize, blocksize2, mid_dtype):
        self.code, self.absmax, self.offset = code, absmax, offset
        self.shape, self.blocksize, self.dtype = tuple(shape), blocksize, mid_dtype
        self.nested = code2 is not None
        self.state2 = (_State(code2, absmax2, None, None, None, (), blocksize2, 0, torch.float32) if self.nested
                       else None)


@torch.library.custom_op("peftkern::dequantize_4bit", mutates_args=())
def dequantize_4bit_op(
    data: Tensor, code: Tensor, absmax: Tensor, code2: Tensor | None, absmax2: Tensor | None, offset: Tensor | None,
    shape: list[int], blocksize: int, blocksize2: int, mid_dtype: torch.dtype, dtype: torch.dtype,
) -> Tensor:
    """The (out, in) weight of packed 4-bit `data` (two codes per byte, high nibble first) in `dtype`; code2 /
    absmax2 / offset given for a double-quantised absmax. Values are rounded to `mid_dtype` (the dtype the
    weight was quantised from) before `dtype`, as bitsandbytes' dequantize_4bit(...).to(dtype)."""
    torch._check(code.numel() == 16, lambda: f"dequantize_4bit: code must have 16 entries, got {code.numel()}")
    torch._check(dtype in _DTYPES and mid_dtype in _DTYPES, lambda: "dequantize_4bit: dtype must be fp32/fp16/bf16")
    torch._check((code2 is None) == (absmax2 is None) == (offset is None),
                 lambda: "dequantize_4bit: code2, absmax2 and offset go together (double quantisation)")
    st = _State(code, absmax, code2, absmax2, offset, shape, blocksize, blocksize2, mid_dtype)
    backend = dequant_backend(data.device)
    if backend == "triton":
        return _triton().dequantize_4bit(data, st, dtype)
    return ref.dequantize_4bit(data, st, dtype)


def dequant_backend(device) -> str:
    """The dequantisation's backend for `device`: the cuda backend has no C++ dequant kernel and runs Triton's
    (its design, as the LoRA backward: not a fallback)."""
    return _dequant.backend("dequantize_4bit", device)


@dequantize_4bit_op.register_fake
def _(data, code, absmax, code2, absmax2, offset, shape, blocksize, blocksize2, mid_dtype, dtype):
    return data.new_empty(shape, dtype=dtype)


def state_args(qs) -> tuple:
    """A bitsandbytes QuantState as dequantize_4bit_op's arguments after `data`, less the output dtype."""
    if qs.nested:
        s2 = qs.state2
        nested = (s2.code, s2.absmax, qs.offset.reshape(1) if qs.offset.dim() == 0 else qs.offset)
        bs2 = s2.blocksize
    else:
        nested, bs2 = (None, None, None), 0
    return (qs.code, qs.absmax, *nested, list(qs.shape), qs.blocksize, bs2, qs.dtype)


def dequantize(weight: Tensor, qs, dtype: torch.dtype) -> Tensor:
    """Dequantise a bitsandbytes `Params4bit` (or its packed data) with QuantState `qs` to `dtype`."""
    data = weight.data if isinstance(weight, torch.nn.Parameter) else weight
    return torch.ops.peftkern.dequantize_4bit(data, *state_args(qs), dtype)


def lora_linear_4bit(x: Tensor, weight: Tensor, qs, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                     scaling: float, dropout_p: float) -> Tensor:
    """`lora_linear` with a 4-bit base: x (..., in) in the compute dtype, `weight` a Params4bit with QuantState
    `qs`, bias (out,) in x's dtype or None. The dequantised weight lives for this call only (see module doc)."""
    dtype = x.dtype
    if decode_applies(x, bias, lora_A, lora_B, dropout_p):
        return lora_linear_4bit_decode(x, weight, qs, bias, lora_A, lora_B, scaling)
    w = dequantize(weight, qs, dtype)
    # `dequantize` is looked up when the backward runs (a module global, as in the forward)
    return _dequant.lora_linear(x, w, lambda: dequantize(weight, qs, dtype), bias, lora_A, lora_B, scaling,
                                dropout_p)


# ------------------------------------------------------------------------------- decode: the 4-bit weight read once

DECODE_MAX_M = 16  # rows up to which inference reads the packed weight in the GEMV kernel (no dequantised temporary)


@torch.library.custom_op("peftkern::lora_linear_4bit_decode", mutates_args=())
def lora_linear_4bit_decode_op(
    x: Tensor, data: Tensor, code: Tensor, absmax: Tensor, code2: Tensor | None, absmax2: Tensor | None,
    offset: Tensor | None, shape: list[int], blocksize: int, blocksize2: int, mid_dtype: torch.dtype,
    bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, scaling: float,
) -> Tensor:
    """Inference (no dropout, no autograd): x deq(W)ᵀ + bias + scaling · (x Aᵀ) Bᵀ, W the packed 4-bit weight
    (dequantize_4bit's arguments). The Triton kernel reads W once in 4 bits and dequantises it in registers; the
    torch backend dequantises into a temporary (the reference)."""
    _validate.lora_linear_4bit_decode(x, data, code, absmax, shape, bias, lora_A, lora_B, scaling)
    st = _State(code, absmax, code2, absmax2, offset, shape, blocksize, blocksize2, mid_dtype)
    x2d = x.reshape(-1, x.shape[-1])
    if _dequant.backend("lora_linear_4bit_decode", x.device) == "triton":
        y = _triton().lora_linear_4bit_decode(x2d, data, st, bias, lora_A, lora_B, scaling)
    else:
        w = ref.dequantize_4bit(data, st, x.dtype)
        y, _ = _lora_ref.lora_linear_fwd(x2d, w, bias, lora_A, lora_B, scaling, 0.0, 0)
    return standalone(y, (*x.shape[:-1], shape[0]))


@lora_linear_4bit_decode_op.register_fake
def _(x, data, code, absmax, code2, absmax2, offset, shape, blocksize, blocksize2, mid_dtype, bias, lora_A, lora_B,
      scaling):
    _validate.lora_linear_4bit_decode(x, data, code, absmax, shape, bias, lora_A, lora_B, scaling)
    return x.new_empty((*x.shape[:-1], shape[0]))


def decode_applies(x: Tensor, bias, lora_A: Tensor, lora_B: Tensor, dropout_p: float) -> bool:
    """Whether a call takes the decode op: at most DECODE_MAX_M rows, no dropout, and nothing to differentiate."""
    if dropout_p != 0.0 or x.dim() < 1 or x.numel() > DECODE_MAX_M * x.shape[-1]:
        return False
    return not (torch.is_grad_enabled() and (x.requires_grad or lora_A.requires_grad or lora_B.requires_grad
                                             or (bias is not None and bias.requires_grad)))


def lora_linear_4bit_decode(x: Tensor, weight: Tensor, qs, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                            scaling: float) -> Tensor:
    """The decode op on a bitsandbytes `Params4bit` (or its packed data) with QuantState `qs`."""
    data = weight.data if isinstance(weight, torch.nn.Parameter) else weight
    return torch.ops.peftkern.lora_linear_4bit_decode(x, data, *state_args(qs)[:-1], qs.dtype, bias, lora_A, lora_B,
                                                      float(scaling))
