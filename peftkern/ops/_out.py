"""Results a custom op hands back must be tensors of their own, not views of its internals."""

from __future__ import annotations

import torch
from torch import Tensor


def standalone(t: Tensor, shape) -> Tensor:
    """`t` with shape `shape`, as a tensor of its own rather than a view (same storage, no copy when `t`
    is contiguous). Autograd forbids in-place ops on a view returned by a custom op, and a layer's output
    is often modified in place (`y += residual`, `nn.ReLU(inplace=True)`, `g.sigmoid_()`)."""
    shape = tuple(shape)
    if tuple(t.shape) == shape and t._base is None:
        return t
    t = t.contiguous()
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage(), t.storage_offset(), shape)
