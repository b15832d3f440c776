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


# ---------------------------------------------------------------- 4-bit decode: LoRA GEMV reading the packed weight


@triton.jit
def _rounded(v, BF16: tl.constexpr, FP16: tl.constexpr):
    """fp32 `v` rounded to nearest-even bf16 / fp16 precision, still fp32 (exact as bf16 / fp16 then). bf16 by bits:
    Triton 3.8's interpreter rounds fp32 -> bf16 toward zero, the GPU to nearest even; this is nearest even on both."""
    if BF16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        v = bits.to(tl.float32, bitcast=True)
    elif FP16:
        v = v.to(tl.float16).to(tl.float32)
    return v


@triton.jit
def _lora4_decode_kernel(x_ptr, a_ptr, code_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, t_ptr, u_ptr,
                         bias_ptr, out_ptr, M, N, K, R, blocksize, blocksize2, stride_xm, stride_xk, stride_tm,
                         stride_tr, stride_un, stride_ur, stride_om, stride_on, scaling,
                         NESTED: tl.constexpr, HAS_BIAS: tl.constexpr, MID_BF16: tl.constexpr,
                         MID_FP16: tl.constexpr, X_BF16: tl.constexpr, X_FP16: tl.constexpr, PREC: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """OUT (M, N) = x · deq(W)ᵀ + scaling · t · Uᵀ + bias, one rounding at the end. W[n, k] is read from the packed
    4-bit data (flat index n·K + k, two codes per byte, high nibble first) and dequantised in registers exactly as
    dequantize_4bit writes it (code · absmax in fp32, rounded to the quantised-from dtype, then to x's): the weight
    is read once, in 4 bits, never written. t = x Aᵀ (fp32, (M, r)); U[n, r] is lora_B."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        flat = offs_n[None, :].to(tl.int64) * K + offs_k[:, None]  # (BLOCK_K, BLOCK_N): W[n, k] as Wᵀ's tile
        w_ok = k_ok[:, None] & n_ok[None, :]
        byte = tl.load(a_ptr + flat // 2, mask=w_ok, other=0).to(tl.int32)
        nib = tl.where(flat % 2 == 0, byte >> 4, byte & 0xF)
        c = tl.load(code_ptr + nib, mask=w_ok, other=0.0)
        blk = flat // blocksize
        if NESTED:
            qa = tl.load(absmax_ptr + blk, mask=w_ok, other=0).to(tl.int32)
            am = tl.load(code2_ptr + qa, mask=w_ok, other=0.0) * tl.load(absmax2_ptr + blk // blocksize2, mask=w_ok,
                                                                           other=0.0)
            am = am + tl.load(offset_ptr)
        else:
            am = tl.load(absmax_ptr + blk, mask=w_ok, other=0.0)
        w = _rounded(_rounded(c * am, MID_BF16, MID_FP16), X_BF16, X_FP16)  # the dequantised weight's values
        # x and w hold x's dtype's values in fp32: a tf32 dot multiplies them exactly for fp16 / bf16 x
        acc += tl.dot(x, w, input_precision=PREC)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_ok = offs_r < R
        t = tl.load(t_ptr + offs_m[:, None] * stride_tm + offs_r[None, :] * stride_tr,
                    mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        u = tl.load(u_ptr + offs_n[None, :] * stride_un + offs_r[:, None] * stride_ur,
                    mask=r_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
        acc += scaling * tl.dot(t, u, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out = _rounded(acc, X_BF16, X_FP16)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             out.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


_DECODE_BLOCKS = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, BLOCK_R=16)


def lora_linear_4bit_decode(x2d, data, qs, bias, lora_A, lora_B, scaling) -> torch.Tensor:
    """(M, out) in x's dtype: x · deq(W)ᵀ + bias + scaling · (x Aᵀ) Bᵀ with W read once from the packed 4-bit `data`
    (QuantState-like `qs`), for inference at small M (no dropout, nothing saved)."""
    from ._common import dot_precision
    from .lora import shrink

    M, K = x2d.shape
    N = qs.shape[0]
    out = torch.empty((M, N), dtype=x2d.dtype, device=x2d.device)
    if M == 0 or N == 0:
        return out
    r = lora_A.shape[0]
    t = shrink(x2d, lora_A.stride(), lora_A, r, 1.0, 0.0, None, "ieee")  # fp32 (M, r) = x Aᵀ
    a = data.reshape(-1)
    if a.dtype != torch.uint8:
        a = a.view(torch.uint8)
    code = qs.code.to(device=a.device, dtype=torch.float32)
    if qs.nested:
        s2 = qs.state2
        absmax, code2, absmax2 = qs.absmax, s2.code.to(a.device, torch.float32), s2.absmax.float()
        offset, bs2 = qs.offset.to(a.device, torch.float32).reshape(1), s2.blocksize
    else:
        absmax = qs.absmax.float()
        code2 = absmax2 = offset = absmax  # unused (NESTED=False)
        bs2 = 1
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()
    b = _DECODE_BLOCKS
    grid = (triton.cdiv(M, b["BLOCK_M"]), triton.cdiv(N, b["BLOCK_N"]))
    _lora4_decode_kernel[grid](
        x2d, a, code, absmax, code2, absmax2, offset, t, lora_B, bias if bias is not None else t, out,
        M, N, K, r, qs.blocksize, bs2, x2d.stride(0), x2d.stride(1), t.stride(0), t.stride(1),
        lora_B.stride(0), lora_B.stride(1), out.stride(0), out.stride(1), float(scaling),
        NESTED=bool(qs.nested), HAS_BIAS=bias is not None, MID_BF16=qs.dtype == torch.bfloat16,
        MID_FP16=qs.dtype == torch.float16, X_BF16=x2d.dtype == torch.bfloat16, X_FP16=x2d.dtype == torch.float16,
        PREC=dot_precision(torch.float32) if x2d.dtype == torch.float32 else "tf32", **b)
    return out
