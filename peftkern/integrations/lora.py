"""peft LoRA layers through `peftkern.ops.lora.lora_linear`: patched by `peftkern.accelerate`, undone by `restore`.

Only instances are patched (class swap, see _swap.py); peft's parameters and state (adapters, scaling, dropout,
active/merged/disabled flags) stay the single source of truth, so save/load, merge, set_adapter and several
adapters keep working. Semantics follow peft 0.21's `lora.Linear.forward`:
    result = base_layer(x); for each active adapter a: result += lora_B[a](lora_A[a](dropout[a](x))) * scaling[a]
with x cast to the adapter dtype for the LoRA term and the result in the base output's dtype. The first active
adapter runs fused with the base GEMM, further ones with peft's own expression. Dropout uses each adapter's
`nn.Dropout.p` when training, from the op's seeded mask (same distribution as peft's, different draws).
Each call re-checks the fast path (cached per layer state, `_plan`); a fallback runs peft's forward (checks.py).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from .. import _backend
from ..ops import lora as _lora_ops
from . import _swap, checks
from . import dora as _dora
from .checks import FLOATS, base_kind, base_why_not, log_once, note_fallback, plain_forward, plain_weight

_FUSED = "FusedLoraLinear"  # the class accelerated peft lora.Linear instances get (integrations/_swap.py)
# Keyword arguments peft's forward pops and ignores for vanilla LoRA when they are None.
_NONE_KWARGS = ("adapter_names", "alora_offsets")


# ------------------------------------------------------------------------------------------------ checks


def _layer_why_not(layer, active: list[str]) -> str | None:
    """Why the fused path cannot serve this layer with these active adapters (input-independent), or None."""
    why = base_why_not(layer.base_layer)
    if why is not None:
        return why
    for a in active:
        if a in layer.lora_variant:  # DoRA is fused by dora.py; other variants fall back with its reason
            why = _dora.variant_why_not(layer, a, active)
            if why is not None:
                return why
    a = active[0]
    lora_a, lora_b = layer.lora_A[a], layer.lora_B[a]
    if not (isinstance(lora_a, nn.Linear) and plain_forward(lora_a, nn.Linear) and isinstance(lora_b, nn.Linear)
            and plain_forward(lora_b, nn.Linear)):
        return "lora_A/lora_B are not plain nn.Linear modules"
    if lora_a.bias is not None or (lora_b.bias is not None) != bool(layer.lora_bias.get(a, False)):
        return "unexpected bias on lora_A/lora_B"
    if not (plain_weight(lora_a.weight) and plain_weight(lora_b.weight)):
        return "adapter weights are not dense float tensors"
    if lora_a.weight.dtype != lora_b.weight.dtype:
        return "lora_A and lora_B have different dtypes"
    if lora_b.bias is not None and lora_b.bias.dtype != lora_b.weight.dtype:
        return "lora_B.bias dtype differs from lora_B.weight's"
    why = _shapes_why_not(layer.base_layer, lora_a, lora_b)
    if why is not None:
        return why
    drop = layer.lora_dropout[a]
    if type(drop) not in (nn.Dropout, nn.Identity) or (type(drop) is nn.Dropout and not 0.0 <= drop.p < 1.0):
        return f"dropout module {type(drop).__name__} (only nn.Dropout with p < 1 or nn.Identity)"
    s = layer.scaling[a]
    if isinstance(s, bool) or not isinstance(s, (int, float)):
        return f"scaling is a {type(s).__name__}, not a Python number"
    return None


def _shapes_why_not(base, lora_a, lora_b) -> str | None:
    """What the op checks of the weights on every call (shapes, one device, the base's dtype), checked once per
    layer state instead: the plan's key holds every weight's storage, dtype and shape."""
    w = base.weight
    out_f, in_f = (w.shape[1], w.shape[0]) if base_kind(base) == "conv1d" else w.shape
    r = lora_a.weight.shape[0]
    if lora_a.weight.shape[1] != in_f or lora_b.weight.shape != (out_f, r):
        return "lora_A/lora_B shapes do not match the base layer"
    for b in (base.bias, lora_b.bias):
        if b is not None and b.shape != (out_f,):
            return "a bias shape does not match the base layer's out_features"
    if base.bias is not None and base.bias.dtype != w.dtype:
        return "base bias dtype differs from the base weight's"
    tensors = (w, base.bias, lora_a.weight, lora_b.weight, lora_b.bias)
    if len({t.device for t in tensors if t is not None}) != 1:
        return "base weight and adapters are on different devices"
    return None


def _active(layer) -> list[str]:
    keys = layer._modules["lora_A"]._modules  # not layer.lora_A: nn.Module.__getattr__ is slow per call
    return [a for a in layer.active_adapters if a in keys]


# ------------------------------------------------------------------------------------------------ forward


def _state_key(layer) -> tuple:
    """Everything the input-independent checks read, as objects, ids and plain values: cheap to build per call,
    and different whenever the layer's state (adapters active/merged/disabled, modules, parameters, their dtypes
    and storage, hooks) changes. Storage (data_ptr) stands for device and shape: moving or reshaping a parameter
    in place (`.to()`, `.data =`) gives it new storage. The plan keeps the objects alive, so ids are not reused."""
    d = layer.__dict__
    mods = d["_modules"]
    base = mods["base_layer"]
    names = d["_active_adapter"]  # what layer.active_adapters reads, without its two property calls
    adapters = mods["lora_A"]._modules
    if names.__class__ is str:
        active = (names,) if names in adapters else ()
    elif len(names) == 1:  # the usual list of one (no generator per call)
        active = (names[0],) if names[0] in adapters else ()
    else:
        active = tuple(a for a in names if a in adapters)
    bp = base._parameters
    w, b = bp.get("weight"), bp.get("bias")
    head = (d["_disable_adapters"], len(d["merged_adapters"]), active, base, _hooked(base), len(d["lora_variant"]),
            id(w), None if w is None else w.data_ptr(), None if w is None else w.dtype, None if w is None else w.shape,
            _tensor_key(b))
    if not active:
        return head
    a0 = active[0]
    lora_a, lora_b = adapters[a0], mods["lora_B"]._modules[a0]
    ap, bp = lora_a._parameters, lora_b._parameters
    wa, wb = ap.get("weight"), bp.get("weight")
    return (head, lora_a, _hooked(lora_a), lora_b, _hooked(lora_b), len(ap), len(bp),
            id(wa), None if wa is None else wa.data_ptr(), None if wa is None else wa.dtype,
            None if wa is None else wa.shape, id(wb), None if wb is None else wb.data_ptr(),
            None if wb is None else wb.dtype, None if wb is None else wb.shape, _tensor_key(bp.get("bias")),
            mods["lora_dropout"]._modules[a0])


def _hooked(m) -> bool:
    d = m.__dict__  # hooked() without nn.Module's attribute lookups
    return bool(d["_forward_hooks"] or d["_forward_pre_hooks"] or d["_backward_hooks"] or d["_backward_pre_hooks"]
                or "forward" in d)


def _tensor_key(t):
    return None if t is None else (id(t), t.data_ptr(), t.dtype, t.shape)


class _Plan:
    """A layer's fused-path decision and the objects the fused call reads, valid while its key holds."""

    __slots__ = ("active", "base", "conv1d", "drop", "in_features", "key", "lora_a", "lora_b", "why")

    def __init__(self, layer, key):
        self.key = key
        self.why = _state_why_not_call(layer)
        self.active = _active(layer)
        if self.why is None:
            a0 = self.active[0]
            self.base = layer._modules["base_layer"]
            self.conv1d = base_kind(self.base) == "conv1d"
            self.lora_a, self.lora_b = layer.lora_A[a0], layer.lora_B[a0]
            self.drop = layer.lora_dropout[a0]
            self.in_features = self.lora_a.weight.shape[1]


# layer -> its projection group (candidates or formed; lora_group.py fills it, lora.py only reads it)
groups: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_plans: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # layer -> _Plan (not in the instance dict:
# it must not travel with pickles and deepcopies)


def _plan(layer, compiling: bool | None = None) -> _Plan:
    if torch.compiler.is_compiling() if compiling is None else compiling:
        return _Plan(layer, None)  # dynamo's guards do this job (and torch 2.11's cannot trace id())
    key = _state_key(layer)
    plan = _plans.get(layer)
    if plan is None or plan.key != key:
        plan = _plans[layer] = _Plan(layer, key)
    return plan


def _state_why_not_call(layer) -> str | None:
    """state_why_not as the forward reads it: "" when peft's forward is only the base layer."""
    if layer.disable_adapters or layer.merged:
        return ""
    active = _active(layer)
    return _layer_why_not(layer, active) if active else ""


def _input_why_not(plan: _Plan, layer, x, args, kwargs, compute_dtype) -> str | None:
    """Why this call (its arguments, input dtype and device, autocast to `compute_dtype`) cannot take the fused path."""
    if args:
        return "extra positional arguments to the LoRA layer"
    for k, v in kwargs.items():
        if v is not None or k not in _NONE_KWARGS:
            return "adapter_names (mixed-adapter batch)" if k == "adapter_names" else f"keyword argument {k!r}"
    if plan.why is not None:
        return plan.why
    w = plan.base._parameters["weight"]
    if not isinstance(x, torch.Tensor) or x.dtype not in FLOATS or x.dim() < 1:
        return "input is not a float tensor"
    if x.shape[-1] != plan.in_features:
        return f"input has {x.shape[-1]} features, the layer takes {plan.in_features}"
    if x.device != w.device:  # the plan has checked that the adapters are on the base weight's device
        return "input, base weight and adapters are on different devices"
    if compute_dtype is not None:
        return None if compute_dtype in FLOATS else "autocast to an unsupported dtype"
    if x.dtype != w.dtype:
        return f"input dtype {x.dtype} differs from the base weight's {w.dtype}"
    if x.dtype != plan.lora_a._parameters["weight"].dtype and not getattr(layer, "cast_input_dtype_enabled", True):
        return "input dtype casting disabled (peft.helpers.disable_input_dtype_casting)"
    s = layer.scaling[plan.active[0]]
    if isinstance(s, bool) or not isinstance(s, (int, float)):
        return f"scaling is a {type(s).__name__}, not a Python number"
    drop = plan.drop  # its p is read per call (a user may set it), so checked per call
    if type(drop) is nn.Dropout and drop.training and not 0.0 <= drop.p < 1.0:
        return f"dropout probability {drop.p!r} (the op takes p in [0, 1))"
    return None


def _why_not(layer, x, args, kwargs) -> str | None:
    """None: take the fused path. "": peft's forward is only the base layer (adapters disabled / merged / none
    active here), nothing to fuse. Otherwise the reason the fused path cannot take this call."""
    compute_dtype = _backend.autocast_dtype(x.device.type) if isinstance(x, torch.Tensor) else None
    return _input_why_not(_plan(layer), layer, x, args, kwargs, compute_dtype)


def _fused_forward(self, x, *args, **kwargs):
    """Replaces a peft `lora.Linear` instance's forward; see the module docstring for the semantics."""
    compiling = torch.compiler.is_compiling()
    group = None if compiling else groups.get(self)
    if group is not None:
        y = group.call(self, x, args, kwargs)  # its projection group's output for x (lora_group.py), or None
        if y is not None:
            return y
    plan = _plan(self, compiling)
    compute_dtype = None  # autocast's dtype; one call when autocast is off (the eager case), as autocast_dtype does
    if isinstance(x, torch.Tensor) and (compiling or torch._C._is_any_autocast_enabled()):
        compute_dtype = _backend.autocast_dtype(x.device.type)
    why = _input_why_not(plan, self, x, args, kwargs, compute_dtype)
    if why is not None:
        if why:
            note_fallback(why, "LoRA")
        return _swap.base_class(self).forward(self, x, *args, **kwargs)
    if plan.active[0] in self.lora_variant:  # DoRA, the one variant _layer_why_not lets through (dora.py)
        return _dora.forward(self, plan, x, compute_dtype)
    x_in, spec = _operands(plan, self, x, compute_dtype)
    if compute_dtype is not None:
        with torch.autocast(x.device.type, enabled=False):  # the operands are cast already: no recast inside
            y = _lora_ops.lora_linear_checked(x_in, *spec)
    else:
        y = _lora_ops.lora_linear_checked(x_in, *spec)
    active = plan.active
    if len(active) > 1:
        _note_extra_adapters()
        result_dtype = y.dtype
        for a in active[1:]:  # peft's own expression for the 2nd.. active adapters
            x = self._cast_input_dtype(x, self.lora_A[a].weight.dtype)
            y = y + self.lora_B[a](self.lora_A[a](self.lora_dropout[a](x))) * self.scaling[a]
        y = y.to(result_dtype)
    return y


def _operands(plan: _Plan, layer, x, compute_dtype):
    """(x, (weight, bias, lora_A, lora_B, scaling, dropout_p)) as the fused op takes them for this layer's first
    active adapter. Under autocast to `compute_dtype`, every operand is cast as autocast casts peft's linears."""
    params = plan.base._parameters
    w, b = params["weight"], params["bias"]
    if plan.conv1d:
        w = w.t()  # Conv1D stores (in, out): pass the (out, in) view; the op reads weights by strides
    lora_a, lora_b = plan.lora_a._parameters["weight"], plan.lora_b._parameters["weight"]
    s = float(layer.scaling[plan.active[0]])
    drop = plan.drop
    p = float(drop.p) if drop.training and type(drop) is nn.Dropout else 0.0
    lb = plan.lora_b._parameters.get("bias")  # lora_bias=True: s * b_B folds into the base bias of the fused GEMM
    if compute_dtype is None:
        return x, (w, _fold_bias(b, lb, s, w.dtype), lora_a, lora_b, s, p)
    x, w, lora_a, lora_b = x.to(compute_dtype), w.to(compute_dtype), lora_a.to(compute_dtype), lora_b.to(compute_dtype)
    b = None if b is None else b.to(compute_dtype)
    lb = None if lb is None else lb.to(compute_dtype)
    return x, (w, _fold_bias(b, lb, s, compute_dtype), lora_a, lora_b, s, p)


def _fold_bias(b, lb, s, dtype):
    if lb is None:
        return b
    extra = (lb * s).to(dtype)
    return extra if b is None else b + extra


def _note_extra_adapters() -> None:
    log_once("several active adapters",
             "peftkern: several active adapters: the first runs fused, the others with peft's expression")


# ------------------------------------------------------------------------------------------------ public API


def layers(model: nn.Module) -> list:
    """The peft LoRA layers of `model` (any `LoraLayer`; only `lora.Linear` itself is patchable)."""
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def patchable(mod) -> str | None:
    """Why `mod` cannot be patched (see checks.patchable), or None."""
    from peft.tuners.lora import Linear

    return checks.patchable(mod, Linear, "LoRA")


def patch(mod) -> None:
    if not _swap.is_swapped(mod):
        _swap.swap(mod, _FUSED)


def unpatch(mod) -> bool:
    return _swap.unswap(mod)


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
    """The backend the layer's fused calls run on for its device, as the op would choose it now (the use_backend
    request and PEFTKERN_BACKEND at this moment); "cuda decode (M <= 16, inference), else triton" for an explicit
    cuda request, whose decode kernel depends on the call."""
    plan = _plan(layer)
    w = plan.base._parameters["weight"]
    try:
        fwd, bwd = _lora_ops._backends(w.device, plan.lora_a._parameters["weight"].shape[0])
    except _backend.BackendUnavailable as e:
        return f"unavailable ({e})"
    if not fwd:
        return f"cuda decode (M <= {_lora_ops.CUDA_DECODE_MAX_M}, inference), else {bwd}"
    return fwd if fwd == bwd else f"{fwd} forward, {bwd} backward"


def is_accelerated(module: nn.Module) -> bool:
    """True when `module` (a LoRA layer) has been patched by `accelerate`."""
    return _swap.is_swapped(module, _FUSED)


def _fused_lora_class():
    from peft.tuners.lora import Linear

    return Linear, {"forward": _fused_forward}


_swap.register(_FUSED, _fused_lora_class)
