"""@triton.jit passes of peftkern::dora_linear around the fused LoRA GEMM (ops/dora.py, math in reference/dora.py):
the magnitude scale in one pass each way, where torch took several over (M, out) with fp32 temporaries.

forward:  y = g ⊙ u + b                      (u = x Wᵀ + s·(x Aᵀ) Bᵀ from the LoRA kernels; fp32 math, one rounding)
backward: dy' = g ⊙ dy  and  Σ_rows dy ⊙ u   (one read of dy and u; column sums in splits of rows, fp32)

cuBLAS (the GEMM on a GPU, ops/lora.py's "cublas" mode) takes no per-column scale in its epilogue, so the scale is
this one extra read and write of (M, out) after it: 4 bytes an element in bf16 instead of ~28 through torch."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET

_BLOCK_M, _BLOCK_N = 32, 128


@triton.jit
def _dora_scale_kernel(u_ptr, g_ptr, bias_ptr, y_ptr, M, N, stride_um, stride_un, stride_ym, stride_yn,
                       HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    mask = (offs_m[:, None] < M) & n_ok[None, :]
    u = tl.load(u_ptr + offs_m[:, None] * stride_um + offs_n[None, :] * stride_un, mask=mask, other=0.0)
    y = u.to(tl.float32) * tl.load(g_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn, y.to(y_ptr.dtype.element_ty),
             mask=mask)


def dora_scale(u: torch.Tensor, g: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """y (M, N) in `dtype` = g ⊙ u + bias, g fp32 (N,), computed in fp32 and rounded once."""
    M, N = u.shape
    y = torch.empty((M, N), dtype=dtype, device=u.device)
    if M == 0 or N == 0:
        return y
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()
    g = g.contiguous()
    grid = (triton.cdiv(M, _BLOCK_M), triton.cdiv(N, _BLOCK_N))
    _dora_scale_kernel[grid](u, g, bias if bias is not None else g, y, M, N, u.stride(0), u.stride(1), y.stride(0),
                             y.stride(1), HAS_BIAS=bias is not None, BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N)
    return y


@triton.jit
def _dora_scale_bwd_kernel(dy_ptr, u_ptr, g_ptr, dyg_ptr, part_ptr, M, N, rows_per_split, stride_dm, stride_dn,
                           stride_um, stride_un, stride_gm, stride_gn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    n_ok = offs_n < N
    g = tl.load(g_ptr + offs_n, mask=n_ok, other=0.0)
    col = tl.zeros((BLOCK_N,), dtype=tl.float32)
    start = split * rows_per_split
    end = tl.minimum(start + rows_per_split, M)
    for m0 in range(start, end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask = (offs_m[:, None] < end) & n_ok[None, :]
        dy = tl.load(dy_ptr + offs_m[:, None] * stride_dm + offs_n[None, :] * stride_dn, mask=mask,
                     other=0.0).to(tl.float32)
        u = tl.load(u_ptr + offs_m[:, None] * stride_um + offs_n[None, :] * stride_un, mask=mask,
                    other=0.0).to(tl.float32)
        col += tl.sum(dy * u, axis=0)
        tl.store(dyg_ptr + offs_m[:, None] * stride_gm + offs_n[None, :] * stride_gn,
                 (dy * g[None, :]).to(dyg_ptr.dtype.element_ty), mask=mask)
    tl.store(part_ptr + split * N + offs_n, col, mask=n_ok)


def _splits(M: int, N: int, device) -> int:
    if INTERPRET or device.type != "cuda" or M < 512:
        return 1 if M < 512 else 2
    from ._common import sm_count

    sms = sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(triton.cdiv(2 * sms, triton.cdiv(N, _BLOCK_N)), triton.cdiv(M, 256), 64))


def dora_scale_bwd(dy: torch.Tensor, u: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(g ⊙ dy in dy's dtype, Σ_rows dy ⊙ u in fp32 (N,)) from one read of dy and u (M, N); g fp32 (N,)."""
    M, N = dy.shape
    dyg = torch.empty_like(dy)
    if M == 0 or N == 0:
        return dyg, torch.zeros((N,), dtype=torch.float32, device=dy.device)
    split = _splits(M, N, dy.device)
    rows = triton.cdiv(M, split)
    part = torch.empty((split, N), dtype=torch.float32, device=dy.device)
    g = g.contiguous()
    grid = (triton.cdiv(N, _BLOCK_N), split)
    _dora_scale_bwd_kernel[grid](dy, u, g, dyg, part, M, N, rows, dy.stride(0), dy.stride(1), u.stride(0),
                                 u.stride(1), dyg.stride(0), dyg.stride(1), BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N)
    return dyg, (part[0] if split == 1 else part.sum(0))
