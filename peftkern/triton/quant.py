"""@triton.jit dequantisation of bitsandbytes weights into a dense (out, in) tensor, for the dequant-then-GEMM path
of LoRA on a quantised base: 4-bit (NF4 / FP4, optional double quantisation; ops/lora_4bit.py) and 8-bit
(Linear8bitLt's int8 rows with an fp32 absmax each; ops/lora_8bit.py). Layout and math as reference/quant.py.
4-bit: one program per BLOCK flat elements; the code tables are loaded by index (16 / 256 entries, they stay in L1).
8-bit: one program per (BLOCK_M rows, BLOCK_N columns) tile, the row scales loaded once per tile."""

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


_INV127 = tl.constexpr(1.0 / 127.0)  # a literal, rounded to fp32 where it meets fp32 (no fp32 division on the GPU)


@triton.jit
def _dequant8_kernel(cb_ptr, scb_ptr, out_ptr, n_rows, n_cols, stride_cb, stride_out,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < n_rows
    mask = rmask[:, None] & (cols < n_cols)[None, :]
    # bitsandbytes: SCB * (1/127) in fp32 (the Python float rounds to fp32), then the product in fp32
    scale = tl.load(scb_ptr + rows, mask=rmask, other=0.0) * _INV127
    cb = tl.load(cb_ptr + rows[:, None] * stride_cb + cols[None, :], mask=mask, other=0).to(tl.float32)
    v = cb * scale[:, None]
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], v.to(out_ptr.dtype.element_ty), mask=mask)


_BLOCK_M8, _BLOCK_N8 = 8, 512


def dequantize_8bit(CB: torch.Tensor, SCB: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Launch: the (out, in) weight of int8 `CB` with fp32 row scales `SCB` in `dtype`, a new tensor."""
    # Under the interpreter the bf16 rounding is left to torch (see dequantize_4bit): one rounding either way.
    host_cast = _backend.interpreting() and dtype == torch.bfloat16
    n_rows, n_cols = CB.shape
    out = torch.empty((n_rows, n_cols), dtype=torch.float32 if host_cast else dtype, device=CB.device)
    if out.numel() == 0:
        return out.to(dtype)
    if CB.stride(1) != 1:
        CB = CB.contiguous()
    scb = SCB.contiguous()
    grid = (triton.cdiv(n_rows, _BLOCK_M8), triton.cdiv(n_cols, _BLOCK_N8))
    _dequant8_kernel[grid](CB, scb, out, n_rows, n_cols, CB.stride(0), out.stride(0),
                           BLOCK_M=_BLOCK_M8, BLOCK_N=_BLOCK_N8)
    return out.to(dtype) if host_cast else out
