"""Prefix-tuning attention: flash-attention style Triton kernels and launchers.

The keys of head h are [prefix ; sequence], but nothing is concatenated: the kernels read the
prefix from its own pointer (batch stride 0 when the batch shares it), then the sequence keys.
Forward (one launch): online softmax over the P prefix keys, then over the sequence keys with the
causal (bottom-right) and key-padding masks; writes out and the logsumexp. No L x S matrix in HBM.
Backward (three launches), P recomputed from the saved logsumexp:
  dq:    one program per (query block, b, h); also writes delta = rowsum(dO * O) for the next two
  dk/dv: one program per (key block, b, kv head), looping over the head's GQA group and all query
         blocks that see the keys: no atomics, deterministic. Run for the sequence keys and for the
         prefix keys; a shared prefix gets fp32 partials per (b, kv head) that the caller sums.
Head dims up to 256: a head is held in one BLOCK_D tile; past 128 the kernels autotune over their own,
smaller (BLOCK_M, BLOCK_N) tiles (the `_wide` variants), as flash-attention does for its 256 head dim.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import configs, dot_precision, upcast_dots

LOG2E = math.log2(math.e)
MAX_HEAD_DIM = 256
WIDE_HEAD_DIM = 128  # past this (BLOCK_D = 256) the kernels run the `_wide` tile lists
MAX_GRID_Y = 65535  # CUDA's limit on grid dim 1, which carries batch x heads


def _cfg(bm, bn, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


_INTERP = _cfg(16, 16, 4, 1)  # small tiles: tiny test shapes still span several blocks
_FWD_CONFIGS = configs([_cfg(128, 64, 8, 3), _cfg(128, 64, 4, 3), _cfg(128, 128, 8, 3), _cfg(64, 64, 4, 3),
                        _cfg(64, 32, 4, 4), _cfg(16, 64, 4, 3), _cfg(16, 128, 4, 3)], _INTERP)
_DQ_CONFIGS = configs([_cfg(128, 32, 4, 3), _cfg(128, 64, 8, 3), _cfg(64, 64, 4, 3), _cfg(64, 32, 4, 4),
                       _cfg(16, 64, 4, 3)], _INTERP)
_DKDV_CONFIGS = configs([_cfg(32, 128, 4, 3), _cfg(64, 128, 8, 3), _cfg(64, 64, 4, 3), _cfg(32, 64, 4, 4),
                         _cfg(16, 64, 4, 3)], _INTERP)
# BLOCK_D = 256: the accumulators are BLOCK_M (or BLOCK_N for dK/dV) x 256 fp32 per program, and each K/V stage
# in shared memory twice the 128-wide one: smaller tiles, more warps, two stages. Chosen from ptxas -v on the
# sm_90a lowering (fp16 operands, causal + mask; not yet timed on a GPU): these spill at most 96 bytes, where
# other candidates (64x64 or 128x32 with one stage, 64x16 dq, 64x32 dk/dv) spilled 0.2-2 KB. The first entry of
# each list (the one PEFTKERN_TUNE=0 keeps) needs at most ~137 KB of shared memory with fp32 operands, so it fits
# an A100 too (fp32 operands spill heavily at any head dim: their dots are FMA loops, 128-wide tiles included).
_FWD_CONFIGS_WIDE = [_cfg(64, 32, 8, 2), _cfg(128, 16, 8, 2), _cfg(32, 32, 4, 2), _cfg(32, 16, 4, 2)]
_DQ_CONFIGS_WIDE = [_cfg(32, 32, 8, 2), _cfg(16, 32, 8, 2), _cfg(16, 16, 4, 2)]
_DKDV_CONFIGS_WIDE = [_cfg(32, 16, 8, 2), _cfg(16, 32, 8, 2), _cfg(16, 16, 4, 2)]


def _wide(tuned, gpu):
    """The same kernel autotuned over the tiles for BLOCK_D = 256 (same key: BLOCK_D is in it)."""
    return triton.autotune(configs=configs(gpu, _INTERP), key=tuned.keys)(tuned.fn)


@triton.jit
def _seq_range(pid_m, S, shift, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Sequence keys a query block reads: [0, hi); those from `mid` on need the causal mask (the
    rows of the block see every key before `mid`)."""
    if CAUSAL:
        hi = tl.minimum(S, (pid_m + 1) * BLOCK_M + shift)  # keys past the block's last row are masked
        mid = tl.maximum(tl.minimum(hi, pid_m * BLOCK_M + shift + 1), 0) // BLOCK_N * BLOCK_N
    else:
        hi = S
        mid = S
    return hi, mid


@triton.jit
def _fwd_block(acc, m_i, l_i, q, K, V, skn, skd, svn, svd, n0, N, offs_m, offs_d, d_ok, qk_scale,
               MASK, smn, shift,
               IS_SEQ: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
               PREC: tl.constexpr, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr):
    """One online-softmax step over keys [n0, n0 + BLOCK_N) of K/V (log2 domain)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    kt = tl.load(K + offs_n[None, :] * skn + offs_d[:, None] * skd, mask=n_ok[None, :] & d_ok[:, None], other=0.0)
    v = tl.load(V + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        kt = kt.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, kt, input_precision=PREC) * qk_scale
    valid = n_ok[None, :]
    if IS_SEQ:
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None] + shift)
        if HAS_MASK:
            keep = tl.load(MASK + offs_n * smn, mask=n_ok, other=0)
            valid = valid & (keep != 0)[None, :]
    s = tl.where(valid, s, float("-inf"))
    # The prefix loop runs first and has >= 1 key: m_i is finite before any all-masked block.
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)
    return acc, m_new, l_i


@triton.autotune(configs=_FWD_CONFIGS, key=["BLOCK_D", "CAUSAL", "L_KEY"])
@triton.jit
def _fwd_kernel(
    Q, K, V, PK, PV, MASK, OUT, LSE,
    sqb, sqh, sql, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    spkb, spkh, spkn, spkd, spvb, spvh, spvn, spvd, smb, smn, sob, soh, sol, sod,
    H, G, L, S, P, D, qk_scale, L_KEY,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // G
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < L
    d_ok = offs_d < D
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sql + offs_d[None, :] * sqd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    shift = S - L
    pk = PK + b * spkb + hk * spkh
    pv = PV + b * spvb + hk * spvh
    for n0 in range(0, P, BLOCK_N):
        acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, pk, pv, spkn, spkd, spvn, spvd, n0, P, offs_m, offs_d,
                                   d_ok, qk_scale, MASK, smn, shift, False, False, False, PREC, UPCAST, BLOCK_N)
    hi, mid = _seq_range(pid_m, S, shift, CAUSAL, BLOCK_M, BLOCK_N)
    k = K + b * skb + hk * skh
    v = V + b * svb + hk * svh
    mask = MASK + b * smb
    for n0 in range(0, mid, BLOCK_N):
        acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, k, v, skn, skd, svn, svd, n0, S, offs_m, offs_d,
                                   d_ok, qk_scale, mask, smn, shift, True, False, HAS_MASK, PREC, UPCAST, BLOCK_N)
    for n0 in range(mid, hi, BLOCK_N):
        acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, k, v, skn, skd, svn, svd, n0, S, offs_m, offs_d,
                                   d_ok, qk_scale, mask, smn, shift, True, True, HAS_MASK, PREC, UPCAST, BLOCK_N)
    out = acc / l_i[:, None]
    tl.store(OUT + b * sob + h * soh + offs_m[:, None] * sol + offs_d[None, :] * sod, out.to(OUT.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # natural log, as torch.logsumexp
    tl.store(LSE + bh.to(tl.int64) * L + offs_m, lse, mask=m_ok)


@triton.jit
def _dq_block(dq, q, do, lse2, delta, K, V, skn, skd, svn, svd, n0, N, offs_m, offs_d, d_ok, qk_scale,
              MASK, smn, shift,
              IS_SEQ: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
              PREC: tl.constexpr, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    k = tl.load(K + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    vt = tl.load(V + offs_n[None, :] * svn + offs_d[:, None] * svd, mask=n_ok[None, :] & d_ok[:, None], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        vt = vt.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
    valid = n_ok[None, :]
    if IS_SEQ:
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None] + shift)
        if HAS_MASK:
            keep = tl.load(MASK + offs_n * smn, mask=n_ok, other=0)
            valid = valid & (keep != 0)[None, :]
    p = tl.where(valid, tl.exp2(s - lse2[:, None]), 0.0)
    dp = tl.dot(do, vt, input_precision=PREC)
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(k.dtype), k, dq, input_precision=PREC)


@triton.autotune(configs=_DQ_CONFIGS, key=["BLOCK_D", "CAUSAL", "L_KEY"])
@triton.jit
def _bwd_dq_kernel(
    Q, K, V, PK, PV, MASK, OUT, DO, LSE, DELTA, DQ,
    sqb, sqh, sql, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    spkb, spkh, spkn, spkd, spvb, spvh, spvn, spvd, smb, smn,
    sob, soh, sol, sod, sdob, sdoh, sdol, sdod,
    H, G, L, S, P, D, qk_scale, sm_scale, L_KEY,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dq (contiguous, q's dtype) and delta = rowsum(dO * O) (fp32) for one query block."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // G
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < L
    d_ok = offs_d < D
    md = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sql + offs_d[None, :] * sqd, mask=md, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdol + offs_d[None, :] * sdod, mask=md, other=0.0)
    o = tl.load(OUT + b * sob + h * soh + offs_m[:, None] * sol + offs_d[None, :] * sod, mask=md, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    row = bh.to(tl.int64) * L + offs_m
    tl.store(DELTA + row, delta, mask=m_ok)
    lse2 = tl.load(LSE + row, mask=m_ok, other=0.0) * 1.4426950408889634
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    shift = S - L
    pk = PK + b * spkb + hk * spkh
    pv = PV + b * spvb + hk * spvh
    for n0 in range(0, P, BLOCK_N):
        dq = _dq_block(dq, q, do, lse2, delta, pk, pv, spkn, spkd, spvn, spvd, n0, P, offs_m, offs_d, d_ok,
                       qk_scale, MASK, smn, shift, False, False, False, PREC, UPCAST, BLOCK_N)
    hi, mid = _seq_range(pid_m, S, shift, CAUSAL, BLOCK_M, BLOCK_N)
    k = K + b * skb + hk * skh
    v = V + b * svb + hk * svh
    mask = MASK + b * smb
    for n0 in range(0, mid, BLOCK_N):
        dq = _dq_block(dq, q, do, lse2, delta, k, v, skn, skd, svn, svd, n0, S, offs_m, offs_d, d_ok,
                       qk_scale, mask, smn, shift, True, False, HAS_MASK, PREC, UPCAST, BLOCK_N)
    for n0 in range(mid, hi, BLOCK_N):
        dq = _dq_block(dq, q, do, lse2, delta, k, v, skn, skd, svn, svd, n0, S, offs_m, offs_d, d_ok,
                       qk_scale, mask, smn, shift, True, True, HAS_MASK, PREC, UPCAST, BLOCK_N)
    tl.store(DQ + bh.to(tl.int64) * L * D + offs_m[:, None] * D + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=md)


@triton.jit
def _dkdv_block(dk, dv, k, v, key_ok, Q, DO, LSE, DELTA, sql, sqd, sdol, sdod, m0, L, offs_n, offs_d, d_ok, shift,
                qk_scale, APPLY_CAUSAL: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                BLOCK_M: tl.constexpr):
    """Accumulate dK, dV of one key block over queries [m0, m0 + BLOCK_M) of one head."""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    m_ok = offs_m < L
    qt = tl.load(Q + offs_m[None, :] * sql + offs_d[:, None] * sqd, mask=m_ok[None, :] & d_ok[:, None], other=0.0)
    do = tl.load(DO + offs_m[:, None] * sdol + offs_d[None, :] * sdod, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        qt = qt.to(tl.float32)
        do = do.to(tl.float32)
    lse2 = tl.load(LSE + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + offs_m, mask=m_ok, other=0.0)
    st = tl.dot(k, qt, input_precision=PREC) * qk_scale
    valid = key_ok[:, None] & m_ok[None, :]
    if APPLY_CAUSAL:
        valid = valid & (offs_n[:, None] <= offs_m[None, :] + shift)
    pt = tl.where(valid, tl.exp2(st - lse2[None, :]), 0.0)
    dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=PREC)
    dpt = tl.dot(v, tl.trans(do), input_precision=PREC)
    dst = pt * (dpt - delta[None, :])
    dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk, input_precision=PREC)
    return dk, dv


@triton.autotune(configs=_DKDV_CONFIGS, key=["BLOCK_D", "CAUSAL", "IS_SEQ", "L_KEY"])
@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, MASK, DO, LSE, DELTA, DK, DV,
    sqb, sqh, sql, sqd, skb, skh, skn, skd, svb, svh, svn, svd, smb, smn,
    sdob, sdoh, sdol, sdod, sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
    HKV, G, L, N, D, shift, qk_scale, sm_scale, L_KEY,
    IS_SEQ: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dK, dV of keys [n0, n0 + BLOCK_N) of one (b, kv head), summed over the head's query group.
    IS_SEQ: sequence keys (masks apply); else prefix keys (seen by every query)."""
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1)
    b = (bhk // HKV).to(tl.int64)
    hk = (bhk % HKV).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < N
    d_ok = offs_d < D
    nd = n_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b * skb + hk * skh + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=nd, other=0.0)
    v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=nd, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    key_ok = n_ok
    m_lo = 0
    if IS_SEQ:
        if HAS_MASK:
            keep = tl.load(MASK + b * smb + offs_n * smn, mask=n_ok, other=0)
            key_ok = key_ok & (keep != 0)
        if CAUSAL:
            # Query i sees key j when i >= j - shift: earlier query blocks see none of these keys.
            m_lo = tl.maximum(pid_n * BLOCK_N - shift, 0) // BLOCK_M * BLOCK_M
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    m_mid = m_lo
    if IS_SEQ and CAUSAL:
        # Query blocks from m_mid on see every key of this block: no causal mask there.
        m_mid = tl.minimum(tl.cdiv(tl.maximum((pid_n + 1) * BLOCK_N - 1 - shift, 0), BLOCK_M) * BLOCK_M, L)
    for g in range(0, G):
        h = hk * G + g
        qh = Q + b * sqb + h * sqh
        doh = DO + b * sdob + h * sdoh
        row0 = (b * HKV * G + h) * L
        for m0 in range(m_lo, m_mid, BLOCK_M):
            dk, dv = _dkdv_block(dk, dv, k, v, key_ok, qh, doh, LSE + row0, DELTA + row0, sql, sqd, sdol, sdod,
                                 m0, L, offs_n, offs_d, d_ok, shift, qk_scale, True, PREC, UPCAST, BLOCK_M)
        for m0 in range(m_mid, L, BLOCK_M):
            dk, dv = _dkdv_block(dk, dv, k, v, key_ok, qh, doh, LSE + row0, DELTA + row0, sql, sqd, sdol, sdod,
                                 m0, L, offs_n, offs_d, d_ok, shift, qk_scale, False, PREC, UPCAST, BLOCK_M)
    tl.store(DK + b * sdkb + hk * sdkh + offs_n[:, None] * sdkn + offs_d[None, :] * sdkd,
             (dk * sm_scale).to(DK.dtype.element_ty), mask=nd)
    tl.store(DV + b * sdvb + hk * sdvh + offs_n[:, None] * sdvn + offs_d[None, :] * sdvd,
             dv.to(DV.dtype.element_ty), mask=nd)


_fwd_kernel_wide = _wide(_fwd_kernel, _FWD_CONFIGS_WIDE)
_bwd_dq_kernel_wide = _wide(_bwd_dq_kernel, _DQ_CONFIGS_WIDE)
_bwd_dkdv_kernel_wide = _wide(_bwd_dkdv_kernel, _DKDV_CONFIGS_WIDE)


# ---------------------------------------------------------------- launchers


def unsupported(q, k, prefix_k) -> str | None:
    """Why these kernels cannot take a call, or None."""
    D = q.shape[-1]
    if D > MAX_HEAD_DIM:
        return f"head dim {D} > {MAX_HEAD_DIM}"
    if q.shape[0] * q.shape[1] > MAX_GRID_Y:
        return f"batch x heads = {q.shape[0] * q.shape[1]} > {MAX_GRID_Y} (grid limit)"
    return None


def _pstrides(t):
    """(b, h, n, d) strides of a prefix; batch stride 0 when the batch shares it."""
    return (0, *t.stride()) if t.dim() == 3 else t.stride()


def _mask_args(mask, q):
    if mask is None:
        return q, 0, 0  # never read (HAS_MASK=False)
    return mask.view(torch.uint8), mask.stride(0), mask.stride(1)


def _common(q, dtype):
    D = q.shape[-1]
    return dict(PREC=dot_precision(dtype), UPCAST=upcast_dots(dtype), BLOCK_D=max(16, triton.next_power_of_2(D)))


def _pick(q, narrow, wide):
    return wide if q.shape[-1] > WIDE_HEAD_DIM else narrow


def _l_key(L):
    return min(triton.next_power_of_2(max(L, 1)), 128)  # tune decode (L small) apart from prefill


def prefix_attention_fwd(q, k, v, prefix_k, prefix_v, causal, key_padding_mask, scale):
    """Returns (out (B, H, L, D) contiguous in q's dtype, lse (B, H, L) fp32)."""
    B, H, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    P = prefix_k.shape[-2]
    out = torch.empty((B, H, L, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    if B * H * L == 0:
        return out, lse
    mask, smb, smn = _mask_args(key_padding_mask, q)
    grid = lambda meta: (triton.cdiv(L, meta["BLOCK_M"]), B * H)
    _pick(q, _fwd_kernel, _fwd_kernel_wide)[grid](
        q, k, v, prefix_k, prefix_v, mask, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *_pstrides(prefix_k), *_pstrides(prefix_v), smb, smn, *out.stride(),
        H, H // Hkv, L, S, P, D, scale * LOG2E, _l_key(L),
        CAUSAL=causal, HAS_MASK=key_padding_mask is not None, **_common(q, q.dtype),
    )
    return out, lse


def sum_partials_torch(part: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(2, B, N) fp32 partials of (dprefix_k, dprefix_v) -> two (N,) tensors in `dtype`, summed over B."""
    return part[0].sum(0).to(dtype), part[1].sum(0).to(dtype)


def prefix_attention_bwd(dout, q, k, v, prefix_k, prefix_v, out, lse, causal, key_padding_mask, scale,
                         sum_partials=sum_partials_torch):
    """Returns (dq, dk, dv, dprefix_k, dprefix_v), contiguous, in the inputs' dtypes and shapes.
    A shared prefix's gradient is summed over the batch by `sum_partials` (torch or the CUDA kernel)."""
    B, H, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    P = prefix_k.shape[-2]
    G = H // Hkv
    dev = q.device
    dq = torch.empty((B, H, L, D), dtype=q.dtype, device=dev)
    dk = torch.empty((B, Hkv, S, D), dtype=k.dtype, device=dev)
    dv = torch.empty((B, Hkv, S, D), dtype=v.dtype, device=dev)
    shared = prefix_k.dim() == 3
    if shared:
        part = torch.empty((2, B, Hkv, P, D), dtype=torch.float32, device=dev)
        dpk, dpv = part[0], part[1]
    else:
        dpk = torch.empty((B, Hkv, P, D), dtype=prefix_k.dtype, device=dev)
        dpv = torch.empty((B, Hkv, P, D), dtype=prefix_v.dtype, device=dev)
    delta = torch.empty((B, H, L), dtype=torch.float32, device=dev)
    mask, smb, smn = _mask_args(key_padding_mask, q)
    common = _common(q, q.dtype)
    has_mask = key_padding_mask is not None
    if B * H * L > 0:
        grid = lambda meta: (triton.cdiv(L, meta["BLOCK_M"]), B * H)
        _pick(q, _bwd_dq_kernel, _bwd_dq_kernel_wide)[grid](
            q, k, v, prefix_k, prefix_v, mask, out, dout, lse, delta, dq,
            *q.stride(), *k.stride(), *v.stride(), *_pstrides(prefix_k), *_pstrides(prefix_v), smb, smn,
            *out.stride(), *dout.stride(),
            H, G, L, S, P, D, scale * LOG2E, scale, _l_key(L),
            CAUSAL=causal, HAS_MASK=has_mask, **common,
        )
    for is_seq, kx, vx, gk, gv, n in ((True, k, v, dk, dv, S), (False, prefix_k, prefix_v, dpk, dpv, P)):
        if B * Hkv * n == 0:
            continue
        kstr = kx.stride() if is_seq else _pstrides(kx)
        vstr = vx.stride() if is_seq else _pstrides(vx)
        grid = lambda meta, n=n: (triton.cdiv(n, meta["BLOCK_N"]), B * Hkv)
        _pick(q, _bwd_dkdv_kernel, _bwd_dkdv_kernel_wide)[grid](
            q, kx, vx, mask, dout, lse, delta, gk, gv,
            *q.stride(), *kstr, *vstr, smb, smn, *dout.stride(), *gk.stride(), *gv.stride(),
            Hkv, G, L, n, D, S - L, scale * LOG2E, scale, _l_key(L),
            IS_SEQ=is_seq, CAUSAL=causal, HAS_MASK=has_mask, **common,
        )
    if shared:
        dpk, dpv = (t.view(Hkv, P, D) for t in sum_partials(part.view(2, B, Hkv * P * D), prefix_k.dtype))
    return dq, dk, dv, dpk, dpv
