"""BottleneckAdapter: the down-projection / activation / up-projection block, running
peftkern::bottleneck_adapter."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..ops.adapter import ACTIVATIONS, bottleneck_adapter


class BottleneckAdapter(nn.Module):
    """``forward(x, residual=None) = (x or residual) + scaling · (act(x W_dᵀ + b_d) W_uᵀ + b_u)``.

    down_weight (r, d) starts Kaiming-uniform as in nn.Linear, down_bias, up_weight and up_bias at zero:
    the adapter starts as the identity on its residual, so a model it is added to starts unchanged.
    Parameters live in `dtype` (the base model's dtype, or float32 to compute the adapter in fp32).
    An input of another dtype is cast to the parameters' dtype unless they are fp32 (e.g. T5 keeps its
    FFN output projection in fp32), and the result has the input's dtype.
    """

    def __init__(self, d: int, r: int, activation: str = "relu", scaling: float = 1.0, *,
                 device=None, dtype: torch.dtype | None = None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if d < 1 or r < 1:
            raise ValueError(f"d={d} and r={r} must be >= 1")
        kw = {"device": device, "dtype": dtype}
        self.d, self.r, self.activation, self.scaling = d, r, activation, float(scaling)
        self.down_weight = nn.Parameter(torch.empty(r, d, **kw))
        self.down_bias = nn.Parameter(torch.zeros(r, **kw))
        self.up_weight = nn.Parameter(torch.zeros(d, r, **kw))
        self.up_bias = nn.Parameter(torch.zeros(d, **kw))
        nn.init.kaiming_uniform_(self.down_weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if residual is not None and residual.dtype != x.dtype:
            # e.g. T5 in fp16 keeps its FFN output projection in fp32: the result replaces that output,
            # so it is computed in the residual's dtype
            x = x.to(residual.dtype)
        pdt = self.down_weight.dtype
        if x.dtype == pdt or pdt == torch.float32:
            return bottleneck_adapter(x, self.down_weight, self.down_bias, self.up_weight, self.up_bias, residual,
                                      self.activation, self.scaling)
        cast = None if residual is None else residual.to(pdt)
        return bottleneck_adapter(x.to(pdt), self.down_weight, self.down_bias, self.up_weight, self.up_bias, cast,
                                  self.activation, self.scaling).to(x.dtype)

    def extra_repr(self) -> str:
        return f"d={self.d}, r={self.r}, activation={self.activation}, scaling={self.scaling:g}"
