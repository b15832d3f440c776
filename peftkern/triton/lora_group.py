"""Grouped LoRA projections (q/k/v, gate/up: several LoRA linears reading one x): Triton kernels.

Each member keeps its own dropout seed and probability, so its mask is the one its own lora_linear call
would draw (`lora._keep` with its seed): a group computes exactly what the members compute one by one.
  group_shrink:    t_g = drop_g(x) A_gᵀ for every member from one read of x
  group_adapter_grad:        dA_gᵀ = drop_g(x)ᵀ dt_g for every member from one read of x
  group_epilogue_: dx = Σ_g (dt_g A_g) ⊙ keep_g / (1 - p_g), written once (the GEMMs add dy_g W_g onto it)
A kernel takes up to MAX_MEMBERS members; the launchers run larger groups in chunks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import lora
from ._common import block_r, configs, dot_precision, m_key
from .lora import _keep, _num_splits

MAX_MEMBERS = 3
MAX_RANK = 64  # every member's rank fits one BLOCK_R tile: three fp32 accumulators stay in registers

_SHRINK_CONFIGS = configs(
    [
        triton.Config({"BLOCK_M": 32, "BLOCK_K": 128}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 16, "BLOCK_K": 256}, num_warps=4, num_stages=3),
    ],
    triton.Config({"BLOCK_M": 16, "BLOCK_K": 32}, num_warps=4, num_stages=1),
)


@triton.jit
def _masked(x, seed, p, offs_m, k0, K, HAS_DROPOUT: tl.constexpr, BLOCK_K: tl.constexpr):
    if HAS_DROPOUT:
        x = tl.where(_keep(seed, offs_m, k0, K, p, BLOCK_K), x, 0.0)
    return x


@triton.autotune(configs=_SHRINK_CONFIGS, key=["K", "G", "BLOCK_R", "M_KEY", "HAS_DROPOUT"])
@triton.jit
def _group_shrink_kernel(
    X, A0, A1, A2, T0, T1, T2,
    M, K, R0, R1, R2, M_KEY,
    sxm, sxk, sa0r, sa0k, sa1r, sa1k, sa2r, sa2k,
    scale0, scale1, scale2, seed0, seed1, seed2, p0, p1, p2,
    G: tl.constexpr, HAS_DROPOUT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """T_g[m, r] = scale_g · Σ_k drop_g(X)[m,k] A_g[r,k] for g < G; T_g are (M, R_g) contiguous fp32."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    acc0 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < K
        x = tl.load(X + offs_m.to(tl.int64)[:, None] * sxm + kk[None, :] * sxk, mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0).to(tl.float32)  # the one read of x, shared by every member
        a = tl.load(A0 + offs_r[None, :] * sa0r + kk[:, None] * sa0k, mask=(offs_r[None, :] < R0) & k_ok[:, None],
                    other=0.0).to(tl.float32)
        acc0 = tl.dot(_masked(x, seed0, p0, offs_m, k0, K, HAS_DROPOUT, BLOCK_K), a, acc0, input_precision=PREC)
        if G > 1:
            a = tl.load(A1 + offs_r[None, :] * sa1r + kk[:, None] * sa1k,
                        mask=(offs_r[None, :] < R1) & k_ok[:, None], other=0.0).to(tl.float32)
            acc1 = tl.dot(_masked(x, seed1, p1, offs_m, k0, K, HAS_DROPOUT, BLOCK_K), a, acc1, input_precision=PREC)
        if G > 2:
            a = tl.load(A2 + offs_r[None, :] * sa2r + kk[:, None] * sa2k,
                        mask=(offs_r[None, :] < R2) & k_ok[:, None], other=0.0).to(tl.float32)
            acc2 = tl.dot(_masked(x, seed2, p2, offs_m, k0, K, HAS_DROPOUT, BLOCK_K), a, acc2, input_precision=PREC)
    tl.store(T0 + offs_m[:, None] * R0 + offs_r[None, :], acc0 * scale0, mask=m_ok[:, None] & (offs_r[None, :] < R0))
    if G > 1:
        tl.store(T1 + offs_m[:, None] * R1 + offs_r[None, :], acc1 * scale1,
                 mask=m_ok[:, None] & (offs_r[None, :] < R1))
    if G > 2:
        tl.store(T2 + offs_m[:, None] * R2 + offs_r[None, :], acc2 * scale2,
                 mask=m_ok[:, None] & (offs_r[None, :] < R2))


_ADAPTER_GRAD_CONFIGS = configs(
    [
        triton.Config({"BLOCK_N": 64, "BLOCK_M": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_N": 128, "BLOCK_M": 32}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_N": 32, "BLOCK_M": 128}, num_warps=4, num_stages=3),
    ],
    triton.Config({"BLOCK_N": 32, "BLOCK_M": 16}, num_warps=4, num_stages=1),
)


@triton.jit
def _masked_t(xt, seed, p, offs_m, n0, N, HAS_DROPOUT: tl.constexpr, BLOCK_N: tl.constexpr):
    if HAS_DROPOUT:
        xt = tl.where(tl.trans(_keep(seed, offs_m, n0, N, p, BLOCK_N)), xt, 0.0)
    return xt


@triton.autotune(configs=_ADAPTER_GRAD_CONFIGS, key=["N", "G", "BLOCK_R", "M_KEY", "HAS_DROPOUT"])
@triton.jit
def _group_adapter_grad_kernel(
    X, T0, T1, T2, P0, P1, P2,
    M, N, R0, R1, R2, rows_per_split, M_KEY,
    sxm, sxn,
    scale0, scale1, scale2, seed0, seed1, seed2, p0, p1, p2,
    G: tl.constexpr, HAS_DROPOUT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """P_g[s, n, r] = scale_g · Σ_{m in split s} drop_g(X)[m,n] T_g[m,r]; T_g (M, R_g) contiguous; the caller
    sums P_g over s."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    n_ok = offs_n < N
    acc0 = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    m_lo = pid_s * rows_per_split
    m_hi = tl.minimum(m_lo + rows_per_split, M)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < m_hi
        xt = tl.load(X + offs_m.to(tl.int64)[None, :] * sxm + offs_n[:, None] * sxn,
                     mask=n_ok[:, None] & m_ok[None, :], other=0.0).to(tl.float32)  # one read for every member
        t = tl.load(T0 + offs_m[:, None] * R0 + offs_r[None, :], mask=m_ok[:, None] & (offs_r[None, :] < R0),
                    other=0.0)
        acc0 = tl.dot(_masked_t(xt, seed0, p0, offs_m, n0, N, HAS_DROPOUT, BLOCK_N), t, acc0, input_precision=PREC)
        if G > 1:
            t = tl.load(T1 + offs_m[:, None] * R1 + offs_r[None, :], mask=m_ok[:, None] & (offs_r[None, :] < R1),
                        other=0.0)
            acc1 = tl.dot(_masked_t(xt, seed1, p1, offs_m, n0, N, HAS_DROPOUT, BLOCK_N), t, acc1,
                          input_precision=PREC)
        if G > 2:
            t = tl.load(T2 + offs_m[:, None] * R2 + offs_r[None, :], mask=m_ok[:, None] & (offs_r[None, :] < R2),
                        other=0.0)
            acc2 = tl.dot(_masked_t(xt, seed2, p2, offs_m, n0, N, HAS_DROPOUT, BLOCK_N), t, acc2,
                          input_precision=PREC)
    tl.store(P0 + pid_s * N * R0 + offs_n[:, None] * R0 + offs_r[None, :], acc0 * scale0,
             mask=n_ok[:, None] & (offs_r[None, :] < R0))
    if G > 1:
        tl.store(P1 + pid_s * N * R1 + offs_n[:, None] * R1 + offs_r[None, :], acc1 * scale1,
                 mask=n_ok[:, None] & (offs_r[None, :] < R1))
    if G > 2:
        tl.store(P2 + pid_s * N * R2 + offs_n[:, None] * R2 + offs_r[None, :], acc2 * scale2,
                 mask=n_ok[:, None] & (offs_r[None, :] < R2))


_EPI_CONFIGS = configs(
    [
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 256}, num_warps=4, num_stages=2),
    ],
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=1),
)


@triton.jit
def _lora_term(T, U, R, sur, sun, offs_m, offs_n, m_ok, n_ok, n0, N, scale, seed, p,
               HAS_DROPOUT: tl.constexpr, PREC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_r = tl.arange(0, BLOCK_R)
    t = tl.load(T + offs_m[:, None] * R + offs_r[None, :], mask=m_ok[:, None] & (offs_r[None, :] < R), other=0.0)
    u = tl.load(U + offs_n[None, :] * sun + offs_r[:, None] * sur, mask=n_ok[None, :] & (offs_r[:, None] < R),
                other=0.0).to(tl.float32)
    term = tl.dot(t * scale, u, input_precision=PREC)
    if HAS_DROPOUT:
        term = tl.where(_keep(seed, offs_m, n0, N, p, BLOCK_N), term, 0.0)
    return term


# restore_value: ACCUMULATE adds into OUT, so autotuning must not run it twice on the same buffer.
@triton.autotune(configs=_EPI_CONFIGS, key=["N", "G", "BLOCK_R", "M_KEY", "HAS_DROPOUT", "ACCUMULATE"],
                 restore_value=["OUT"])
@triton.jit
def _group_epilogue_kernel(
    OUT, T0, T1, T2, U0, U1, U2,
    M, N, R0, R1, R2, M_KEY,
    som, son, su0n, su0r, su1n, su1r, su2n, su2r,
    scale0, scale1, scale2, seed0, seed1, seed2, p0, p1, p2,
    G: tl.constexpr, HAS_DROPOUT: tl.constexpr, PREC: tl.constexpr, ACCUMULATE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """OUT[m, n] (+)= Σ_g scale_g · (Σ_r T_g[m,r] U_g[n,r]) ⊙ keep_g(m, n); T_g (M, R_g) contiguous fp32."""
    n0 = tl.program_id(1) * BLOCK_N
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = _lora_term(T0, U0, R0, su0r, su0n, offs_m, offs_n, m_ok, n_ok, n0, N, scale0, seed0, p0,
                     HAS_DROPOUT, PREC, BLOCK_R, BLOCK_N)
    if G > 1:
        acc += _lora_term(T1, U1, R1, su1r, su1n, offs_m, offs_n, m_ok, n_ok, n0, N, scale1, seed1, p1,
                          HAS_DROPOUT, PREC, BLOCK_R, BLOCK_N)
    if G > 2:
        acc += _lora_term(T2, U2, R2, su2r, su2n, offs_m, offs_n, m_ok, n_ok, n0, N, scale2, seed2, p2,
                          HAS_DROPOUT, PREC, BLOCK_R, BLOCK_N)
    ptrs = OUT + offs_m.to(tl.int64)[:, None] * som + offs_n[None, :] * son
    mask = m_ok[:, None] & n_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptrs, acc.to(OUT.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------- launchers


def _chunks(n: int):
    return [range(i, min(i + MAX_MEMBERS, n)) for i in range(0, n, MAX_MEMBERS)]


def _pad(values, fill):
    """Kernel arguments for members 0..2: the absent ones repeat a harmless placeholder (pruned by G)."""
    return list(values) + [fill] * (MAX_MEMBERS - len(values))


def _strides(pairs):
    """Two strides per member, flattened and padded to MAX_MEMBERS members."""
    return [s for pair in _pad(pairs, (0, 0)) for s in pair]


def group_shrink(x2d, lora_As, scales, ps, seeds):
    """[t_g (M, r_g) fp32 = scale_g · drop_g(x2d) · A_gᵀ], every chunk of members from one read of x2d."""
    M, K = x2d.shape
    ts = [torch.empty((M, a.shape[0]), device=x2d.device, dtype=torch.float32) for a in lora_As]
    if M == 0:
        return ts
    prec = dot_precision(torch.float32)
    for ch in _chunks(len(lora_As)):
        a = [lora_As[i] for i in ch]
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)
        _group_shrink_kernel[grid](
            x2d, *_pad(a, a[0]), *_pad([ts[i] for i in ch], ts[ch[0]]),
            M, K, *_pad([ai.shape[0] for ai in a], 0), m_key(M),
            x2d.stride(0), x2d.stride(1), *_strides([ai.stride() for ai in a]),
            *_pad([scales[i] for i in ch], 0.0), *_pad([seeds[i] for i in ch], 0), *_pad([ps[i] for i in ch], 0.0),
            G=len(ch), HAS_DROPOUT=any(ps[i] > 0.0 for i in ch), PREC=prec,
            BLOCK_R=block_r(max(ai.shape[0] for ai in a)),
        )
    return ts


def group_adapter_grad(x2d, dts, scales, ps, seeds):
    """[(N, r_g) fp32 = scale_g · drop_g(x2d)ᵀ · dt_g], every chunk of members from one read of x2d."""
    M, N = x2d.shape
    if M == 0:
        return [torch.zeros((N, t.shape[1]), device=x2d.device, dtype=torch.float32) for t in dts]
    split = _num_splits(M, N, x2d.device)
    rows = triton.cdiv(M, split)
    parts = [torch.empty((split, N, t.shape[1]), device=x2d.device, dtype=torch.float32) for t in dts]
    prec = dot_precision(torch.float32)
    for ch in _chunks(len(dts)):
        ts = [dts[i] for i in ch]
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), split)
        _group_adapter_grad_kernel[grid](
            x2d, *_pad(ts, ts[0]), *_pad([parts[i] for i in ch], parts[ch[0]]),
            M, N, *_pad([t.shape[1] for t in ts], 0), rows, m_key(M),
            x2d.stride(0), x2d.stride(1),
            *_pad([scales[i] for i in ch], 0.0), *_pad([seeds[i] for i in ch], 0), *_pad([ps[i] for i in ch], 0.0),
            G=len(ch), HAS_DROPOUT=any(ps[i] > 0.0 for i in ch), PREC=prec,
            BLOCK_R=block_r(max(t.shape[1] for t in ts)),
        )
    return [part[0] if split == 1 else part.sum(0) for part in parts]


def group_epilogue_(out, dts, us_nr, scales, ps, seeds):
    """In place: out (M, N) = Σ_g scale_g · (dt_g · U_gᵀ) ⊙ keep_g, where U_g[n, r] is read from us_nr[g] =
    (tensor, (stride_n, stride_r)); chunks after the first accumulate."""
    M, N = out.shape
    if M == 0 or N == 0:
        return out
    prec = dot_precision(torch.float32)
    for c, ch in enumerate(_chunks(len(dts))):
        ts = [dts[i] for i in ch]
        us = [us_nr[i] for i in ch]
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))
        _group_epilogue_kernel[grid](
            out, *_pad(ts, ts[0]), *_pad([u for u, _ in us], us[0][0]),
            M, N, *_pad([t.shape[1] for t in ts], 0), m_key(M),
            out.stride(0), out.stride(1), *_strides([st for _, st in us]),
            *_pad([scales[i] for i in ch], 0.0), *_pad([seeds[i] for i in ch], 0), *_pad([ps[i] for i in ch], 0.0),
            G=len(ch), HAS_DROPOUT=any(ps[i] > 0.0 for i in ch), PREC=prec, ACCUMULATE=c > 0,
            BLOCK_R=block_r(max(t.shape[1] for t in ts)),
        )
    return out


# ---------------------------------------------------------------- the group's forward and backward


def _base_plus_lora(x2d, w, b, lora_B, scaling, t):
    """y = x Wᵀ + b + s · t Bᵀ as lora_linear_fwd computes it after its shrink (same gemm mode)."""
    if lora.gemm_mode(x2d.device) == "cublas":
        y = torch.empty((x2d.shape[0], w.shape[0]), device=x2d.device, dtype=x2d.dtype)
        lora.lora_epilogue_(y, t, lora_B, lora_B.stride(), b, scaling, 0.0, None, accumulate=False)
        return y.addmm_(x2d, w.t()) if y.numel() else y
    return lora.gemm_lora(x2d, w, w.stride(), t, lora_B, lora_B.stride(), b, x2d.dtype, w.shape[0], scaling, 0.0, None)


def lora_linear_group_fwd(x2d, members, seeds):
    """members: [(weight, bias, lora_A, lora_B, scaling, p)]. Returns ([y_g], [t_g]); x2d is read once for every
    member's shrink (then once per member by its base GEMM)."""
    ps = [m[5] for m in members]
    ts = group_shrink(x2d, [m[2] for m in members], [1.0 / (1.0 - p) for p in ps], ps, seeds)
    ys = [_base_plus_lora(x2d, w, b, lora_b, s, t) for (w, b, _, lora_b, s, _), t in zip(members, ts)]
    return ys, ts


def _dt_db(dy, lora_B, t, scaling, need_ab, prec):
    if need_ab and not torch.are_deterministic_algorithms_enabled():
        return lora.dy_pass(dy, lora_B, t, scaling, prec)  # one read of dy for dt and dB
    r = lora_B.shape[1]
    return lora.shrink(dy, (lora_B.stride(1), lora_B.stride(0)), lora_B, r, scaling, 0.0, None, prec), None


def lora_linear_group_bwd(dys, x2d, members, ts, seeds, need_dx, need_ab):
    """dys[g] is None for an output autograd did not reach. Returns (dx or None, [dA_g or None], [dB_g or None]):
    dx written once with every member's LoRA term, the GEMMs adding dy_g W_g onto it (beta=1); x2d read once
    for every member's dA."""
    prec = dot_precision(torch.float32)
    live = [g for g, dy in enumerate(dys) if dy is not None]
    d_as, d_bs = [None] * len(members), [None] * len(members)
    dts = {}
    for g in live:
        _, _, _, lora_b, s, _ = members[g]
        dts[g], d_bs[g] = _dt_db(dys[g], lora_b, ts[g], s, need_ab, prec)
    inv_keep = [1.0 / (1.0 - members[g][5]) for g in live]
    ps, sd = [members[g][5] for g in live], [seeds[g] for g in live]
    dx = None
    if need_dx:
        dx = torch.zeros(x2d.shape, device=x2d.device, dtype=x2d.dtype) if not live else \
            torch.empty(x2d.shape, device=x2d.device, dtype=x2d.dtype)
        if live:
            a_nr = [(members[g][2], (members[g][2].stride(1), members[g][2].stride(0))) for g in live]
            group_epilogue_(dx, [dts[g] for g in live], a_nr, inv_keep, ps, sd)
        for g in live:
            if dx.numel():
                dx.addmm_(dys[g], members[g][0])
    if not need_ab or not live:
        return dx, d_as, d_bs
    for g, d_a_t in zip(live, group_adapter_grad(x2d, [dts[g] for g in live], inv_keep, ps, sd)):
        d_as[g] = d_a_t.t().to(members[g][2].dtype).contiguous()
        if d_bs[g] is None:
            d_bs[g] = lora.adapter_grad(dys[g], ts[g], members[g][4], 0.0, None, prec)
        d_bs[g] = d_bs[g].to(members[g][3].dtype)
    return dx, d_as, d_bs
