"""peft LoRA layers on bitsandbytes 4-bit bases (QLoRA) through `peftkern.ops.lora_4bit` and on 8-bit bases
(Linear8bitLt) through `peftkern.ops.lora_8bit`: patched by `peftkern.accelerate`, undone by `restore` (class swap,
_swap.py), as lora.py does for `lora.Linear`.

Taken: peft's `lora.bnb.Linear4bit` / `lora.bnb.Linear8bitLt` (what peft makes for a model loaded in 4 / 8 bit) and
a plain `lora.Linear` whose base is a `bnb.nn.Linear4bit` / `bnb.nn.Linear8bitLt`. 4-bit: NF4 and FP4, with or
without double quantisation, any compute dtype. 8-bit: quantised weights (has_fp16_weights=False, CB / SCB set).
Semantics follow peft 0.21's bnb forwards for vanilla LoRA:
    result = base_layer(x)  (4-bit: x cast to the compute dtype, x deq(W)ᵀ + b there, cast back to x's dtype;
                             8-bit: in x's own dtype)
    for each active adapter a: result += (lora_B[a](lora_A[a](dropout[a](x))) * scaling[a]).to(result.dtype)
The first active adapter runs fused (the frozen weight is dequantised per call into a temporary, ops/_dequant.py);
further ones with peft's own expression. 4-bit: fused when x already has the compute dtype, or under autocast to the
compute dtype (or over an fp32 compute dtype: operands cast as autocast casts them). 8-bit: fused for any float x,
and under autocast when x is fp32 or autocast's dtype (bitsandbytes' weight then reaches autocast's dtype in one
rounding). Otherwise (e.g. fp32 hidden states into a bf16-compute 4-bit layer without autocast, DoRA on a quantised
base, an 8-bit base keeping fp16 weights or not quantised yet) peft's forward runs and the reason is logged
(checks.note_fallback).

Numerics on 8-bit bases: the fused result is x·deq(W)ᵀ + b + LoRA, deq(W) = CB·SCB/127 as bitsandbytes' dequantising
matmul computes it (MatMul8bitFp). That is peft's own result in training mode on CPU/XPU, where bitsandbytes runs
that matmul. bitsandbytes' int8 inference matmul (MatMul8bitLt: every call on CUDA, and eval on CPU) quantises the
activations row-wise to int8 (outlier columns above `threshold` in fp16) first; there peftkern's result is the
unquantised-activation one, not peft's bits (the gradient dx = dy·deq(W) is the same formula in both). The base
bias is cast to x's dtype per call; bitsandbytes casts the module's bias in place, peftkern leaves it as it is.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from .. import _backend
from ..ops import lora as _lora_ops
from ..ops import lora_4bit as _ops
from ..ops import lora_8bit as _ops8
from . import _swap
from .checks import FLOATS, note_fallback, plain_forward, plain_weight

_FUSED_BNB = "FusedLora4bit"  # peft's lora.bnb.Linear4bit, accelerated
_FUSED_LIN = "FusedLoraLinearOn4bit"  # peft's lora.Linear wrapping a bnb Linear4bit, accelerated
_FUSED_BNB8 = "FusedLora8bit"  # peft's lora.bnb.Linear8bitLt, accelerated
_FUSED_LIN8 = "FusedLoraLinearOn8bit"  # peft's lora.Linear wrapping a bnb Linear8bitLt, accelerated
_NAMES = {"4bit": (_FUSED_LIN, _FUSED_BNB), "8bit": (_FUSED_LIN8, _FUSED_BNB8)}  # (on lora.Linear, on peft's bnb)


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


def _a(kind: str) -> str:
    return "a 4-bit" if kind == "4bit" else "an 8-bit"


def handles(mod) -> bool:
    """True for a peft LoRA layer on a bitsandbytes base (this module decides about it, not lora.py)."""
    return _bnb_base(mod) is not None


def _peft_classes(kind: str = "4bit") -> tuple:
    """(peft's lora.Linear, peft's LoRA layer for a `kind` bitsandbytes base: lora.bnb.Linear4bit / Linear8bitLt)."""
    from peft.tuners.lora import Linear
    from peft.tuners.lora import bnb as peft_bnb

    return Linear, getattr(peft_bnb, "Linear4bit" if kind == "4bit" else "Linear8bitLt", None)


def patchable(mod) -> str | None:
    if _swap.is_swapped(mod):
        return None
    kind = _bnb_base(mod)
    linear, lin_bnb = _peft_classes(kind)
    if type(mod) not in (linear, lin_bnb):
        peft_name = "Linear4bit" if kind == "4bit" else "Linear8bitLt"
        return (f"{type(mod).__name__} LoRA layer on {_a(kind)} base (only peft's lora.bnb.{peft_name} / "
                "lora.Linear)")
    if "forward" in mod.__dict__:
        return "forward already replaced by another library (e.g. accelerate hooks)"
    return None


def patch(mod) -> None:
    if not _swap.is_swapped(mod):
        on_linear, on_bnb = _NAMES[_bnb_base(mod)]
        _swap.swap(mod, on_linear if type(mod) is _peft_classes()[0] else on_bnb)


def unpatch(mod) -> bool:
    return _swap.unswap(mod)


def is_accelerated(mod) -> bool:
    return any(_swap.is_swapped(mod, name) for names in _NAMES.values() for name in names)


def _active(layer) -> list[str]:
    return [a for a in layer.active_adapters if a in layer.lora_A]


def int8_weight(base) -> tuple:
    """(CB, SCB) of a bnb Linear8bitLt as its forward reads them: the weight's until its first call moves them to
    `state` (init_8bit_state), then the state's. (None, None) when not quantised."""
    w = base.weight
    if getattr(w, "CB", None) is not None:
        return w.CB, getattr(w, "SCB", None)
    st = getattr(base, "state", None)
    return getattr(st, "CB", None), getattr(st, "SCB", None)


def _base_why_not_8bit(base) -> str | None:
    bnb = _bnb()
    if not plain_forward(base, bnb.nn.Linear8bitLt):
        return f"8-bit base {type(base).__name__} (its forward is hooked/overridden)"
    if getattr(base.state, "has_fp16_weights", False) or getattr(base.weight, "has_fp16_weights", False):
        return "8-bit base with has_fp16_weights=True (a float weight bitsandbytes quantises on the fly)"
    cb, scb = int8_weight(base)
    if cb is None or scb is None:
        return "8-bit base weight has no CB/SCB (not quantised yet: move it to a device first)"
    if not (isinstance(cb, torch.Tensor) and isinstance(scb, torch.Tensor)):
        return "8-bit CB/SCB are not tensors"
    if cb.dtype != torch.int8 or scb.dtype != torch.float32:
        return f"8-bit weight stored as {cb.dtype} with {scb.dtype} scales (int8 with float32 scales are fused)"
    if tuple(cb.shape) != (base.out_features, base.in_features) or tuple(scb.shape) != (base.out_features,):
        return "8-bit CB/SCB shapes do not match the layer"
    if cb.device != scb.device or cb.device != base.weight.device:
        return "8-bit CB/SCB are on different devices"
    if base.bias is not None and not plain_weight(base.bias):
        return "base bias is not a dense float tensor"
    return None


def _base_why_not(base) -> str | None:
    bnb = _bnb()
    if isinstance(base, bnb.nn.Linear8bitLt):
        return _base_why_not_8bit(base)
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
        return f"LoRA variant {type(layer.lora_variant[a]).__name__} on {_a(_bnb_base(layer))} base"
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
    kind = _bnb_base(layer)
    try:
        deq = (_ops if kind == "4bit" else _ops8).dequant_backend(w.device)
        fwd, bwd = _lora_ops._backends(w.device, layer.lora_A[_active(layer)[0]].weight.shape[0])
    except (_backend.BackendUnavailable, IndexError) as e:
        return f"unavailable ({e})"
    gemm = fwd if fwd == bwd else f"{fwd} forward, {bwd} backward"
    return f"{deq} {kind[0]}-bit dequant + {gemm or 'cuda decode / triton'}"


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
    ac = _backend.autocast_dtype(x.device.type)
    if ac is not None and ac not in FLOATS:
        return "autocast to an unsupported dtype"
    if _bnb_base(layer) == "8bit":  # bnb computes in x's dtype (W = CB·SCB/127 rounded to it, bias cast to it)
        if ac is not None and x.dtype not in (ac, torch.float32):  # bnb: W rounded to x's dtype, then to ac
            return f"{x.dtype} input under autocast to {ac} on an 8-bit layer"
    else:
        cd = _compute_dtype(base, x)
        if ac is not None:
            if cd not in (ac, torch.float32):  # bnb rounds x and W to cd, then autocast to ac: one rounding if so
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


def _fused_forward_4bit(self, x, *args, **kwargs):
    """Replaces the forward of a peft LoRA layer on a 4-bit base; see the module docstring for the semantics."""
    return _fused_forward(self, "4bit", x, args, kwargs)


def _fused_forward_8bit(self, x, *args, **kwargs):
    """Replaces the forward of a peft LoRA layer on an 8-bit base; see the module docstring for the semantics."""
    return _fused_forward(self, "8bit", x, args, kwargs)


def _fused_forward(self, kind, x, args, kwargs):
    why = _why_not_call(self, x, args, kwargs)
    if why is not None:
        if why:
            note_fallback(why, "QLoRA" if kind == "4bit" else "LoRA-on-8-bit")
        return _swap.base_class(self).forward(self, x, *args, **kwargs)
    active = _active(self)
    a0 = active[0]
    base = self.base_layer
    if kind == "4bit":
        _bnb().nn.modules.fix_4bit_weight_quant_state_from_module(base)  # what bnb's forward does first
        w = base.weight

        def op(x, b, a, bb, s, p):  # the module attribute is read per call (tests count the calls)
            return _ops.lora_linear_4bit(x, w, w.quant_state, b, a, bb, s, p)
    else:
        cb, scb = int8_weight(base)

        def op(x, b, a, bb, s, p):
            return _ops8.lora_linear_8bit(x, cb, scb, b, a, bb, s, p)
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
        y = op(x, b, lora_a.weight, lora_b.weight, s, p)
    else:  # every operand cast as autocast casts peft's linears, then no recast inside
        with torch.autocast(x.device.type, enabled=False):
            y = op(x.to(ac), b, lora_a.weight.to(ac), lora_b.weight.to(ac), s, p)
        y = y.to(torch.promote_types(x.dtype, ac))  # peft: base output cast back to x's dtype + the LoRA term
    if len(active) > 1:
        result_dtype = y.dtype
        for a in active[1:]:  # peft's own expression for the 2nd.. active adapters
            if ac is None:
                x = self._cast_input_dtype(x, self.lora_A[a].weight.dtype)
            out = self.lora_B[a](self.lora_A[a](self.lora_dropout[a](x))) * self.scaling[a]
            y = y + (out.to(result_dtype) if ac is None else out)
    return y


def _factory(kind: str, on_bnb: bool):
    forward = _fused_forward_4bit if kind == "4bit" else _fused_forward_8bit

    def factory():
        linear, lin_bnb = _peft_classes(kind)
        return (lin_bnb if on_bnb else linear), {"forward": forward}

    return factory


for _kind, (_on_linear, _on_bnb) in _NAMES.items():
    _swap.register(_on_linear, _factory(_kind, False))
    _swap.register(_on_bnb, _factory(_kind, True))
