"""IA3Linear: a frozen nn.Linear scaled by a learned IA3 vector, running peftkern::ia3_linear."""

from __future__ import annotations

import torch
from torch import nn

from ..ops.ia3 import ia3_linear


class IA3Linear(nn.Module):
    """Wraps `base` (an nn.Linear, frozen) with an IA3 vector `ia3_l`, initialised to ones as peft
    does, so the wrapped layer starts unchanged.

    feedforward=False scales the output, bias included: ``(x Wᵀ + b) ⊙ l``, l of shape (out,).
    feedforward=True scales the input: ``(x ⊙ l) Wᵀ + b``, l of shape (in,).
    `adapter_dtype` defaults to float32 (peft's default), whatever the base's dtype. `merge()` folds
    l into the base weight (and bias, output case) as peft does; `unmerge()` divides it out again
    (with peft's 1e-8 guard against a zero entry, so it is exact only up to rounding).
    """

    def __init__(self, base: nn.Linear, feedforward: bool = False, adapter_dtype: torch.dtype = torch.float32):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be an nn.Linear, got {type(base).__name__}")
        self.base = base
        self.base.requires_grad_(False)
        self.feedforward = bool(feedforward)
        n = base.in_features if self.feedforward else base.out_features
        self.ia3_l = nn.Parameter(torch.ones(n, device=base.weight.device, dtype=adapter_dtype))
        self.merged = False

    def _weight_scale(self, vec: torch.Tensor) -> torch.Tensor:
        return vec[None, :] if self.feedforward else vec[:, None]

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        w, b = self.base.weight, self.base.bias
        scale = self.ia3_l.float()
        w.copy_((w.float() * self._weight_scale(scale)).to(w.dtype))
        if not self.feedforward and b is not None:
            b.copy_((b.float() * scale).to(b.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        w, b = self.base.weight, self.base.bias
        scale = self.ia3_l.float() + 1e-8
        w.copy_((w.float() / self._weight_scale(scale)).to(w.dtype))
        if not self.feedforward and b is not None:
            b.copy_((b.float() / scale).to(b.dtype))
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        return ia3_linear(x, self.base.weight, self.base.bias, self.ia3_l, self.feedforward)

    def extra_repr(self) -> str:
        return (f"in={self.base.in_features}, out={self.base.out_features}, feedforward={self.feedforward}, "
                f"merged={self.merged}")
