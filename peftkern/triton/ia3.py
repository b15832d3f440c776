"""Fused IA3 linear: Triton kernels and launchers.

One GEMM kernel, C = A·B (fp32 accumulate), whose prologue / epilogue flags cover three passes:
  output case   fwd:  y  = (x Wᵀ + b) ⊙ l           l and bias in the epilogue, y rounded once
                bwd:  dx = (dy ⊙ l) W               dy tiles scaled as they load
                      dl = Σ_m dy ⊙ y / l           a separate column reduction (Z = y / l)
  feed-forward  fwd:  y  = (x ⊙ l) Wᵀ + b           x tiles scaled (and rounded, as peft does) as they load
                bwd:  g = dy W,  dx = g ⊙ l,  dl = Σ_m x ⊙ g    x tile read in the epilogue
Column sums go to fp32 partials, one row per PART_M rows of M, summed afterwards in torch: no
atomics, deterministic. No M×N (or M×K) intermediate is ever written.

Why the output-case dl is not fused into the dx GEMM (which streams the dy tiles anyway): reading
the y tile and reducing inside the K loop broke the loop's software pipeline; on an H100 (bf16,
M=8192, 4096→4096) the fused backward took 1.07 ms against 0.37 ms for the frozen base's dx GEMM,
while a separate pass over dy and y costs one read of 2·M·N elements (~0.05 ms).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import GEMM_CONFIGS, dot_precision, grouped_pid, m_key, upcast_dots

PART_M = 16  # rows of M per partial-sum row (the smallest BLOCK_M of every config)




@triton.jit
def _colsum_parts(prod, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PART_ROWS: tl.constexpr):
    """(BLOCK_M, BLOCK_N) -> (BLOCK_M // PART_ROWS, BLOCK_N): sums over each run of PART_ROWS rows."""
    return tl.sum(tl.reshape(prod, (BLOCK_M // PART_ROWS, PART_ROWS, BLOCK_N)), axis=1)


@triton.autotune(configs=GEMM_CONFIGS, key=["N", "K", "M_KEY", "SCALE_A", "REDUCE_C"])
@triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})
@triton.jit
def _ia3_gemm_kernel(
    A, B, L, BIAS, E, OUT, PART,
    M, N, K, M_KEY,
    sam, sak, sbk, sbn, sem, sen, som, son,
    SCALE_A: tl.constexpr, SCALE_C: tl.constexpr, HAS_BIAS: tl.constexpr,
    REDUCE_C: tl.constexpr, STORE_C: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr, PART_ROWS: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C[m, n] = Σ_k A'[m,k] B[k,n] with A' = A ⊙ L[k] (SCALE_A, rounded to A's dtype) or A.

    Epilogue: OUT = (C + BIAS[n]) ⊙ L[n] (HAS_BIAS, SCALE_C), stored if STORE_C.
    REDUCE_C: PART[m // PART_ROWS, n] = Σ C[m,n] E[m,n] over E of shape (M, N), C before the epilogue.
    """
    pid_m, pid_n = grouped_pid(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    # Rows / columns past the edge re-read valid ones (no load masks); they are masked out of
    # stores and zeroed before any sum over m.
    rm = tl.max_contiguous(tl.multiple_of(offs_m % M, BLOCK_M), BLOCK_M)
    rn = tl.max_contiguous(tl.multiple_of(offs_n % N, BLOCK_N), BLOCK_N)
    a_ptrs = A + rm[:, None] * sam + offs_k[None, :] * sak
    b_ptrs = B + offs_k[:, None] * sbk + rn[None, :] * sbn
    part_rows = pid_m * (BLOCK_M // PART_ROWS) + tl.arange(0, BLOCK_M // PART_ROWS)
    part_ok = part_rows < tl.cdiv(M, PART_ROWS)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        kk = kb * BLOCK_K + offs_k
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            a = tl.load(a_ptrs, mask=kk[None, :] < K, other=0.0)
            b = tl.load(b_ptrs, mask=kk[:, None] < K, other=0.0)
        if SCALE_A:
            lk = tl.load(L + kk, mask=kk < K, other=0.0).to(tl.float32)
            a = (a.to(tl.float32) * lk[None, :]).to(A.dtype.element_ty)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PREC)
        a_ptrs += BLOCK_K * sak
        b_ptrs += BLOCK_K * sbk

    n_ok = offs_n < N
    if REDUCE_C:
        e = tl.load(E + rm[:, None] * sem + rn[None, :] * sen)
        prod = tl.where(m_ok[:, None], acc * e.to(tl.float32), 0.0)
        parts = _colsum_parts(prod, BLOCK_M, BLOCK_N, PART_ROWS)
        tl.store(PART + part_rows[:, None] * N + offs_n[None, :], parts, mask=part_ok[:, None] & n_ok[None, :])
    if STORE_C:
        if HAS_BIAS:
            acc += tl.load(BIAS + rn).to(tl.float32)[None, :]
        if SCALE_C:
            acc *= tl.load(L + rn).to(tl.float32)[None, :]
        out_ptrs = OUT + offs_m[:, None] * som + offs_n[None, :] * son
        tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _colsum_mul_kernel(A, E, PART, M, N, sam, san, sem, sen,
                       ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """PART[i, n] = Σ_{m in rows [i·ROWS, (i+1)·ROWS)} A[m,n] E[m,n] in fp32: the output-case dl."""
    pid_m = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(pid_m * ROWS, tl.minimum(pid_m * ROWS + ROWS, M), BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask = (offs_m[:, None] < M) & n_ok[None, :]
        a = tl.load(A + offs_m[:, None] * sam + offs_n[None, :] * san, mask=mask, other=0.0)
        e = tl.load(E + offs_m[:, None] * sem + offs_n[None, :] * sen, mask=mask, other=0.0)
        acc += tl.sum(a.to(tl.float32) * e.to(tl.float32), axis=0)
    tl.store(PART + pid_m * N + offs_n, acc, mask=n_ok)


# ---------------------------------------------------------------- launchers


def _parts(M: int, cols: int, device) -> torch.Tensor:
    return torch.empty((triton.cdiv(M, PART_M), cols), device=device, dtype=torch.float32)


def gemm(a, b_kn_strides, b, N, *, l=None, scale_a=False, scale_c=False, bias=None, e=None,
         reduce_c=False, store_c=True, out_dtype=None):
    """Launch `_ia3_gemm_kernel` on a (M, K) and B[k, n] read from `b` with strides `b_kn_strides`.
    Returns (out or None, partial column sums (M/PART_M, N) or None)."""
    M, K = a.shape
    dev = a.device
    out = torch.empty((M, N), device=dev, dtype=out_dtype or a.dtype) if store_c else None
    part = _parts(M, N, dev) if reduce_c else None
    if M == 0 or N == 0:
        return out, part
    dummy = a
    o = out if out is not None else dummy
    ee = e if e is not None else dummy
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    _ia3_gemm_kernel[grid](
        a, b, l if l is not None else dummy, bias if bias is not None else dummy, ee, o,
        part if part is not None else dummy,
        M, N, K, m_key(M),
        a.stride(0), a.stride(1), b_kn_strides[0], b_kn_strides[1], ee.stride(0), ee.stride(1),
        o.stride(0), o.stride(1),
        SCALE_A=scale_a, SCALE_C=scale_c, HAS_BIAS=bias is not None,
        REDUCE_C=reduce_c, STORE_C=store_c,
        PREC=dot_precision(a.dtype), UPCAST=upcast_dots(a.dtype), PART_ROWS=PART_M,
    )
    return out, part


def colsum_mul(a, e):
    """(cdiv(M, 256), N) fp32 partials of Σ_m a ⊙ e."""
    M, N = a.shape
    rows = 256
    part = torch.empty((triton.cdiv(M, rows), N), device=a.device, dtype=torch.float32)
    if M and N:
        bn = 128
        grid = (triton.cdiv(M, rows), triton.cdiv(N, bn))
        _colsum_mul_kernel[grid](a, e, part, M, N, a.stride(0), a.stride(1), e.stride(0), e.stride(1),
                                 ROWS=rows, BLOCK_M=32, BLOCK_N=bn)
    return part


def ia3_linear_fwd(x2d, weight, bias, ia3_l, feedforward):
    """y (M, out) in x's dtype."""
    w_kn = (weight.stride(1), weight.stride(0))  # B[k=in, n=out] = weight[n, k]
    y, _ = gemm(x2d, w_kn, weight, weight.shape[0], l=ia3_l, bias=bias,
                scale_a=feedforward, scale_c=not feedforward)
    return y


def ia3_linear_bwd(dy, saved, weight, ia3_l, feedforward, need_dx, need_dl):
    """Returns (dx or None, dl or None) as the reference backward does; `saved` is y (output case)
    or x (feed-forward)."""
    w_kn = (weight.stride(0), weight.stride(1))  # B[k=out, n=in] = weight[k, n]
    n_in = weight.shape[1]
    lf = ia3_l.float()
    if feedforward:
        if not (need_dx or need_dl):
            return None, None
        dx, part = gemm(dy, w_kn, weight, n_in, l=ia3_l, scale_c=True, e=saved if need_dl else None,
                        reduce_c=need_dl, store_c=need_dx)
        return dx, (part.sum(0).to(ia3_l.dtype) if need_dl else None)
    dx = gemm(dy, w_kn, weight, n_in, l=ia3_l, scale_a=True)[0] if need_dx else None
    dl = (colsum_mul(dy, saved).sum(0) / lf).to(ia3_l.dtype) if need_dl else None
    return dx, dl
