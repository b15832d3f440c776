"""LoraLinear: a frozen nn.Linear plus a LoRA adapter, running peftkern::lora_linear."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..ops.lora import lora_linear


class LoraLinear(nn.Module):
    """Wraps `base` (an nn.Linear, frozen) with a rank-`r` adapter, initialised as peft does
    (A Kaiming-uniform, B zero) so the wrapped layer starts unchanged.

    scaling = lora_alpha / r. `adapter_dtype` defaults to float32 (peft's default), whatever the
    base's dtype. `merge()` folds the adapter into the base weight for inference; `unmerge()`
    takes it out again.
    """

    def __init__(self, base: nn.Linear, r: int = 8, lora_alpha: float = 8.0, dropout: float = 0.0,
                 adapter_dtype: torch.dtype = torch.float32):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be an nn.Linear, got {type(base).__name__}")
        if not (isinstance(r, int) and r >= 1):
            raise ValueError(f"r={r!r} must be a positive int (any rank peft takes, past min(in, out) too)")
        self.base = base
        self.base.requires_grad_(False)
        self.r = r
        self.scaling = lora_alpha / r
        self.dropout = dropout
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=dev, dtype=adapter_dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=dev, dtype=adapter_dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            w = self.base.weight
            w.copy_((w.float() + self.delta_weight()).to(w.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            w = self.base.weight
            w.copy_((w.float() - self.delta_weight()).to(w.dtype))
            self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        p = self.dropout if self.training else 0.0
        return lora_linear(x, self.base.weight, self.base.bias, self.lora_A, self.lora_B, self.scaling, p)

    def extra_repr(self) -> str:
        return (f"in={self.base.in_features}, out={self.base.out_features}, r={self.r}, "
                f"scaling={self.scaling:g}, dropout={self.dropout}, merged={self.merged}")
