"""Fused LoRA linear: Triton kernels and launchers.

Forward:
  shrink:  t = drop(x) Aᵀ                       dropout from Philox(seed, m*in + k), no mask stored
  gemm:    y = x Wᵀ + s · t Bᵀ + b               LoRA term and bias in the prologue, y written once
Backward (dW/db are left to torch when the base is trainable):
  dy:      dt = s · dy B,  dB = s · dyᵀ t       one read of dy (dt summed with atomics; under deterministic
                                                algorithms a shrink for dt and an adapter_grad for dB instead)
  gemm:    dx = dy W + (dt A) ⊙ keep / (1 - p)  the LoRA term and the regenerated mask in the epilogue
  adapter_grad:      dAᵀ = drop(x)ᵀ dt                    a skinny GEMM split over M, partials summed in fp32
With cuBLAS for the big GEMMs ("cublas" gemm mode, the CUDA default), the LoRA term (and bias) is written
first and cuBLAS adds x Wᵀ (dy W) onto it with beta=1, instead of a pass that reads the GEMM's output back.
Any rank: up to MAX_BLOCK_R = 128 every kernel holds the rank in one tile, as it always did. Past it, the gemm
prologue and the epilogue add the rank-r product in a loop over chunks of LOOP_BLOCK_R ranks (a loop, so the
code stays one chunk's size; its fp32 FMA dots are large), and shrink, adapter_grad and dy take the rank chunks on
a grid axis (dy then reads dy once per 128 ranks).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._common import GEMM_CONFIGS, INTERPRET, block_r, configs, dot_precision, grouped_pid, m_key, sm_count, upcast_dots

MAX_BLOCK_R = 128  # ranks a program holds in one tile; adapter_grad / dy take chunks of this size past it (grid axis 2)
LOOP_BLOCK_R = 64  # the chunk of the gemm prologue / epilogue loops past MAX_BLOCK_R


@triton.jit
def _keep(seed, offs_m, n0, row_len, p, BLOCK_N: tl.constexpr):
    """Dropout keep-mask for rows offs_m, columns n0 .. n0+BLOCK_N of an (M, row_len) tensor.

    One Philox call yields four uniforms: element (m, n) takes output n % 4 of counter
    m * ceil(row_len / 4) + n // 4. A quarter of the Philox work of one call per element, which
    otherwise dominates a bandwidth-bound pass. n0 and BLOCK_N must be multiples of 4."""
    quads = (row_len + 3) // 4
    offs_q = n0 // 4 + tl.arange(0, BLOCK_N // 4)
    # 32-bit counters keep Philox on its 32-bit path (64-bit multiplies are emulated on GPUs);
    # they wrap only past 2^31 quads (8.6e9 elements), where the mask pattern would repeat.
    counter = (offs_m[:, None].to(tl.int64) * quads + offs_q[None, :]).to(tl.int32)
    u0, u1, u2, u3 = tl.rand4x(seed, counter)
    u = tl.reshape(tl.join(tl.join(u0, u1), tl.join(u2, u3)), (offs_m.shape[0], BLOCK_N))
    return u >= p


@triton.autotune(configs=GEMM_CONFIGS, key=["N", "K", "R", "M_KEY", "HAS_DROPOUT"])
@triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})
@triton.jit
def _gemm_lora_kernel(
    X, W, T, U, BIAS, OUT,
    M, N, K, R, M_KEY,
    sxm, sxk, swn, swk, stm, str_, sun, sur, som, son,
    scaling, seed, p,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    PREC_MAIN: tl.constexpr, PREC_LORA: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_R: tl.constexpr, NUM_RB: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """OUT[m, n] = Σ_k X[m,k] W[n,k] + s · (Σ_r T[m,r] U[n,r]) ⊙ keep(m, n) + BIAS[n]; r in NUM_RB chunks."""
    pid_m, pid_n = grouped_pid(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rm = tl.max_contiguous(tl.multiple_of(offs_m % M, BLOCK_M), BLOCK_M)
    rn = tl.max_contiguous(tl.multiple_of(offs_n % N, BLOCK_N), BLOCK_N)
    # 64-bit row offsets: M x K passes 2^31 elements at LLM sizes (e.g. 150k tokens x 14336).
    x_ptrs = X + rm.to(tl.int64)[:, None] * sxm + offs_k[None, :] * sxk
    w_ptrs = W + rn.to(tl.int64)[None, :] * swn + offs_k[:, None] * swk

    # Prologue: the rank-r LoRA term (+ mask, + bias) initialises the accumulator, so the main
    # loop accumulates onto it and no second BLOCK_M x BLOCK_N fp32 tile stays live (it spilled).
    offs_r = tl.arange(0, BLOCK_R)
    t = tl.load(T + rm[:, None] * stm + offs_r[None, :] * str_, mask=offs_r[None, :] < R, other=0.0)
    u = tl.load(U + rn[None, :] * sun + offs_r[:, None] * sur, mask=offs_r[:, None] < R, other=0.0)
    acc = tl.dot(t.to(tl.float32) * scaling, u.to(tl.float32), input_precision=PREC_LORA)
    if NUM_RB > 1:
        # Ranks past the first chunk. Not pipelined (num_stages=1): staged copies of these tiles would take the
        # shared memory the main loop's stages need.
        for i in tl.range(1, NUM_RB, num_stages=1):
            rr = i * BLOCK_R + offs_r
            t = tl.load(T + rm[:, None] * stm + rr[None, :] * str_, mask=rr[None, :] < R, other=0.0)
            u = tl.load(U + rn[None, :] * sun + rr[:, None] * sur, mask=rr[:, None] < R, other=0.0)
            acc = tl.dot(t.to(tl.float32) * scaling, u.to(tl.float32), acc, input_precision=PREC_LORA)
    if HAS_DROPOUT:
        acc = tl.where(_keep(seed, offs_m, pid_n * BLOCK_N, N, p, BLOCK_N), acc, 0.0)
    if HAS_BIAS:
        acc += tl.load(BIAS + rn).to(tl.float32)[None, :]

    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            x = tl.load(x_ptrs)
            w = tl.load(w_ptrs)
        else:
            k_left = K - k * BLOCK_K
            x = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            w = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=PREC_MAIN)
        x_ptrs += BLOCK_K * sxk
        w_ptrs += BLOCK_K * swk

    out_ptrs = OUT + offs_m.to(tl.int64)[:, None] * som + offs_n[None, :] * son
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=mask)


_SHRINK_CONFIGS = configs(
    [
        triton.Config({"BLOCK_M": 64, "BLOCK_K": 128}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 32, "BLOCK_K": 256}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 16, "BLOCK_K": 256}, num_warps=4, num_stages=3),
    ],
    triton.Config({"BLOCK_M": 16, "BLOCK_K": 32}, num_warps=4, num_stages=1),
)


@triton.autotune(configs=_SHRINK_CONFIGS, key=["K", "R", "M_KEY", "HAS_DROPOUT"])
@triton.jit
def _shrink_kernel(
    X, A, T,
    M, K, R, M_KEY,
    sxm, sxk, sar, sak, stm, str_,
    scale, seed, p,
    HAS_DROPOUT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """T[m, r] = scale · Σ_k drop(X)[m,k] A[r,k], fp32 out; dropout before `scale` (kept: 1/(1-p))."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    r_ok = offs_r < R
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < K
        x = tl.load(X + offs_m.to(tl.int64)[:, None] * sxm + kk[None, :] * sxk, mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0).to(tl.float32)
        if HAS_DROPOUT:
            x = tl.where(_keep(seed, offs_m, k0, K, p, BLOCK_K), x, 0.0)
        a = tl.load(A + offs_r[None, :] * sar + kk[:, None] * sak, mask=r_ok[None, :] & k_ok[:, None],
                    other=0.0).to(tl.float32)
        acc = tl.dot(x, a, acc, input_precision=PREC)
    tl.store(T + offs_m[:, None] * stm + offs_r[None, :] * str_, acc * scale,
             mask=m_ok[:, None] & r_ok[None, :])


_ADAPTER_GRAD_CONFIGS = configs(
    [
        triton.Config({"BLOCK_N": 128, "BLOCK_M": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_N": 64, "BLOCK_M": 128}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_N": 256, "BLOCK_M": 32}, num_warps=8, num_stages=3),
    ],
    triton.Config({"BLOCK_N": 32, "BLOCK_M": 16}, num_warps=4, num_stages=1),
)


@triton.autotune(configs=_ADAPTER_GRAD_CONFIGS, key=["N", "R", "M_KEY", "HAS_DROPOUT"])
@triton.jit
def _adapter_grad_kernel(
    X, T, P,
    M, N, R, rows_per_split, M_KEY,
    sxm, sxn, stm, str_,
    scale, seed, p,
    HAS_DROPOUT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """P[s, n, r] = scale · Σ_{m in split s} drop(X)[m,n] T[m,r]; the caller sums P over s. Grid axis 2 takes
    the ranks in chunks of BLOCK_R."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    n_ok = offs_n < N
    r_ok = offs_r < R
    m_lo = pid_s * rows_per_split
    m_hi = tl.minimum(m_lo + rows_per_split, M)
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < m_hi
        # X tile loaded transposed: (BLOCK_N, BLOCK_M).
        xt = tl.load(X + offs_m.to(tl.int64)[None, :] * sxm + offs_n[:, None] * sxn, mask=n_ok[:, None] & m_ok[None, :],
                     other=0.0).to(tl.float32)
        if HAS_DROPOUT:
            xt = tl.where(tl.trans(_keep(seed, offs_m, pid_n * BLOCK_N, N, p, BLOCK_N)), xt, 0.0)
        t = tl.load(T + offs_m[:, None] * stm + offs_r[None, :] * str_, mask=m_ok[:, None] & r_ok[None, :],
                    other=0.0).to(tl.float32)
        acc = tl.dot(xt, t, acc, input_precision=PREC)
    out = P + pid_s * N * R + offs_n[:, None] * R + offs_r[None, :]
    tl.store(out, acc * scale, mask=n_ok[:, None] & r_ok[None, :])


_DY_CONFIGS = configs(
    [
        triton.Config({"BLOCK_N": 128, "BLOCK_M": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_N": 256, "BLOCK_M": 32}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_N": 64, "BLOCK_M": 128}, num_warps=4, num_stages=3),
    ],
    triton.Config({"BLOCK_N": 32, "BLOCK_M": 16}, num_warps=4, num_stages=1),
)


# reset_to_zero: DT accumulates with atomics, so every autotuning run must start from zeros.
@triton.autotune(configs=_DY_CONFIGS, key=["N", "R", "M_KEY"], reset_to_zero=["DT"])
@triton.jit
def _dy_kernel(
    DY, U, T, DT, P,
    M, N, R, rows_per_split, M_KEY,
    sdm, sdn, sun, sur, stm, str_,
    scale,
    PREC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """One read of dy for both of its LoRA reductions:
    DT[m, r] += scale · Σ_{n in this block} DY[m,n] U[n,r]   (atomics across the column blocks; DT zeroed first)
    P[s, n, r] = scale · Σ_{m in split s} DY[m,n] T[m,r]    (the caller sums P over s).
    Grid axis 2 takes the ranks in chunks of BLOCK_R (each chunk reads dy again: r > MAX_BLOCK_R only)."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    n_ok = offs_n < N
    r_ok = offs_r < R
    u = tl.load(U + offs_n[:, None] * sun + offs_r[None, :] * sur, mask=n_ok[:, None] & r_ok[None, :],
                other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    m_lo = pid_s * rows_per_split
    m_hi = tl.minimum(m_lo + rows_per_split, M)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < m_hi
        dy = tl.load(DY + offs_m.to(tl.int64)[:, None] * sdm + offs_n[None, :] * sdn,
                     mask=m_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
        t = tl.load(T + offs_m[:, None] * stm + offs_r[None, :] * str_, mask=m_ok[:, None] & r_ok[None, :],
                    other=0.0).to(tl.float32)
        acc = tl.dot(tl.trans(dy), t, acc, input_precision=PREC)
        dt = tl.dot(dy, u, input_precision=PREC) * scale
        tl.atomic_add(DT + offs_m[:, None] * R + offs_r[None, :], dt, mask=m_ok[:, None] & r_ok[None, :])
    tl.store(P + pid_s * N * R + offs_n[:, None] * R + offs_r[None, :], acc * scale,
             mask=n_ok[:, None] & r_ok[None, :])


_EPI_CONFIGS = configs(
    [
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 256}, num_warps=4, num_stages=2),
    ],
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=1),
)


# restore_value: the kernel adds into OUT, so autotuning must not run it twice on the same buffer.
@triton.autotune(configs=_EPI_CONFIGS, key=["N", "R", "M_KEY", "HAS_DROPOUT", "ACCUMULATE"], restore_value=["OUT"])
@triton.jit
def _lora_epilogue_kernel(
    OUT, T, U, BIAS,
    M, N, R, M_KEY,
    som, son, stm, str_, sun, sur,
    scaling, seed, p,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, PREC: tl.constexpr, ACCUMULATE: tl.constexpr,
    BLOCK_R: tl.constexpr, NUM_RB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """OUT[m, n] (+)= s · (Σ_r T[m,r] U[n,r]) ⊙ keep(m, n) + BIAS[n]: added onto a GEMM's output, or written
    (ACCUMULATE=False) for a GEMM to add onto with beta=1, so the output is not read back by a separate pass.
    r in NUM_RB chunks of BLOCK_R."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    m_ok = offs_m < M
    n_ok = offs_n < N
    t = tl.load(T + offs_m[:, None] * stm + offs_r[None, :] * str_, mask=m_ok[:, None] & (offs_r[None, :] < R),
                other=0.0)
    u = tl.load(U + offs_n[None, :] * sun + offs_r[:, None] * sur, mask=n_ok[None, :] & (offs_r[:, None] < R),
                other=0.0)
    lora = tl.dot(t.to(tl.float32) * scaling, u.to(tl.float32), input_precision=PREC)
    if NUM_RB > 1:
        for i in tl.range(1, NUM_RB, num_stages=1):  # ranks past the first chunk
            rr = i * BLOCK_R + offs_r
            t = tl.load(T + offs_m[:, None] * stm + rr[None, :] * str_, mask=m_ok[:, None] & (rr[None, :] < R),
                        other=0.0)
            u = tl.load(U + offs_n[None, :] * sun + rr[:, None] * sur, mask=n_ok[None, :] & (rr[:, None] < R),
                        other=0.0)
            lora = tl.dot(t.to(tl.float32) * scaling, u.to(tl.float32), lora, input_precision=PREC)
    if HAS_DROPOUT:
        lora = tl.where(_keep(seed, offs_m, tl.program_id(1) * BLOCK_N, N, p, BLOCK_N), lora, 0.0)
    if HAS_BIAS:
        lora += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    ptrs = OUT + offs_m.to(tl.int64)[:, None] * som + offs_n[None, :] * son
    mask = m_ok[:, None] & n_ok[None, :]
    if ACCUMULATE:
        lora += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptrs, lora.to(OUT.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------- launchers


def _seed_int(seed) -> int:
    return 0 if seed is None else int(seed)


def rank_blocks(r: int, chunk: int = MAX_BLOCK_R) -> tuple[int, int]:
    """(BLOCK_R, number of rank chunks): r in one tile up to MAX_BLOCK_R, else in chunks of `chunk` ranks."""
    if r <= MAX_BLOCK_R:
        return block_r(r), 1
    return chunk, triton.cdiv(r, chunk)


def shrink(x2d, a_rk_strides, a, r, scale, p, seed, prec):
    """T (M, r) fp32 = scale · drop(x2d) · Aᵀ, where A[r, k] is read with strides `a_rk_strides`."""
    M, K = x2d.shape
    t = torch.empty((M, r), device=x2d.device, dtype=torch.float32)
    if M == 0:
        return t
    br = min(block_r(r), 64)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(r, br))
    _shrink_kernel[grid](
        x2d, a, t, M, K, r, m_key(M),
        x2d.stride(0), x2d.stride(1), a_rk_strides[0], a_rk_strides[1], t.stride(0), t.stride(1),
        scale, _seed_int(seed), p,
        HAS_DROPOUT=p > 0.0, PREC=prec, BLOCK_R=br,
    )
    return t


def gemm_lora(x2d, w, w_nk_strides, t, u, u_nr_strides, bias, out_dtype, N, scaling, p, seed):
    """OUT (M, N) = x2d · Wᵀ + scaling · (t · Uᵀ) ⊙ keep + bias (W[n, k], U[n, r] read by strides)."""
    M, K = x2d.shape
    r = t.shape[1]
    out = torch.empty((M, N), device=x2d.device, dtype=out_dtype)
    if M == 0 or N == 0:
        return out
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()  # the kernel reads it with unit stride
    br, nrb = rank_blocks(r, LOOP_BLOCK_R)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    _gemm_lora_kernel[grid](
        x2d, w, t, u, bias if bias is not None else t, out,
        M, N, K, r, m_key(M),
        x2d.stride(0), x2d.stride(1), w_nk_strides[0], w_nk_strides[1],
        t.stride(0), t.stride(1), u_nr_strides[0], u_nr_strides[1], out.stride(0), out.stride(1),
        scaling, _seed_int(seed), p,
        HAS_BIAS=bias is not None, HAS_DROPOUT=p > 0.0,
        PREC_MAIN=dot_precision(x2d.dtype), PREC_LORA=dot_precision(torch.float32),
        UPCAST=upcast_dots(x2d.dtype), BLOCK_R=br, NUM_RB=nrb,
    )
    return out


def lora_epilogue_(out, t, u, u_nr_strides, bias, scaling, p, seed, accumulate=True):
    """In place: out (M, N) += scaling · (t · Uᵀ) ⊙ keep + bias (or = when not `accumulate`)."""
    M, N = out.shape
    r = t.shape[1]
    if M == 0 or N == 0:
        return out
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()  # the kernel reads it with unit stride
    br, nrb = rank_blocks(r, LOOP_BLOCK_R)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))
    _lora_epilogue_kernel[grid](
        out, t, u, bias if bias is not None else t,
        M, N, r, m_key(M),
        out.stride(0), out.stride(1), t.stride(0), t.stride(1), u_nr_strides[0], u_nr_strides[1],
        scaling, _seed_int(seed), p,
        HAS_BIAS=bias is not None, HAS_DROPOUT=p > 0.0, PREC=dot_precision(torch.float32), ACCUMULATE=accumulate,
        BLOCK_R=br, NUM_RB=nrb,
    )
    return out


def gemm_mode(device) -> str:
    """How the big GEMMs run: "fused" (one Triton GEMM, LoRA term in its prologue, output written
    once) or "cublas" (torch's GEMM, then one Triton pass adding the LoRA term in place).

    On an H100 (benchmarks/NOTES.md) our Triton GEMM ran at 632 us where cuBLAS took 369 us for the
    same 8192x4096x4096 bf16 product, so the extra read+write of the output (~45 us) is cheaper.
    PEFTKERN_LORA_GEMM=fused|cublas overrides; the interpreter defaults to fused."""
    mode = os.environ.get("PEFTKERN_LORA_GEMM", "").strip().lower()
    if mode in ("fused", "cublas"):
        return mode
    if mode:
        raise ValueError(f"PEFTKERN_LORA_GEMM must be 'fused' or 'cublas', got {mode!r}")
    return "cublas" if device.type == "cuda" else "fused"


def _num_splits(M: int, N: int, device) -> int:
    if INTERPRET or device.type != "cuda":
        return 1 if M < 64 else 2
    sms = sm_count(device.index if device.index is not None else torch.cuda.current_device())
    n_blocks = triton.cdiv(N, 128)
    return max(1, min(triton.cdiv(2 * sms, n_blocks), triton.cdiv(M, 256), 64))


def adapter_grad(x2d, t, scale, p, seed, prec):
    """(N, r) fp32 = scale · drop(x2d)ᵀ · t, reduced over M in splits."""
    M, N = x2d.shape
    r = t.shape[1]
    if M == 0:
        return torch.zeros((N, r), device=x2d.device, dtype=torch.float32)
    split = _num_splits(M, N, x2d.device)
    rows = triton.cdiv(M, split)
    part = torch.empty((split, N, r), device=x2d.device, dtype=torch.float32)
    br, nrb = rank_blocks(r)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), split, nrb)
    _adapter_grad_kernel[grid](
        x2d, t, part, M, N, r, rows, m_key(M),
        x2d.stride(0), x2d.stride(1), t.stride(0), t.stride(1),
        scale, _seed_int(seed), p,
        HAS_DROPOUT=p > 0.0, PREC=prec, BLOCK_R=br,
    )
    return part[0] if split == 1 else part.sum(0)


def dy_pass(dy, u, t, scale, prec):
    """(dt (M, r), dB (N, r)) fp32 = scale · dy·U and scale · dyᵀ·t from one read of dy (M, N); U[n, r] is
    lora_B. dt is summed with float atomics, so its last bits vary run to run: callers take the two-pass
    path (shrink + adapter_grad) under torch.use_deterministic_algorithms."""
    M, N = dy.shape
    r = t.shape[1]
    dt = torch.zeros((M, r), device=dy.device, dtype=torch.float32)
    if M == 0:
        return dt, torch.zeros((N, r), device=dy.device, dtype=torch.float32)
    split = _num_splits(M, N, dy.device)
    part = torch.empty((split, N, r), device=dy.device, dtype=torch.float32)
    br, nrb = rank_blocks(r)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), split, nrb)
    _dy_kernel[grid](
        dy, u, t, dt, part, M, N, r, triton.cdiv(M, split), m_key(M),
        dy.stride(0), dy.stride(1), u.stride(0), u.stride(1), t.stride(0), t.stride(1),
        scale, PREC=prec, BLOCK_R=br,
    )
    return dt, (part[0] if split == 1 else part.sum(0))


def lora_linear_fwd(x2d, weight, bias, lora_A, lora_B, scaling, p, seed):
    """Returns (y, t): y (M, out) in x's dtype, t = drop(x) Aᵀ (M, r) fp32."""
    prec = dot_precision(torch.float32)  # the skinny dots upcast their operands to fp32
    r = lora_A.shape[0]
    inv_keep = 1.0 / (1.0 - p)
    t = shrink(x2d, lora_A.stride(), lora_A, r, inv_keep, p, seed, prec)
    if gemm_mode(x2d.device) == "cublas":
        # The LoRA term (+ bias) is written first and cuBLAS adds x Wᵀ onto it in its epilogue (beta=1): no
        # separate pass reads y back.
        y = torch.empty((x2d.shape[0], weight.shape[0]), device=x2d.device, dtype=x2d.dtype)
        lora_epilogue_(y, t, lora_B, lora_B.stride(), bias, scaling, 0.0, None, accumulate=False)
        y = y.addmm_(x2d, weight.t()) if y.numel() else y
    else:
        y = gemm_lora(x2d, weight, weight.stride(), t, lora_B, lora_B.stride(), bias, x2d.dtype,
                      weight.shape[0], scaling, 0.0, None)
    return y, t


def lora_linear_bwd(dy, x2d, weight, lora_A, lora_B, t, scaling, p, seed, need_dx, need_ab=True):
    """Returns (dx or None, dA or None, dB or None) as the reference backward does."""
    prec = dot_precision(torch.float32)  # the skinny dots upcast their operands to fp32
    r = lora_A.shape[0]
    inv_keep = 1.0 / (1.0 - p)
    d_b = None
    if need_ab and not torch.are_deterministic_algorithms_enabled():
        dt, d_b = dy_pass(dy, lora_B, t, scaling, prec)  # one read of dy for dt and dB
    else:  # dt = s · dy B: B is (out, r), read as A[r, k] = B[k, r]
        dt = shrink(dy, (lora_B.stride(1), lora_B.stride(0)), lora_B, r, scaling, 0.0, None, prec)
    dx = None
    a_nr = (lora_A.stride(1), lora_A.stride(0))  # U[n=in, r] = A[r, n]
    if need_dx and gemm_mode(dy.device) == "cublas":
        # The masked LoRA term is written first; cuBLAS adds dy W onto it (beta=1).
        dx = torch.empty(x2d.shape, device=dy.device, dtype=x2d.dtype)
        lora_epilogue_(dx, dt, lora_A, a_nr, None, inv_keep, p, seed, accumulate=False)
        dx = dx.addmm_(dy, weight) if dx.numel() else dx
    elif need_dx:
        # dx = dy W + (dt A) ⊙ keep/(1-p): W[n=in, k=out] = weight[k, n].
        dx = gemm_lora(dy, weight, (weight.stride(1), weight.stride(0)), dt, lora_A, a_nr, None, x2d.dtype,
                       weight.shape[1], inv_keep, p, seed)
    if not need_ab:
        return dx, None, None
    d_a = adapter_grad(x2d, dt, inv_keep, p, seed, prec).t().to(lora_A.dtype).contiguous()
    if d_b is None:
        d_b = adapter_grad(dy, t, scaling, 0.0, None, prec)
    return dx, d_a, d_b.to(lora_B.dtype)


@triton.jit
def _keep_mask_kernel(OUT, M, N, seed, p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _keep(seed, offs_m, tl.program_id(1) * BLOCK_N, N, p, BLOCK_N)
    tl.store(OUT + offs_m[:, None] * N + offs_n[None, :], keep.to(tl.int8),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def dropout_keep(M: int, N: int, p: float, seed: int, device) -> torch.Tensor:
    """The (M, N) keep-mask the kernels draw for `seed`, materialized (for tests and debugging)."""
    out = torch.empty((M, N), dtype=torch.int8, device=device)
    if M and N:
        _keep_mask_kernel[(triton.cdiv(M, 32), triton.cdiv(N, 32))](out, M, N, seed, p, BLOCK_M=32, BLOCK_N=32)
    return out.bool()
