"""peft LoRA layers on bitsandbytes 4-bit bases (QLoRA) through `peftkern.ops.lora_4bit`: patched by
`peftkern.accelerate`, undone by `restore` (class swap, _swap.py), as lora.py does for `lora.Linear`.

Taken: peft's `lora.bnb.Linear4bit` (what peft makes for a model loaded in 4 bit) and a plain `lora.Linear` whose
base is a `bnb.nn.Linear4bit`; NF4 and FP4, with or without double quantisation, any compute dtype. Semantics
follow peft 0.21's bnb forward for vanilla LoRA:
    result = base_layer(x)  (x cast to the compute dtype, x deq(W)ᵀ + b there, cast back to x's dtype)
    for each active adapter a: result += (lora_B[a](lora_A[a](dropout[a](x))) * scaling[a]).to(result.dtype)
The first active adapter runs fused (the frozen weight is dequantised per call into a temporary, ops/lora_4bit.py);
further ones with peft's own expression. Fused when x already has the compute dtype, or under autocast to the compute
dtype (or over an fp32 compute dtype: operands cast as autocast casts them); otherwise (e.g. fp32 hidden states
into a bf16-compute layer without autocast, DoRA on a 4-bit base, 8-bit bases) peft's forward runs and the reason
is logged (checks.note_fallback).
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from .. import _backend
from ..ops import lora as _lora_ops
from ..ops import lora_4bit as _ops
from . import _swap
from .checks import FLOATS, note_fallback, plain_forward, plain_weight

_FUSED_BNB = "FusedLora4bit"  # peft's lora.bnb.Linear4bit, accelerated
_FUSED_LIN = "FusedLoraLinearOn4bit"  # peft's lora.Linear wrapping a bnb Linear4bit, accelerated


def _bnb():
    return sys.modules.get("bitsandbytes")  # a model with bnb layers has imported it; never import it here


def _bnb_base(mod):
    """"4bit", "8bit" or None: the bitsandbytes kind of a LoRA layer's base layer."""
    bnb = _bnb()
    if bnb is None:
        return None
    base = mod.get_base_layer() if hasattr(mod, "get_base_layer") else None
    if isinstance(base, bnb.nn.Linear4bit):
        return "4bit"
    if isinstance(base, bnb.nn.Linear8bitLt):
        return "8bit"
    return None


def handles(mod) -> bool:
    """True for a peft LoRA layer on a bitsandbytes base (this module decides about it, not lora.py)."""
    return _bnb_base(mod) is not None


def _peft_classes() -> tuple:
    from peft.tuners.lora import Linear
    from peft.tuners.lora import bnb as peft_bnb

    return Linear, getattr(peft_bnb, "Linear4bit", None)


def patchable(mod) -> str | None:
    if _swap.is_swapped(mod):
        return None
    if _bnb_base(mod) == "8bit":
        return "bitsandbytes 8-bit base (Linear8bitLt): not fused yet (peft's forward runs)"
    linear, lin4 = _peft_classes()
    if type(mod) not in (linear, lin4):
        return f"{type(mod).__name__} LoRA layer on a 4-bit base (only peft's lora.bnb.Linear4bit / lora.Linear)"
    if "forward" in mod.__dict__:
        return "forward already replaced by another library (e.g. accelerate hooks)"
    return None


def patch(mod) -> None:
    if not _swap.is_swapped(mod):
        linear, _ = _peft_classes()
        _swap.swap(mod, _FUSED_LIN if type(mod) is linear else _FUSED_BNB)


def unpatch(mod) -> bool:
    return _swap.unswap(mod)


def is_accelerated(mod) -> bool:
    return _swap.is_swapped(mod, _FUSED_BNB) or _swap.is_swapped(mod, _FUSED_LIN)


def _active(layer) -> list[str]:
    return [a for a in layer.active_adapters if a in layer.lora_A]


def _base_why_not(base) -> str | None:
    bnb = _bnb()
    if not plain_forward(base, bnb.nn.Linear4bit):
        return f"4-bit base {type(base).__name__} (its forward is hooked/overridden)"
    w = base.weight
    qs = getattr(w, "quant_state", None)
    if qs is None:
        return "4-bit base weight has no quant_state (not quantised yet: move it to a device first)"
    if getattr(qs, "packing_format_for_cpu", False):
        return "4-bit weight repacked by bitsandbytes for CPU inference (packing_format_for_cpu)"
    if qs.quant_type not in ("nf4", "fp4") or qs.code is None or qs.code.numel() != 16:
        return f"4-bit quant_type {qs.quant_type!r} (nf4 and fp4 are fused)"
    if qs.dtype not in FLOATS:
        return f"4-bit weight quantised from {qs.dtype}"
    if qs.nested and (qs.state2 is None or qs.state2.code.numel() != 256):
        return "unexpected double-quantisation state"
    if base.bias is not None and not plain_weight(base.bias):
        return "base bias is not a dense float tensor"
    if tuple(qs.shape) != (base.out_features, base.in_features):
        return "4-bit quant_state shape does not match the layer"
    return None


def _layer_why_not(layer, active: list[str]) -> str | None:
    why = _base_why_not(layer.base_layer)
    if why is not None:
        return why
    a = active[0]
    if a in layer.lora_variant:
        return f"LoRA variant {type(layer.lora_variant[a]).__name__} on a 4-bit base"
    lora_a, lora_b = layer.lora_A[a], layer.lora_B[a]
    if not (isinstance(lora_a, nn.Linear) and plain_forward(lora_a, nn.Linear) and isinstance(lora_b, nn.Linear)
            and plain_forward(lora_b, nn.Linear)):
        return "lora_A/lora_B are not plain nn.Linear modules"
    if lora_a.bias is not None or (lora_b.bias is not None) != bool(layer.lora_bias.get(a, False)):
        return "unexpected bias on lora_A/lora_B"
    if not (plain_weight(lora_a.weight) and plain_weight(lora_b.weight)):
        return "adapter weights are not dense float tensors"
    if lora_a.weight.dtype != lora_b.weight.dtype or (lora_b.bias is not None
                                                      and lora_b.bias.dtype != lora_b.weight.dtype):
        return "lora_A and lora_B have different dtypes"
    base = layer.base_layer
    r = lora_a.weight.shape[0]
    if lora_a.weight.shape != (r, base.in_features) or lora_b.weight.shape != (base.out_features, r):
        return "lora_A/lora_B shapes do not match the base layer"
    devs = {t.device for t in (base.weight, base.bias, lora_a.weight, lora_b.weight) if t is not None}
    if len(devs) != 1:
        return "base weight and adapters are on different devices"
    drop = layer.lora_dropout[a]
    if type(drop) not in (nn.Dropout, nn.Identity) or (type(drop) is nn.Dropout and not 0.0 <= drop.p < 1.0):
        return f"dropout module {type(drop).__name__} (only nn.Dropout with p < 1 or nn.Identity)"
    s = layer.scaling[a]
    if isinstance(s, bool) or not isinstance(s, (int, float)):
        return f"scaling is a {type(s).__name__}, not a Python number"
    return None


def state_why_not(layer) -> str | None:
    """Why a patched layer does not take the fused path in its current state (for the summary), or None."""
    if layer.disable_adapters:
        return "adapters disabled"
    if layer.merged:
        return "merged into the base weight"
    active = _active(layer)
    if not active:
        return "no active adapter in this layer"
    return _layer_why_not(layer, active)


def backend_of(layer) -> str:
    """The backends the layer's fused calls run on now: the dequantisation's and the LoRA GEMM's."""
    w = layer.base_layer.weight
    try:
        deq = _ops.dequant_backend(w.device)
        fwd, bwd = _lora_ops._backends(w.device, layer.lora_A[_active(layer)[0]].weight.shape[0])
    except (_backend.BackendUnavailable, IndexError) as e:
        return f"unavailable ({e})"
    gemm = fwd if fwd == bwd else f"{fwd} forward, {bwd} backward"
    return f"{deq} 4-bit dequant + {gemm or 'cuda decode / triton'}"


def _compute_dtype(base, x):
    """The dtype bitsandbytes' Linear4bit computes in for input x (fixed by its first call, as bnb does)."""
    if not base.compute_type_is_set:
        base.set_compute_type(x)
        base.compute_type_is_set = True
    return base.compute_dtype if base.compute_dtype is not None else x.dtype


def _why_not_call(layer, x, args, kwargs) -> str | None:
    if args:
        return "extra positional arguments to the LoRA layer"
    for k, v in kwargs.items():
        if v is not None or k not in ("adapter_names", "alora_offsets"):
            return "adapter_names (mixed-adapter batch)" if k == "adapter_names" else f"keyword argument {k!r}"
    if layer.disable_adapters or layer.merged or not _active(layer):
        return ""
    why = _layer_why_not(layer, _active(layer))
    if why is not None:
        return why
    if not isinstance(x, torch.Tensor) or x.dtype not in FLOATS or x.dim() < 1:
        return "input is not a float tensor"
    base = layer.base_layer
    if x.shape[-1] != base.in_features:
        return f"input has {x.shape[-1]} features, the layer takes {base.in_features}"
    if x.device != base.weight.device:
        return "input, base weight and adapters are on different devices"
    cd = _compute_dtype(base, x)
    ac = _backend.autocast_dtype(x.device.type)
    if ac is not None:
        if ac not in FLOATS:
            return "autocast to an unsupported dtype"
        if cd not in (ac, torch.float32):  # bnb rounds x and W to cd, then autocast to ac: one rounding only if so
            return f"autocast to {ac} on a 4-bit layer computing in {cd}"
    elif x.dtype != cd:
        return f"input dtype {x.dtype} differs from the 4-bit layer's compute dtype {cd}"
    a0 = _active(layer)[0]
    if x.dtype != layer.lora_A[a0].weight.dtype and not getattr(layer, "cast_input_dtype_enabled", True):
        return "input dtype casting disabled (peft.helpers.disable_input_dtype_casting)"
    drop = layer.lora_dropout[a0]
    if type(drop) is nn.Dropout and drop.training and not 0.0 <= drop.p < 1.0:
        return f"dropout probability {drop.p!r} (the op takes p in [0, 1))"
    return None


def _fused_forward(self, x, *args, **kwargs):
    """Replaces the forward of a peft LoRA layer on a 4-bit base; see the module docstring for the semantics."""
    why = _why_not_call(self, x, args, kwargs)
    if why is not None:
        if why:
            note_fallback(why, "QLoRA")
        return _swap.base_class(self).forward(self, x, *args, **kwargs)
    active = _active(self)
    a0 = active[0]
    base = self.base_layer
    bnb = _bnb()
    bnb.nn.modules.fix_4bit_weight_quant_state_from_module(base)  # what bnb's forward does first
    w = base.weight
    lora_a, lora_b = self.lora_A[a0], self.lora_B[a0]
    s = float(self.scaling[a0])
    drop = self.lora_dropout[a0]
    p = float(drop.p) if drop.training and type(drop) is nn.Dropout else 0.0
    ac = _backend.autocast_dtype(x.device.type)
    dt = x.dtype if ac is None else ac  # the op's dtype: x's (= the compute dtype), or autocast's
    b = None if base.bias is None else base.bias.to(dt)
    lb = lora_b.bias  # lora_bias=True: s * b_B folds into the base bias
    if lb is not None:
        extra = (lb * s).to(dt)
        b = extra if b is None else b + extra
    if ac is None:
        y = _ops.lora_linear_4bit(x, w, w.quant_state, b, lora_a.weight, lora_b.weight, s, p)
    else:  # every operand cast as autocast casts peft's linears, then no recast inside
        with torch.autocast(x.device.type, enabled=False):
            y = _ops.lora_linear_4bit(x.to(ac), w, w.quant_state, b, lora_a.weight.to(ac), lora_b.weight.to(ac),
                                      s, p)
        y = y.to(torch.promote_types(x.dtype, ac))  # peft: base output cast back to x's dtype + the LoRA term
    if len(active) > 1:
        result_dtype = y.dtype
        for a in active[1:]:  # peft's own expression for the 2nd.. active adapters
            if ac is None:
                x = self._cast_input_dtype(x, self.lora_A[a].weight.dtype)
            out = self.lora_B[a](self.lora_A[a](self.lora_dropout[a](x))) * self.scaling[a]
            y = y + (out.to(result_dtype) if ac is None else out)
    return y


def _fused_bnb_class():
    _, lin4 = _peft_classes()
    return lin4, {"forward": _fused_forward}


def _fused_lin_class():
    linear, _ = _peft_classes()
    return linear, {"forward": _fused_forward}


_swap.register(_FUSED_BNB, _fused_bnb_class)
_swap.register(_FUSED_LIN, _fused_lin_class)
