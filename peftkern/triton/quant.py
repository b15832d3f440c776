"""@triton.jit dequantisation of bitsandbytes 4-bit weights (NF4 / FP4, optional double quantisation) into a dense
(out, in) tensor, for the dequant-then-GEMM path of LoRA on a 4-bit base (ops/lora_4bit.py). Layout and math as
reference/quant.py. One program per BLOCK flat elements; the code tables are loaded by index (16 / 256 entries,
they stay in L1)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _backend

_BLOCK = 1024


@triton.jit
def _dequant4_kernel(a_ptr, code_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, out_ptr, n,
                     blocksize, blocksize2, NESTED: tl.constexpr, MID: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    byte = tl.load(a_ptr + offs // 2, mask=mask, other=0).to(tl.int32)
    nib = tl.where(offs % 2 == 0, byte >> 4, byte & 0xF)
    c = tl.load(code_ptr + nib, mask=mask, other=0.0)
    blk = offs // blocksize
    if NESTED:
        qa = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        am = tl.load(code2_ptr + qa, mask=mask, other=0.0) * tl.load(absmax2_ptr + blk // blocksize2, mask=mask,
                                                                       other=0.0)
        am = am + tl.load(offset_ptr)
    else:
        am = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
    v = c * am
    tl.store(out_ptr + offs, v.to(MID).to(out_ptr.dtype.element_ty), mask=mask)


_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def dequantize_4bit(data: torch.Tensor, qs, dtype: torch.dtype) -> torch.Tensor:
    """Launch: the (out, in) weight of packed `data` (QuantState `qs`) in `dtype`, a new tensor."""
    a = data.reshape(-1)
    if a.dtype != torch.uint8:
        a = a.view(torch.uint8)
    mid = qs.dtype
    # Triton 3.8's interpreter rounds fp32 -> bf16 toward zero (whatever fp_downcast_rounding says); the GPU
    # rounds to nearest even as torch does. Under the interpreter a bf16 rounding is left to torch.
    host_cast = _backend.interpreting() and torch.bfloat16 in (mid, dtype)
    out = torch.empty(tuple(qs.shape), dtype=torch.float32 if host_cast else dtype, device=a.device)
    n = out.numel()
    if n == 0:
        return out
    code = qs.code.to(device=a.device, dtype=torch.float32)
    if qs.nested:
        s2 = qs.state2
        absmax, code2, absmax2 = qs.absmax, s2.code.to(a.device, torch.float32), s2.absmax.float()
        offset, bs2 = qs.offset.to(a.device, torch.float32).reshape(1), s2.blocksize
    else:
        absmax = qs.absmax.float()
        code2 = absmax2 = offset = absmax  # unused (NESTED=False)
        bs2 = 1
    grid = (triton.cdiv(n, _BLOCK),)
    _dequant4_kernel[grid](a, code, absmax, code2, absmax2, offset, out, n, qs.blocksize, bs2,
                           NESTED=bool(qs.nested), MID=tl.float32 if host_cast else _TL[mid], BLOCK=_BLOCK)
    return out.to(mid).to(dtype) if host_cast else out
