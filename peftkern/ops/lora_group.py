"""lora_linear_group: several LoRA linears that read the same x (q/k/v, gate/up), as one autograd node.

Every member keeps its own dropout probability and seed (drawn in member order, as the members' own calls
would draw them), so the results are exactly the members' lora_linear results. On the Triton backend x is
read once for all the shrinks and once for all the dA reductions, and dx is written once for the group.
It is an eager-mode path: under torch.compile, export, meta tensors, tensor subclasses or functorch it runs
the members' lora_linear ops one by one (the compiler sees each read of x itself).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _validate
from ..reference import lora_group as ref
from . import lora as _lora
from ._out import standalone


def _triton():
    from ..triton import lora_group as tri  # lazily: no Triton work at `import peftkern`

    return tri


def _impls(backend: str):
    mod = _triton() if backend == "triton" else ref
    return mod.lora_linear_group_fwd, mod.lora_linear_group_bwd


def max_rank(backend: str) -> int | None:
    """The largest member rank the backend's group kernels take (None: any)."""
    return _triton().MAX_RANK if backend == "triton" else None


class _LoraLinearGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, spec, *tensors):
        scalings, ps, seeds, fwd, bwd = spec
        members = [(*tensors[4 * g:4 * g + 4], scalings[g], ps[g]) for g in range(len(scalings))]
        x2d = _lora._rows(x)
        keeps = []
        if fwd == bwd == "torch" and any(ps):  # the torch backend keeps its masks (see ops/lora.py)
            ys, ts, keeps = ref.lora_linear_group_fwd(x2d, members, seeds, want_keep=True)
        else:
            ys, ts = _impls(fwd)[0](x2d, members, seeds)
        ctx.set_materialize_grads(False)  # an output nobody used brings no gradient: its member is skipped
        ctx.save_for_backward(x, *tensors[0::4], *tensors[2::4], *tensors[3::4], *ts, *keeps)
        ctx.spec = spec
        ctx.has_bias = [b is not None for b in tensors[1::4]]
        lead = x.shape[:-1]
        return tuple(y if x.dim() == 2 else standalone(y, (*lead, y.shape[-1])) for y in ys)

    @staticmethod
    def backward(ctx, *dys):
        scalings, ps, seeds, _, bwd = ctx.spec
        n = len(scalings)
        x, *saved = ctx.saved_tensors
        ws, a_s, b_s, ts, keeps = saved[:n], saved[n:2 * n], saved[2 * n:3 * n], saved[3 * n:4 * n], saved[4 * n:]
        need = ctx.needs_input_grad
        need_dx = need[0]
        need_ab = any(need[2 + 4 * g + 2] or need[2 + 4 * g + 3] for g in range(n))
        dys2d = [None if dy is None else _lora._contiguous_rows(dy) for dy in dys]
        dx, d_as, d_bs = None, [None] * n, [None] * n
        if need_dx or need_ab:
            members = [(ws[g], None, a_s[g], b_s[g], scalings[g], ps[g]) for g in range(n)]
            args = (dys2d, _lora._rows(x), members, ts, seeds, need_dx, need_ab)
            dx, d_as, d_bs = ref.lora_linear_group_bwd(*args, keeps=keeps) if keeps else _impls(bwd)[1](*args)
            if dx is not None and x.dim() != 2:
                dx = dx.reshape(x.shape)
        grads = [dx if need_dx else None, None]
        for g in range(n):
            need_w, need_b, need_a, need_bb = need[2 + 4 * g:6 + 4 * g]
            base = _lora._base_grads(dys[g], x, need_w, need_b and ctx.has_bias[g]) if dys[g] is not None \
                else (None, None)
            grads += [*base, d_as[g] if need_a else None, d_bs[g] if need_bb else None]
        return tuple(grads)


def _one_by_one(x, members):
    return [_lora._checked(x, *m) for m in members]


def lora_linear_group(x: Tensor, members) -> list[Tensor]:
    """[lora_linear(x, *m) for m in members], computed as one group.

    members: a sequence of (weight, bias, lora_A, lora_B, scaling, dropout_p), each as `lora_linear` takes it
    (out, bias, rank, adapter dtype and dropout may differ per member; in_features and the base dtype are x's).
    Each member draws its own dropout seed, in member order; the masks of two members are independent.
    """
    members = [tuple(m) for m in members]
    if not members:
        raise ValueError("lora_linear_group: at least one member")
    for m in members:
        if len(m) != 6:
            raise ValueError("lora_linear_group: each member is (weight, bias, lora_A, lora_B, scaling, dropout_p)")
        _validate.lora_linear(x, *m)
    return lora_linear_group_checked(x, [(*m[:4], float(m[4]), float(m[5])) for m in members])


def lora_linear_group_checked(x: Tensor, members: list) -> list[Tensor]:
    """`lora_linear_group` for a caller that has checked every member as `lora_linear` checks its arguments, with
    float scaling and dropout_p (the integrations' plans)."""
    if not _lora._eager(x):
        return _one_by_one(x, members)
    r = max(m[2].shape[0] for m in members)
    fwd, bwd = _lora._backends(x.device, r)
    limit = max_rank(fwd) if fwd else None
    if not fwd or len(members) == 1 or (limit is not None and r > limit):
        return _one_by_one(x, members)  # an explicit cuda request or ranks past the group kernels: per member
    if fwd == bwd == "torch" and x.dtype == torch.float32 and all(m[2].dtype == torch.float32 for m in members):
        # The torch backend computes members one by one anyway; in fp32 each member's own eager node costs the host
        # less than the group's (ops/lora.py's _LoraLinearEagerFp32). Seeds are drawn in member order either way.
        return _one_by_one(x, members)
    scalings = tuple(m[4] for m in members)
    ps = tuple(m[5] for m in members)
    seed_ts = [_lora.draw_seed(p) for p in ps]
    seeds = tuple(0 if s is None else int(s) for s in seed_ts)
    tensors = [t for m in members for t in m[:4]]
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *tensors)):
        return list(_LoraLinearGroup.apply(x, (scalings, ps, seeds, fwd, bwd), *tensors))
    ys, _ = _impls(fwd)[0](_lora._rows(x), members, seeds)
    return [y if x.dim() == 2 else standalone(y, (*x.shape[:-1], y.shape[-1])) for y in ys]
