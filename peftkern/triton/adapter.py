"""Fused bottleneck adapter: Triton kernels and launchers.

    z = x W_dᵀ + b_d   (M, r)      y = res + s · (act(z) W_uᵀ + b_u)   (M, d), res = x when none given

Forward (one launch): a program owns BLOCK_M rows. Phase 1 streams x over d and accumulates z in
fp32 registers; bias and activation are applied there. Phase 2 streams W_u over d and writes
y = res + s · (h W_uᵀ + b_u) tile by tile (x is read again for the residual, mostly from L2). z is
written out (M × r, the compute dtype) because backward needs it: it is ~r/d of x's size.
Backward (two launches, plus small fp32 reductions in torch):
  rows:   dz = s · (dy W_u) ⊙ act'(z)                    one pass over dy per row block
  cols:   per (d tile, split of M): dW_uᵀ += s · dyᵀ act(z), dW_dᵀ += xᵀ dz, db_u += s · Σ dy,
          and dx = dz W_d (+ dy when x is the residual), so dy and x are read once more, dx written once
r above MAX_BLOCK_R is blocked over r: z / dz go through global memory (they are written anyway).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, TL_DTYPE, configs, dot_precision, m_key, sm_count, upcast_dots

ACT_IDS = {"relu": 0, "gelu": 1, "gelu_tanh": 2, "silu": 3}
MAX_BLOCK_R = 128  # largest r held in one register tile; larger r is blocked


@triton.jit
def _tanh(u):
    return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)  # saturates cleanly to ±1 for large |u|


@triton.jit
def _act(z, ACT: tl.constexpr):
    if ACT == 0:
        h = tl.maximum(z, 0.0)
    elif ACT == 1:
        h = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == 2:
        h = 0.5 * z * (1.0 + _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z)))
    else:
        h = z / (1.0 + tl.exp(-z))
    return h


@triton.jit
def _act_grad(z, ACT: tl.constexpr):
    if ACT == 0:
        g = tl.where(z > 0.0, 1.0, 0.0)
    elif ACT == 1:
        g = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)) + z * tl.exp(-0.5 * z * z) * 0.3989422804014327
    elif ACT == 2:
        t = _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z))
        g = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * z * z)
    else:
        s = 1.0 / (1.0 + tl.exp(-z))
        g = s * (1.0 + z * (1.0 - s))
    return g


def _cfg(bm, bd, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_D": bd}, num_warps=warps, num_stages=stages)


# Row-block kernels: big BLOCK_M amortizes the W reads (every program streams all of W_d, W_u).
_ROW_CONFIGS = configs(
    [_cfg(64, 64, 4, 3), _cfg(128, 64, 8, 3), _cfg(64, 128, 8, 3), _cfg(32, 128, 4, 3), _cfg(128, 32, 4, 4)],
    _cfg(16, 32, 4, 1),
)
# Column kernel: a program owns a d tile and a slice of rows, accumulating (BLOCK_D, r) twice. The first
# config (the only one under PEFTKERN_TUNE=0) is the lightest: it fits shared memory at r = 128.
_COL_CONFIGS = configs(
    [_cfg(32, 64, 4, 3), _cfg(64, 64, 4, 3), _cfg(32, 128, 8, 3), _cfg(64, 128, 8, 3)],
    _cfg(16, 32, 4, 1),
)


@triton.autotune(configs=_ROW_CONFIGS, key=["D", "R", "M_KEY", "HAS_RES"])
@triton.jit
def _fwd_kernel(
    X, RES, WD, BD_, WU, BU, Y, Z,
    M, D, R, M_KEY,
    sxm, sxd, srm, srd, swd_r, swd_d, swu_d, swu_r, sym, syd, szm, szr,
    scaling,
    ACT: tl.constexpr, HAS_RES: tl.constexpr, HAS_BD: tl.constexpr, HAS_BU: tl.constexpr,
    DOT: tl.constexpr, PREC: tl.constexpr, BLOCK_R: tl.constexpr, NUM_RB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < M

    # Phase 1: z = x W_dᵀ + b_d, one r block at a time (one block when r <= MAX_BLOCK_R).
    for rb in tl.static_range(NUM_RB):
        offs_r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
        r_ok = offs_r < R
        z = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + offs_d
            d_ok = dd < D
            x = tl.load(X + offs_m[:, None] * sxm + dd[None, :] * sxd, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
            w = tl.load(WD + offs_r[None, :] * swd_r + dd[:, None] * swd_d, mask=r_ok[None, :] & d_ok[:, None],
                        other=0.0)
            z = tl.dot(x.to(DOT), w.to(DOT), z, input_precision=PREC)
        if HAS_BD:
            z += tl.load(BD_ + offs_r, mask=r_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(Z + offs_m[:, None] * szm + offs_r[None, :] * szr, z.to(Z.dtype.element_ty),
                 mask=m_ok[:, None] & r_ok[None, :])
    if NUM_RB > 1:
        tl.debug_barrier()  # z blocks written by other threads of this program are read back below

    # Phase 2: y = res + s · (act(z) W_uᵀ + b_u), one d tile at a time, written once.
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        d_ok = dd < D
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for rb in tl.static_range(NUM_RB):
            offs_r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
            r_ok = offs_r < R
            if NUM_RB > 1:
                z = tl.load(Z + offs_m[:, None] * szm + offs_r[None, :] * szr, mask=m_ok[:, None] & r_ok[None, :],
                            other=0.0).to(tl.float32)
            # Padded r columns hold z = 0 and act(0) = 0 for every activation; W_u is masked there too.
            h = _act(z, ACT).to(DOT)
            wu = tl.load(WU + dd[None, :] * swu_d + offs_r[:, None] * swu_r, mask=d_ok[None, :] & r_ok[:, None],
                         other=0.0)
            acc = tl.dot(h, wu.to(DOT), acc, input_precision=PREC)
        if HAS_BU:
            acc += tl.load(BU + dd, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        mask = m_ok[:, None] & d_ok[None, :]
        if HAS_RES:
            res = tl.load(RES + offs_m[:, None] * srm + dd[None, :] * srd, mask=mask, other=0.0)
        else:
            res = tl.load(X + offs_m[:, None] * sxm + dd[None, :] * sxd, mask=mask, other=0.0)
        y = res.to(tl.float32) + acc * scaling
        tl.store(Y + offs_m[:, None] * sym + dd[None, :] * syd, y.to(Y.dtype.element_ty), mask=mask)


@triton.autotune(configs=_ROW_CONFIGS, key=["D", "R", "M_KEY"])
@triton.jit
def _bwd_dz_kernel(
    DY, Z, WU, DZ,
    M, D, R, M_KEY,
    sdym, sdyd, szm, szr, swu_d, swu_r,
    scaling,
    ACT: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, BLOCK_R: tl.constexpr, NUM_RB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """DZ (fp32, (M, R)) = s · (dy W_u) ⊙ act'(z)."""
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < M
    for rb in tl.static_range(NUM_RB):
        offs_r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
        r_ok = offs_r < R
        dh = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + offs_d
            d_ok = dd < D
            dy = tl.load(DY + offs_m[:, None] * sdym + dd[None, :] * sdyd, mask=m_ok[:, None] & d_ok[None, :],
                         other=0.0)
            wu = tl.load(WU + dd[:, None] * swu_d + offs_r[None, :] * swu_r, mask=d_ok[:, None] & r_ok[None, :],
                         other=0.0)
            dh = tl.dot(dy.to(DOT), wu.to(DOT), dh, input_precision=PREC)
        zmask = m_ok[:, None] & r_ok[None, :]
        z = tl.load(Z + offs_m[:, None] * szm + offs_r[None, :] * szr, mask=zmask, other=0.0).to(tl.float32)
        dz = dh * scaling * _act_grad(z, ACT)
        tl.store(DZ + offs_m[:, None] * R + offs_r[None, :], dz, mask=zmask)


@triton.autotune(configs=_COL_CONFIGS, key=["D", "R", "M_KEY", "NEED_DX", "NEED_W"])
@triton.jit
def _bwd_cols_kernel(
    DY, X, Z, DZ, WD, DX, PU, PD, PB,
    M, D, R, rows_per_split, M_KEY,
    sdym, sdyd, sxm, sxd, szm, szr, swd_r, swd_d, sdxm, sdxd,
    scaling,
    ACT: tl.constexpr, ADD_DY: tl.constexpr, NEED_DX: tl.constexpr, NEED_W: tl.constexpr,
    DOT: tl.constexpr, PREC: tl.constexpr, BLOCK_R: tl.constexpr, NUM_RB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (d tile, r block, split s): PU[s, d, r] = s·Σ dy[m,d] act(z)[m,r], PD[s, d, r] = Σ x[m,d] dz[m,r],
    PB[s, d] = s·Σ dy[m,d] over the split's rows; r block 0 also writes dx = dz W_d (+ dy) for them."""
    pid_d = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    dd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = dd < D
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    m_lo = pid_s * rows_per_split
    m_hi = tl.minimum(m_lo + rows_per_split, M)
    acc_u = tl.zeros((BLOCK_D, BLOCK_R), dtype=tl.float32)
    acc_d = tl.zeros((BLOCK_D, BLOCK_R), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if NUM_RB == 1:
        wd = tl.load(WD + offs_r[:, None] * swd_r + dd[None, :] * swd_d, mask=r_ok[:, None] & d_ok[None, :],
                     other=0.0).to(DOT)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < m_hi
        md = m_ok[:, None] & d_ok[None, :]
        mr = m_ok[:, None] & r_ok[None, :]
        dy = tl.load(DY + offs_m[:, None] * sdym + dd[None, :] * sdyd, mask=md, other=0.0)
        dz = tl.load(DZ + offs_m[:, None] * R + offs_r[None, :], mask=mr, other=0.0).to(DOT)
        if NEED_W:
            x = tl.load(X + offs_m[:, None] * sxm + dd[None, :] * sxd, mask=md, other=0.0).to(DOT)
            z = tl.load(Z + offs_m[:, None] * szm + offs_r[None, :] * szr, mask=mr, other=0.0).to(tl.float32)
            h = _act(z, ACT).to(DOT)
            acc_u = tl.dot(tl.trans(dy.to(DOT)), h, acc_u, input_precision=PREC)
            acc_d = tl.dot(tl.trans(x), dz, acc_d, input_precision=PREC)
            acc_b += tl.sum(dy.to(tl.float32), axis=0)
        if NEED_DX:  # noqa: SIM102 - a compile-time branch around a run-time one
            if pid_r == 0:
                if NUM_RB == 1:
                    dx = tl.dot(dz, wd, input_precision=PREC)
                else:
                    dx = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
                    for rb in tl.static_range(NUM_RB):
                        rr = rb * BLOCK_R + tl.arange(0, BLOCK_R)
                        rr_ok = rr < R
                        dzb = tl.load(DZ + offs_m[:, None] * R + rr[None, :], mask=m_ok[:, None] & rr_ok[None, :],
                                      other=0.0).to(DOT)
                        wdb = tl.load(WD + rr[:, None] * swd_r + dd[None, :] * swd_d,
                                      mask=rr_ok[:, None] & d_ok[None, :], other=0.0).to(DOT)
                        dx = tl.dot(dzb, wdb, dx, input_precision=PREC)
                if ADD_DY:
                    dx += dy.to(tl.float32)
                tl.store(DX + offs_m[:, None] * sdxm + dd[None, :] * sdxd, dx.to(DX.dtype.element_ty), mask=md)
    if NEED_W:
        out = pid_s * D * R + dd[:, None] * R + offs_r[None, :]
        tl.store(PU + out, acc_u * scaling, mask=d_ok[:, None] & r_ok[None, :])
        tl.store(PD + out, acc_d, mask=d_ok[:, None] & r_ok[None, :])
        if pid_r == 0:
            tl.store(PB + pid_s * D + dd, acc_b * scaling, mask=d_ok)


# ---------------------------------------------------------------- launchers


def _dot_args(compute_dtype: torch.dtype) -> dict:
    dot = tl.float32 if upcast_dots(compute_dtype) else TL_DTYPE[compute_dtype]
    return {"DOT": dot, "PREC": dot_precision(torch.float32 if dot == tl.float32 else compute_dtype)}


def r_blocks(r: int) -> tuple[int, int]:
    """(BLOCK_R, NUM_RB): r in one register tile up to MAX_BLOCK_R, else in NUM_RB equal blocks."""
    num = triton.cdiv(r, MAX_BLOCK_R)
    return max(16, triton.next_power_of_2(triton.cdiv(r, num))), num


def bottleneck_adapter_fwd(x2d, down_weight, down_bias, up_weight, up_bias, res2d, activation, scaling, compute_dtype):
    """Returns (y (M, d) in x's dtype, z (M, r) in the compute dtype `compute_dtype`)."""
    M, D = x2d.shape
    R = down_weight.shape[0]
    y = torch.empty_like(x2d, memory_format=torch.contiguous_format)
    z = torch.empty((M, R), device=x2d.device, dtype=compute_dtype)
    if M == 0:
        return y, z
    br, nrb = r_blocks(R)
    res = res2d if res2d is not None else x2d
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)
    _fwd_kernel[grid](
        x2d, res, down_weight, down_bias if down_bias is not None else down_weight, up_weight,
        up_bias if up_bias is not None else up_weight, y, z,
        M, D, R, m_key(M),
        x2d.stride(0), x2d.stride(1), res.stride(0), res.stride(1), down_weight.stride(0), down_weight.stride(1),
        up_weight.stride(0), up_weight.stride(1), y.stride(0), y.stride(1), z.stride(0), z.stride(1),
        float(scaling),
        ACT=ACT_IDS[activation], HAS_RES=res2d is not None, HAS_BD=down_bias is not None,
        HAS_BU=up_bias is not None, BLOCK_R=br, NUM_RB=nrb, **_dot_args(compute_dtype),
    )
    return y, z


def _num_splits(M: int, D: int, nrb: int, device) -> int:
    if INTERPRET or device.type != "cuda":
        return 1 if M < 64 else 2
    sms = sm_count(device.index if device.index is not None else torch.cuda.current_device())
    d_blocks = triton.cdiv(D, 64) * nrb
    return max(1, min(triton.cdiv(2 * sms, d_blocks), triton.cdiv(M, 256), 64))


def bottleneck_adapter_bwd(dy2d, x2d, z, down_weight, up_weight, activation, scaling, has_residual, need_dx,
                           need_params, compute_dtype):
    """Returns (dx or None, d_down_w, d_down_b, d_up_w, d_up_b) as the reference backward does."""
    M, D = x2d.shape
    R = down_weight.shape[0]
    pdt = down_weight.dtype
    dx = torch.empty((M, D), device=x2d.device, dtype=x2d.dtype) if need_dx else None
    if M == 0:
        if need_dx and not has_residual:
            dx = dy2d.to(x2d.dtype, copy=True)
        zeros = lambda *s: torch.zeros(s, device=x2d.device, dtype=pdt)
        params = (zeros(R, D), zeros(R), zeros(D, R), zeros(D)) if need_params else (None,) * 4
        return (dx, *params)
    br, nrb = r_blocks(R)
    dots = _dot_args(compute_dtype)
    dz = torch.empty((M, R), device=x2d.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)
    _bwd_dz_kernel[grid](
        dy2d, z, up_weight, dz, M, D, R, m_key(M),
        dy2d.stride(0), dy2d.stride(1), z.stride(0), z.stride(1), up_weight.stride(0), up_weight.stride(1),
        float(scaling), ACT=ACT_IDS[activation], BLOCK_R=br, NUM_RB=nrb, **dots,
    )
    split = _num_splits(M, D, nrb, x2d.device) if need_params else max(1, triton.cdiv(M, 256))
    rows = triton.cdiv(M, split)
    if need_params:
        pu = torch.empty((split, D, R), device=x2d.device, dtype=torch.float32)
        pd = torch.empty((split, D, R), device=x2d.device, dtype=torch.float32)
        pb = torch.empty((split, D), device=x2d.device, dtype=torch.float32)
    else:
        pu = pd = pb = dz  # never touched
    out = dx if need_dx else dz
    grid = lambda meta: (triton.cdiv(D, meta["BLOCK_D"]), nrb if need_params else 1, split)
    _bwd_cols_kernel[grid](
        dy2d, x2d, z, dz, down_weight, out, pu, pd, pb,
        M, D, R, rows, m_key(M),
        dy2d.stride(0), dy2d.stride(1), x2d.stride(0), x2d.stride(1), z.stride(0), z.stride(1),
        down_weight.stride(0), down_weight.stride(1), out.stride(0), out.stride(1),
        float(scaling),
        ACT=ACT_IDS[activation], ADD_DY=not has_residual, NEED_DX=need_dx, NEED_W=need_params,
        BLOCK_R=br, NUM_RB=nrb, **dots,
    )
    if not need_params:
        return dx, None, None, None, None
    sum0 = lambda p: p[0] if split == 1 else p.sum(0)
    d_up_w = sum0(pu).to(pdt)
    d_down_w = sum0(pd).t().to(pdt).contiguous()
    return dx, d_down_w, dz.sum(0).to(pdt), d_up_w, sum0(pb).to(pdt)
