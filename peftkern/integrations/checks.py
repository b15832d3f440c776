"""Checks and logging shared by the peft integrations (lora.py, ia3.py): can the ops stand in for a base
layer (its kind, weight and bias, no hooks), may an instance be patched, and the once-per-reason fallback
log (logger "peftkern"), which raises under PEFTKERN_STRICT=1.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .. import _backend
from . import _swap

log = logging.getLogger("peftkern")

FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_logged: set[str] = set()  # messages already logged once
_conv1d: list = []  # transformers' Conv1D class (or None), looked up once: imports are not free per call


def _conv1d_type():
    if not _conv1d:
        try:
            from transformers.pytorch_utils import Conv1D
        except ImportError:  # pragma: no cover - transformers is optional
            Conv1D = None
        _conv1d.append(Conv1D)
    return _conv1d[0]


def plain_forward(mod: nn.Module, cls) -> bool:
    """mod runs cls.forward unchanged: no subclass override, no instance-level replacement, no hooks."""
    return type(mod).forward is cls.forward and not hooked(mod)


def hooked(m: nn.Module) -> bool:
    """m has hooks or an instance-level forward."""
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                or "forward" in m.__dict__)


def plain_weight(w) -> bool:
    # Quantized and sharded (DTensor) weights are tensor subclasses: the op needs a dense float tensor.
    return type(w) in (torch.Tensor, nn.Parameter) and w.dtype in FLOATS


def base_kind(base: nn.Module) -> str | None:
    """"linear" (nn.Linear), "conv1d" (transformers' Conv1D, weight stored (in, out)) or None (anything else,
    or a hooked / overridden forward)."""
    if isinstance(base, nn.Linear) and plain_forward(base, nn.Linear):
        return "linear"
    conv1d = _conv1d_type()
    if conv1d is not None and isinstance(base, conv1d) and plain_forward(base, conv1d):
        return "conv1d"
    return None


def base_why_not(base: nn.Module) -> str | None:
    """Why the ops cannot stand in for this base layer (its kind, its weight and bias), or None."""
    if base_kind(base) is None:
        return f"base layer {type(base).__name__} (or its forward is hooked/overridden)"
    for t in (base.weight, base.bias):
        if t is None:
            continue
        if type(t) not in (torch.Tensor, nn.Parameter):
            return f"base weight is a {type(t).__name__} (quantized or sharded)"
        if t.dtype not in FLOATS:
            return f"base weight dtype {t.dtype} (the kernels take float32, float16, bfloat16)"
    return None


def patchable(mod, cls, kind: str) -> str | None:
    """Why `mod` cannot be patched: only peft's own `cls` (e.g. lora.Linear), not yet replaced by others."""
    if _swap.is_swapped(mod):
        return None  # already ours
    if type(mod) is not cls:  # a subclass (peft's torchao/INC layers, a user's) has its own merge etc.
        return f"{type(mod).__name__} {kind} layer (only peft's {kind.lower()}.Linear itself is fused)"
    if "forward" in mod.__dict__:
        return "forward already replaced by another library (e.g. accelerate hooks)"
    return None


def note_fallback(why: str, kind: str) -> None:
    """A `kind` layer runs peft's forward for reason `why`: raise under PEFTKERN_STRICT=1, else warn once."""
    if _backend.strict():
        raise _backend.BackendUnavailable(f"peftkern.accelerate: a {kind} layer falls back to peft's forward: {why}")
    if why not in _logged:
        _logged.add(why)
        log.warning("peftkern: a %s layer runs peft's forward (not fused): %s", kind, why)


def log_once(key: str, message: str) -> None:
    """Log `message` at INFO the first time `key` is seen."""
    if key not in _logged:
        _logged.add(key)
        log.info(message)
