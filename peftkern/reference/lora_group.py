"""Grouped LoRA projections in plain PyTorch: the members one by one, each with its own seed.

The torch backend of `lora_linear_group` and the definition the Triton group kernels are tested against:
a group's results are, by construction, what its members' own lora_linear calls give.
"""

from __future__ import annotations

from .lora import lora_linear_bwd, lora_linear_fwd


def lora_linear_group_fwd(x2d, members, seeds, want_keep=False):
    """members: [(weight, bias, lora_A, lora_B, scaling, p)]. Returns ([y_g], [t_g]), and [keep_g] with want_keep
    (see lora_linear_fwd)."""
    out = [lora_linear_fwd(x2d, w, b, a, lora_b, s, p, seed, want_keep=True)
           for (w, b, a, lora_b, s, p), seed in zip(members, seeds)]
    ys, ts, keeps = ([o[i] for o in out] for i in range(3))
    return (ys, ts, keeps) if want_keep else (ys, ts)


def lora_linear_group_bwd(dys, x2d, members, ts, seeds, need_dx, need_ab, keeps=None):
    """dys[g] is None for an output autograd did not reach. Returns (dx or None, [dA_g or None], [dB_g or None])."""
    dx, d_as, d_bs = None, [], []
    keeps = keeps or [None] * len(members)
    for dy, (w, _, a, b, s, p), t, seed, keep in zip(dys, members, ts, seeds, keeps):
        if dy is None:
            d_as.append(None)
            d_bs.append(None)
            continue
        dx_g, d_a, d_b = lora_linear_bwd(dy, x2d, w, a, b, t, s, p, seed, need_dx, need_ab, keep=keep)
        d_as.append(d_a)
        d_bs.append(d_b)
        if dx_g is not None:
            dx = dx_g if dx is None else dx.add_(dx_g)
    if need_dx and dx is None:
        dx = x2d.new_zeros(x2d.shape)
    return dx, d_as, d_bs
