"""peft DoRA layers (`use_dora=True`) through `peftkern.ops.dora.dora_linear`.

A peft `lora.Linear` whose one active adapter has a `DoraLinearVariant` is patched like any LoRA layer
(integrations/lora.py); lora.py asks `variant_why_not` whether its fused path may take the variant and hands such
calls to `forward`. Semantics follow peft 0.21's `DoraLinearVariant.forward` / `DoraLinearLayer.forward`:
    n = ||W + s·B A||_row (detached), g = m / n
    peft's "no dropout" branch (dropout is nn.Identity, or the layer is in eval):  y = g ⊙ (x Wᵀ + s·x Aᵀ Bᵀ) + b
    its dropout branch (training):                     y = x Wᵀ + b + (g - 1) ⊙ x_d Wᵀ + g ⊙ s·x_d Aᵀ Bᵀ
Note peft reads the layer's `training` flag there, not the dropout module's: an eval layer has no dropout at all.
The norm comes from ||W||² cached per frozen base weight (ops.dora.weight_sq_norm) plus r-sized products.
Under autocast the operands are cast as autocast casts peft's linears (the magnitude and norm in fp32).
Falls back to peft (with the reason) for: several active adapters, any other variant, lora_bias.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops import dora as _dora_ops
from .checks import base_kind


def variant_why_not(layer, adapter: str, active: list[str]) -> str | None:
    """None when the fused path takes `adapter`'s variant (DoRA on an nn.Linear / Conv1D base, the only active
    adapter), else why not."""
    from peft.tuners.lora.dora import DoraLinearLayer
    from peft.tuners.lora.variants import DoraLinearVariant

    variant = layer.lora_variant[adapter]
    if type(variant) is not DoraLinearVariant and variant is not DoraLinearVariant:
        return f"LoRA variant {_name(variant)} (aLoRA, ...: only DoRA is fused)"
    if len(active) != 1:
        return "DoRA with several active adapters"
    if base_kind(layer.base_layer) not in ("linear", "conv1d"):
        return "DoRA on a base other than nn.Linear / Conv1D"
    mag = layer.lora_magnitude_vector._modules.get(adapter)  # an nn.ModuleDict
    if type(mag) is not DoraLinearLayer or type(mag.weight) is not nn.Parameter or mag.weight.dim() != 1:
        return "DoRA magnitude is not peft's DoraLinearLayer with a (out,) weight"
    w = layer.base_layer.weight
    out_f = w.shape[1] if base_kind(layer.base_layer) == "conv1d" else w.shape[0]
    if mag.weight.shape[0] != out_f or mag.weight.device != w.device:
        return "DoRA magnitude shape or device does not match the base layer"
    if layer.lora_bias.get(adapter, False):
        return "DoRA with lora_bias"
    return None


def _name(variant) -> str:
    return variant.__name__ if isinstance(variant, type) else type(variant).__name__


def forward(layer, plan, x, compute_dtype):
    """The DoRA layer's output for x (lora.py has checked the layer state and x as for a LoRA call). Under autocast
    to `compute_dtype` x, W, b, A and B are cast as autocast casts peft's linears and the op runs with autocast
    off; the magnitude and the norm stay fp32 (peft's norm is an fp32 autocast op)."""
    if compute_dtype is not None:
        with torch.autocast(x.device.type, enabled=False):
            return _forward(layer, plan, x, compute_dtype)
    return _forward(layer, plan, x, None)


def _forward(layer, plan, x, compute_dtype):
    a = plan.active[0]
    w = plan.base._parameters["weight"]
    b = plan.base._parameters["bias"]
    sq = _dora_ops.weight_sq_norm(w, transposed=plan.conv1d)
    if plan.conv1d:
        w = w.t()  # Conv1D stores (in, out): the (out, in) view
    lora_a, lora_b = plan.lora_a._parameters["weight"], plan.lora_b._parameters["weight"]
    s = float(layer.scaling[a])
    drop = plan.drop
    # peft's DoRA takes its dropout branch when the LAYER is training and the dropout is not nn.Identity.
    p = float(drop.p) if layer.training and drop.training and type(drop) is nn.Dropout else 0.0
    magnitude = layer.lora_magnitude_vector[a].weight
    if compute_dtype is not None:
        # The norm from the weights as they are, in fp32 (peft's runs in fp32 too, on B·A from an autocast matmul).
        norm = _dora_ops.dora_weight_norm(w, lora_a, lora_b, s, sq)
        x, w, lora_a, lora_b = (t.to(compute_dtype) for t in (x, w, lora_a, lora_b))
        b = None if b is None else b.to(compute_dtype)
        return _dora_ops.dora_linear(x, w, b, lora_a, lora_b, magnitude, s, p, weight_norm=norm)
    return _dora_ops.dora_linear(x, w, b, lora_a, lora_b, magnitude, s, p, weight_sq_norm=sq)
