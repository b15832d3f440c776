"""LoRA on a bitsandbytes 8-bit base (Linear8bitLt, has_fp16_weights=False): y = x deq(W)ᵀ + b + s · (drop(x) Aᵀ) Bᵀ.

The base weight is `CB` int8 (out, in) with one fp32 absmax per row, `SCB` (out,); deq(W) = CB · (SCB · fp32(1/127))
computed in fp32 and rounded once to the compute dtype, exactly as bitsandbytes' dequantising matmul
(`MatMul8bitFp`, its training path on CPU/XPU) and the dx of both its matmuls do. Design as lora_4bit.py
(dequant-then-GEMM, ops/_dequant.py): `peftkern::dequantize_8bit` (a Triton kernel on CUDA / under the interpreter,
torch on CPU) writes the weight as a per-call temporary, `ops.lora.lora_linear_checked` runs the fused LoRA GEMM on
it, and autograd keeps a recipe instead of the temporary (the backward dequantises again). No persistent or saved
full-precision copy.

Not LLM.int8: bitsandbytes' int8 matmul (CUDA, and eval on CPU) quantises the activations row-wise to int8 (outlier
columns above `threshold` in fp16); this op never does, so its result is the unquantised-activation x deq(W)ᵀ.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _validate
from ..reference import quant as ref
from . import _dequant


def _triton():
    from ..triton import quant as tri  # imported lazily: no Triton work at `import peftkern`

    return tri


@torch.library.custom_op("peftkern::dequantize_8bit", mutates_args=())
def dequantize_8bit_op(CB: Tensor, SCB: Tensor, dtype: torch.dtype) -> Tensor:
    """The (out, in) weight of int8 `CB` (out, in) with fp32 row absmax `SCB` (out,), in `dtype`."""
    _validate.dequantize_8bit(CB, SCB, dtype)
    if dequant_backend(CB.device) == "triton":
        return _triton().dequantize_8bit(CB, SCB, dtype)
    return ref.dequantize_8bit(CB, SCB, dtype)


@dequantize_8bit_op.register_fake
def _(CB, SCB, dtype):
    _validate.dequantize_8bit(CB, SCB, dtype)
    return CB.new_empty(CB.shape, dtype=dtype)


def dequant_backend(device) -> str:
    """The dequantisation's backend for `device` (a cuda request runs Triton's kernel: see _dequant.backend)."""
    return _dequant.backend("dequantize_8bit", device)


def _plain(t: Tensor) -> Tensor:
    return t.data if isinstance(t, torch.nn.Parameter) else t


def dequantize(CB: Tensor, SCB: Tensor, dtype: torch.dtype) -> Tensor:
    """Dequantise a Linear8bitLt's `CB` (int8, out x in) with row scales `SCB` to `dtype`."""
    return torch.ops.peftkern.dequantize_8bit(_plain(CB), _plain(SCB), dtype)


def lora_linear_8bit(x: Tensor, CB: Tensor, SCB: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                     scaling: float, dropout_p: float) -> Tensor:
    """`lora_linear` with an 8-bit base: x (..., in) in the dtype the base computes in (bitsandbytes: x's own),
    `CB` / `SCB` the Linear8bitLt's int8 weight and row scales, bias (out,) in x's dtype or None. The dequantised
    weight lives for this call only (see module doc)."""
    dtype = x.dtype
    w = dequantize(CB, SCB, dtype)
    # `dequantize` is looked up when the backward runs (a module global, as in the forward)
    return _dequant.lora_linear(x, w, lambda: dequantize(CB, SCB, dtype), bias, lora_A, lora_B, scaling, dropout_p)
