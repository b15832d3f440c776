"""Drop-in acceleration of peft LoRA models: `accelerate(model)` routes peft's `lora.Linear` layers through
`peftkern.ops.lora.lora_linear`, in place; `restore(model)` undoes it.

Only instances are patched (their class swapped for a subclass whose forward is peftkern's, see _swap.py),
never peft's classes, and peft's own parameters and
state (`lora_A`, `lora_B`, `scaling`, `lora_dropout`, active adapters, merged flags) stay the single source
of truth, so `save_pretrained`, `from_pretrained`, `merge_and_unload`, `disable_adapter()`, `set_adapter` and
multiple adapters keep working. Every call re-checks the fast path's preconditions and otherwise runs peft's
own forward; such a fallback is logged once per reason (logger "peftkern") and raises under PEFTKERN_STRICT=1.

Semantics follow peft 0.21's `lora.Linear.forward`:
    result = base_layer(x); for each active adapter a: result += lora_B[a](lora_A[a](dropout[a](x))) * scaling[a]
with x cast to the adapter dtype for the LoRA term and the result in the base output's dtype. The first active
adapter runs fused with the base GEMM; further active adapters (rare: several adapters active at once) are
added with peft's own expression after it. Dropout uses each adapter's `nn.Dropout.p` when that module is
training, from the op's seeded mask (same distribution as peft's, different draws).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import weakref

import torch
from torch import nn

from .. import _backend
from ..ops import lora as _lora_ops
from . import _swap
from . import peft_ia3 as _ia3
from . import prefix as _prefix

log = logging.getLogger("peftkern")

_FUSED = "FusedLoraLinear"  # the class accelerated peft lora.Linear instances get (integrations/_swap.py)
_logged: set[str] = set()
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
# Keyword arguments peft's forward pops and ignores for vanilla LoRA when they are None.
_NONE_KWARGS = ("adapter_names", "alora_offsets")


@dataclasses.dataclass
class Summary:
    """What `accelerate` did: `lora_layers` LoRA layers found, `patched` routed through peftkern (of which
    `fused_now` take the fused path in the model's current state), and why the others keep peft's forward."""

    lora_layers: int = 0
    patched: int = 0
    fused_now: int = 0
    reasons: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    ia3_layers: int = 0
    ia3_fused_now: int = 0
    prefix_layers: int = 0  # attention layers of a prefix-tuning model routed through prefix_attention

    def __str__(self) -> str:
        why = "; ".join(f"{r}: {n}" for r, n in self.reasons.most_common())
        ia3 = f", {self.ia3_fused_now} of {self.ia3_layers} IA3 layers" if self.ia3_layers else ""
        ia3 += f", {self.prefix_layers} prefix-tuning attention layers" if self.prefix_layers else ""
        return (f"{self.fused_now} of {self.lora_layers} LoRA layers{ia3} run peftkern's fused ops"
                + (f"; the others keep peft's forward ({why})" if why else ""))


# ------------------------------------------------------------------------------------------------ checks


_conv1d: list = []  # transformers' Conv1D class (or None), looked up once: imports are not free per call


def _conv1d_type():
    if not _conv1d:
        try:
            from transformers.pytorch_utils import Conv1D
        except ImportError:  # pragma: no cover - transformers is optional
            Conv1D = None
        _conv1d.append(Conv1D)
    return _conv1d[0]


def _plain_forward(mod: nn.Module, cls) -> bool:
    """mod runs cls.forward unchanged: no subclass override, no instance-level replacement, no hooks."""
    return (type(mod).forward is cls.forward and "forward" not in mod.__dict__ and not mod._forward_hooks
            and not mod._forward_pre_hooks and not mod._backward_hooks and not mod._backward_pre_hooks)


def _plain_weight(w) -> bool:
    # Quantized and sharded (DTensor) weights are tensor subclasses: the op needs a dense float tensor.
    return type(w) in (torch.Tensor, nn.Parameter) and w.dtype in _FLOATS


def _base_why_not(base: nn.Module) -> str | None:
    """Why the ops cannot stand in for this base layer (its kind, its weight and bias), or None."""
    if _base_kind(base) is None:
        return f"base layer {type(base).__name__} (or its forward is hooked/overridden)"
    for t in (base.weight, base.bias):
        if t is None:
            continue
        if type(t) not in (torch.Tensor, nn.Parameter):
            return f"base weight is a {type(t).__name__} (quantized or sharded)"
        if t.dtype not in _FLOATS:
            return f"base weight dtype {t.dtype} (the kernels take float32, float16, bfloat16)"
    return None


def _base_kind(base: nn.Module) -> str | None:
    if isinstance(base, nn.Linear) and _plain_forward(base, nn.Linear):
        return "linear"
    conv1d = _conv1d_type()
    if conv1d is not None and isinstance(base, conv1d) and _plain_forward(base, conv1d):
        return "conv1d"
    return None


def _layer_why_not(layer, active: list[str]) -> str | None:
    """Why the fused path cannot serve this layer with these active adapters (input-independent), or None."""
    why = _base_why_not(layer.base_layer)
    if why is not None:
        return why
    for a in active:
        if a in layer.lora_variant:
            return f"LoRA variant {type(layer.lora_variant[a]).__name__} (DoRA, aLoRA, ...)"
    a = active[0]
    lora_a, lora_b = layer.lora_A[a], layer.lora_B[a]
    if not (isinstance(lora_a, nn.Linear) and _plain_forward(lora_a, nn.Linear) and isinstance(lora_b, nn.Linear)
            and _plain_forward(lora_b, nn.Linear)):
        return "lora_A/lora_B are not plain nn.Linear modules"
    if lora_a.bias is not None or (lora_b.bias is not None) != bool(layer.lora_bias.get(a, False)):
        return "unexpected bias on lora_A/lora_B"
    if not (_plain_weight(lora_a.weight) and _plain_weight(lora_b.weight)):
        return "adapter weights are not dense float tensors"
    if lora_a.weight.dtype != lora_b.weight.dtype:
        return "lora_A and lora_B have different dtypes"
    if lora_b.bias is not None and lora_b.bias.dtype != lora_b.weight.dtype:
        return "lora_B.bias dtype differs from lora_B.weight's"
    r, in_f = lora_a.weight.shape
    if r > min(in_f, lora_b.weight.shape[0]):
        return f"rank {r} exceeds min(in, out)"
    drop = layer.lora_dropout[a]
    if type(drop) not in (nn.Dropout, nn.Identity) or (type(drop) is nn.Dropout and not 0.0 <= drop.p < 1.0):
        return f"dropout module {type(drop).__name__} (only nn.Dropout with p < 1 or nn.Identity)"
    s = layer.scaling[a]
    if isinstance(s, bool) or not isinstance(s, (int, float)):
        return f"scaling is a {type(s).__name__}, not a Python number"
    return None


def _active(layer) -> list[str]:
    keys = layer._modules["lora_A"]._modules  # not layer.lora_A: nn.Module.__getattr__ is slow per call
    return [a for a in layer.active_adapters if a in keys]


def _note_fallback(why: str, kind: str = "LoRA") -> None:
    if _backend.strict():
        raise _backend.BackendUnavailable(f"peftkern.accelerate: a {kind} layer falls back to peft's forward: {why}")
    if why not in _logged:
        _logged.add(why)
        log.warning("peftkern: a %s layer runs peft's forward (not fused): %s", kind, why)


# ------------------------------------------------------------------------------------------------ forward


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                or "forward" in m.__dict__)


def _state_key(layer) -> tuple:
    """Everything the input-independent checks read, as ids and plain values: cheap to build per call, and
    different whenever the layer's state (adapters active/merged/disabled, modules, parameters, their dtypes
    and devices, hooks) changes. The plan keeps the objects alive, so their ids cannot be reused."""
    mods = layer._modules
    base = mods["base_layer"]
    names = layer._active_adapter  # what layer.active_adapters reads, without its two property calls
    adapters = mods["lora_A"]._modules
    if isinstance(names, str):
        active = (names,) if names in adapters else ()
    else:
        active = tuple(a for a in names if a in adapters)
    bp = base._parameters
    w, b = bp.get("weight"), bp.get("bias")
    key = (layer._disable_adapters, len(layer.merged_adapters), active, id(base), type(base), _hooked(base),
           len(layer.lora_variant), id(w), id(b), _dtype_device(w), _dtype_device(b))
    if not active:
        return key
    a0 = active[0]
    lora_a, lora_b = mods["lora_A"]._modules[a0], mods["lora_B"]._modules[a0]
    ap, bp = lora_a._parameters, lora_b._parameters
    aw, bw, bb = ap.get("weight"), bp.get("weight"), bp.get("bias")
    return (*key, id(lora_a), type(lora_a), _hooked(lora_a), id(lora_b), type(lora_b), _hooked(lora_b),
            len(ap), len(bp), id(aw), id(bw), id(bb), _dtype_device(aw), _dtype_device(bw), _dtype_device(bb),
            id(mods["lora_dropout"]._modules[a0]))


def _dtype_device(t):
    return None if t is None else (t.dtype, t.device)


class _Plan:
    """A layer's fused-path decision and the objects the fused call reads, valid while its key holds."""

    __slots__ = ("active", "base", "conv1d", "drop", "key", "lora_a", "lora_b", "why")

    def __init__(self, layer, key):
        self.key = key
        self.why = _state_why_not_call(layer)
        self.active = _active(layer)
        if self.why is None:
            a0 = self.active[0]
            self.base = layer._modules["base_layer"]
            self.conv1d = _base_kind(self.base) == "conv1d"
            self.lora_a, self.lora_b = layer.lora_A[a0], layer.lora_B[a0]
            self.drop = layer.lora_dropout[a0]


_plans: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # layer -> _Plan (not in the instance dict:
# it must not travel with pickles and deepcopies)


def _plan(layer) -> _Plan:
    if torch.compiler.is_compiling():  # dynamo's guards do this job (and torch 2.11's cannot trace id())
        return _Plan(layer, None)
    key = _state_key(layer)
    plan = _plans.get(layer)
    if plan is None or plan.key != key:
        plan = _plans[layer] = _Plan(layer, key)
    return plan


def _state_why_not_call(layer) -> str | None:
    """_state_why_not as the forward reads it: "" when peft's forward is only the base layer."""
    if layer.disable_adapters or layer.merged:
        return ""
    active = _active(layer)
    return _layer_why_not(layer, active) if active else ""


def _input_why_not(plan: _Plan, layer, x, args, kwargs, cdt) -> str | None:
    """Why this call (its arguments, input dtype and device, autocast to `cdt`) cannot take the fused path."""
    if args:
        return "extra positional arguments to the LoRA layer"
    for k, v in kwargs.items():
        if v is not None or k not in _NONE_KWARGS:
            return "adapter_names (mixed-adapter batch)" if k == "adapter_names" else f"keyword argument {k!r}"
    if plan.why is not None:
        return plan.why
    w = plan.base._parameters["weight"]
    if not isinstance(x, torch.Tensor) or x.dtype not in _FLOATS or x.dim() < 1:
        return "input is not a float tensor"
    a_w = plan.lora_a._parameters["weight"]
    dev = w.device
    if x.device != dev or a_w.device != dev:
        return "input, base weight and adapters are on different devices"
    if cdt is not None:
        return None if cdt in _FLOATS else "autocast to an unsupported dtype"
    if x.dtype != w.dtype:
        return f"input dtype {x.dtype} differs from the base weight's {w.dtype}"
    if x.dtype != a_w.dtype and not getattr(layer, "cast_input_dtype_enabled", True):
        return "input dtype casting disabled (peft.helpers.disable_input_dtype_casting)"
    s = layer.scaling[plan.active[0]]
    if isinstance(s, bool) or not isinstance(s, (int, float)):
        return f"scaling is a {type(s).__name__}, not a Python number"
    return None


def _why_not(layer, x, args, kwargs) -> str | None:
    """None: take the fused path. "": peft's forward is only the base layer (adapters disabled / merged / none
    active here), nothing to fuse. Otherwise the reason the fused path cannot take this call."""
    cdt = _backend.autocast_dtype(x.device.type) if isinstance(x, torch.Tensor) else None
    return _input_why_not(_plan(layer), layer, x, args, kwargs, cdt)


def _fused_forward(self, x, *args, **kwargs):
    """Replaces a peft `lora.Linear` instance's forward; see the module docstring for the semantics."""
    plan = _plan(self)
    cdt = _backend.autocast_dtype(x.device.type) if isinstance(x, torch.Tensor) else None
    why = _input_why_not(plan, self, x, args, kwargs, cdt)
    if why is not None:
        if why:
            _note_fallback(why)
        return _swap.base_class(self).forward(self, x, *args, **kwargs)
    active = plan.active
    params = plan.base._parameters
    w, b = params["weight"], params["bias"]
    if plan.conv1d:
        w = w.t()  # Conv1D stores (in, out): pass the (out, in) view; the op reads weights by strides
    lora_a, lora_b = plan.lora_a._parameters["weight"], plan.lora_b._parameters["weight"]
    s = float(self.scaling[active[0]])
    drop = plan.drop
    p = float(drop.p) if drop.training and type(drop) is nn.Dropout else 0.0
    lb = plan.lora_b._parameters.get("bias")  # lora_bias=True: s * b_B folds into the base bias of the fused GEMM
    if cdt is not None:
        # Do what autocast does to peft's linears (cast every operand to the autocast dtype), then run the op
        # with autocast off so it does not recast the op's internals.
        x_c, w, lora_a, lora_b = x.to(cdt), w.to(cdt), lora_a.to(cdt), lora_b.to(cdt)
        b = None if b is None else b.to(cdt)
        if lb is not None:
            lb = lb.to(cdt)
        with torch.autocast(x.device.type, enabled=False):
            y = _lora_ops.lora_linear(x_c, w, _fold_bias(b, lb, s, cdt), lora_a, lora_b, s, p)
    else:
        y = _lora_ops.lora_linear(x, w, _fold_bias(b, lb, s, w.dtype), lora_a, lora_b, s, p)
    if len(active) > 1:
        _note_extra_adapters()
        result_dtype = y.dtype
        for a in active[1:]:  # peft's own expression for the 2nd.. active adapters
            x = self._cast_input_dtype(x, self.lora_A[a].weight.dtype)
            y = y + self.lora_B[a](self.lora_A[a](self.lora_dropout[a](x))) * self.scaling[a]
        y = y.to(result_dtype)
    return y


def _fold_bias(b, lb, s, dtype):
    if lb is None:
        return b
    extra = (lb * s).to(dtype)
    return extra if b is None else b + extra


def _note_extra_adapters() -> None:
    key = "several active adapters"
    if key not in _logged:
        _logged.add(key)
        log.info("peftkern: several active adapters: the first runs fused, the others with peft's expression")


# ------------------------------------------------------------------------------------------------ public API


def _lora_layers(model: nn.Module):
    from peft.tuners.lora import LoraLayer

    for name, mod in model.named_modules():
        if isinstance(mod, LoraLayer):
            yield name, mod


def _patchable(mod, cls=None, kind: str = "LoRA") -> str | None:
    """Why `mod` cannot be patched: only peft's own `cls` (default lora.Linear), not yet replaced by others."""
    if cls is None:
        from peft.tuners.lora import Linear as cls
    if _swap.is_swapped(mod):
        return None  # already ours
    if type(mod) is not cls:  # a subclass (peft's torchao/INC layers, a user's) has its own merge etc.
        return f"{type(mod).__name__} {kind} layer (only peft's {kind.lower()}.Linear itself is fused)"
    if "forward" in mod.__dict__:
        return "forward already replaced by another library (e.g. accelerate hooks)"
    return None


def accelerate(model: nn.Module) -> Summary:
    """Route every peft `lora.Linear` layer of `model` (a `PeftModel` or any model with peft LoRA layers
    injected) through peftkern's fused LoRA op, every peft `ia3.Linear` through `ia3_linear`, and the attention
    of a prefix-tuning PeftModel through `prefix_attention` (see integrations/prefix.py), in place. Prompt
    tuning and other prompt-learning methods keep peft's path (they only prepend embeddings).
    Calling it again is harmless; layers added later (a new adapter on new target modules) need another call.
    Logs one summary line on logger "peftkern"."""
    summary = Summary()
    for _, mod in _lora_layers(model):
        summary.lora_layers += 1
        why = _patchable(mod)
        if why is not None:
            summary.reasons[why] += 1
            continue
        if not _swap.is_swapped(mod):
            _swap.swap(mod, _FUSED)
        summary.patched += 1
        now = _state_why_not(mod)
        if now is None:
            summary.fused_now += 1
        else:
            summary.reasons[now] += 1
    for mod in _ia3.layers(model):
        summary.ia3_layers += 1
        why = _ia3.patchable(mod)
        if why is None:
            _ia3.patch(mod)
            why = _ia3.state_why_not(mod)
        if why is None:
            summary.ia3_fused_now += 1
        else:
            summary.reasons[why or "IA3 adapter disabled, merged or inactive"] += 1
    if _prefix.is_prefix_model(model):
        why = _prefix.why_not(model)
        if why is None:
            summary.prefix_layers = _prefix.accelerate(model)
        else:
            summary.reasons[why] += 1
    log.info("peftkern.accelerate(%s): %s", type(model).__name__, summary)
    return summary


def _state_why_not(layer) -> str | None:
    if layer.disable_adapters:
        return "adapters disabled"
    if layer.merged:
        return "merged into the base weight"
    active = _active(layer)
    if not active:
        return "no active adapter in this layer"
    return _layer_why_not(layer, active)


def restore(model: nn.Module) -> int:
    """Undo `accelerate`: every patched LoRA / IA3 layer (and a prefix-tuning model's attention) runs
    peft's own forward again. Returns how many layers / models were restored."""
    n = int(_prefix.restore(model))
    n += sum(_swap.unswap(mod) for _, mod in _lora_layers(model))
    return n + sum(_ia3.unpatch(mod) for mod in _ia3.layers(model))


def is_accelerated(module: nn.Module) -> bool:
    """True when `module` (a LoRA layer) has been patched by `accelerate`."""
    return _swap.is_swapped(module, _FUSED)


def _fused_lora_class():
    from peft.tuners.lora import Linear

    return Linear, {"forward": _fused_forward}


_swap.register(_FUSED, _fused_lora_class)
