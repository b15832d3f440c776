"""peft IA3 layers through `peftkern.ops.ia3.ia3_linear`: patched by `peftkern.accelerate`, undone by `restore`.

Semantics of peft 0.21's `ia3.Linear.forward` (one active adapter with vector l):
    k/v (is_feedforward False):   result = (base_layer(x) * l).to(result dtype)   — l also scales the bias
    feed-forward (True):          result = base_layer((x.to(l.dtype) * l).to(x.dtype))
The op takes peft's own parameter (shape (out, 1) or (1, in)), so gradients land on `ia3_l[adapter]` and
save_pretrained / merge_and_unload / set_adapter keep working. Anything else (several active adapters,
extra arguments, autocast, quantized or hooked bases, merged or disabled adapters) runs peft's forward; a
real fallback is logged once per reason and raises under PEFTKERN_STRICT=1.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import _backend
from ..ops import ia3 as _ia3_ops
from . import _swap, checks
from .checks import base_kind, base_why_not, note_fallback, plain_weight

_FUSED = "FusedIA3Linear"  # the class accelerated peft ia3.Linear instances get (integrations/_swap.py)


def layers(model: nn.Module):
    from peft.tuners.ia3 import IA3Layer

    return [m for m in model.modules() if isinstance(m, IA3Layer)]


def backend_of(layer) -> str:
    """The backend the layer's fused calls run on for its device, as the op would choose it now; an explicit cuda
    request is reported as such (checking it could mean building the extension)."""
    req = _backend.requested_backend()
    if req == "cuda":
        return "cuda (requested)"
    try:
        return _backend.dispatch("ia3_linear", layer.base_layer.weight.device,
                                 _ia3_ops._fwd_backends(bool(layer.is_feedforward)))
    except _backend.BackendUnavailable as e:
        return f"unavailable ({e})"


def patchable(mod) -> str | None:
    from peft.tuners.ia3 import Linear

    return checks.patchable(mod, Linear, "IA3")


def _active(layer) -> list[str]:
    return [a for a in layer.active_adapters if a in layer.ia3_l]


def state_why_not(layer) -> str | None:
    """Input-independent reason the fused path cannot serve this layer now; "" when peft's forward is just
    the base layer (disabled, merged, nothing active)."""
    if layer.disable_adapters or layer.merged:
        return ""
    active = _active(layer)
    if not active:
        return ""
    if len(active) > 1:
        return "several active IA3 adapters"
    base = layer.base_layer
    why = base_why_not(base)
    if why is not None:
        return why
    ia3_l = layer.ia3_l[active[0]]
    if not plain_weight(ia3_l):
        return "ia3_l is not a dense float tensor"
    if ia3_l.dtype not in (torch.float32, base.weight.dtype):
        return f"ia3_l is {ia3_l.dtype} on a {base.weight.dtype} base (the op takes float32 or the base's dtype)"
    return None


def _why_not(layer, x, args, kwargs) -> str | None:
    if args or kwargs:
        return "extra arguments to the IA3 layer"
    why = state_why_not(layer)
    if why is not None:
        return why
    w = layer.base_layer.weight
    if not isinstance(x, torch.Tensor) or x.dtype != w.dtype:
        return "input is not a tensor of the base weight's dtype"
    if x.device != w.device:
        return "input and base weight are on different devices"
    if _backend.autocast_dtype(x.device.type) is not None:
        return "autocast (IA3 under autocast keeps peft's forward)"
    return None


def _fused_forward(self, x, *args, **kwargs):
    why = _why_not(self, x, args, kwargs)
    if why is not None:
        if why:
            note_fallback(why, "IA3")
        return _swap.base_class(self).forward(self, x, *args, **kwargs)
    base = self.base_layer
    w = base.weight.t() if base_kind(base) == "conv1d" else base.weight  # Conv1D stores (in, out)
    return _ia3_ops.ia3_linear(x, w, base.bias, self.ia3_l[_active(self)[0]], feedforward=bool(self.is_feedforward))


def patch(mod) -> None:
    if not _swap.is_swapped(mod):
        _swap.swap(mod, _FUSED)


def unpatch(mod) -> bool:
    return _swap.unswap(mod)


def _fused_ia3_class():
    from peft.tuners.ia3 import Linear

    return Linear, {"forward": _fused_forward}


_swap.register(_FUSED, _fused_ia3_class)
