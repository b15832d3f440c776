"""The entry point: `accelerate(model)` routes a peft model's LoRA (lora.py) and IA3 (ia3.py) layers and a
prefix-tuning model's attention (prefix.py) through peftkern's fused ops, in place, and returns a `Summary`;
`restore(model)` undoes it. Bottleneck adapters have their own entry points (adapters.py).
"""

from __future__ import annotations

import collections
import dataclasses

from torch import nn

from . import ia3 as _ia3
from . import lora as _lora
from . import lora_group as _lora_group
from . import prefix as _prefix
from . import qlora as _qlora
from .checks import log


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
    prefix_backend: str = ""
    group_candidates: int = 0  # sets of sibling LoRA layers with one in_features (lora_group.py)
    backends: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # of fused LoRA layers
    ia3_backends: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def __str__(self) -> str:
        why = "; ".join(f"{r}: {n}" for r, n in self.reasons.most_common())
        ia3_on = ", ".join(f"{n} on {b}" for b, n in self.ia3_backends.most_common())
        ia3_on = f" ({ia3_on})" if ia3_on else ""
        ia3 = f", {self.ia3_fused_now} of {self.ia3_layers} IA3 layers{ia3_on}" if self.ia3_layers else ""
        ia3 += (f", {self.prefix_layers} prefix-tuning attention layers ({self.prefix_backend})"
                if self.prefix_layers else "")
        groups = (f"; {self.group_candidates} candidate projection groups (siblings that read one tensor group at "
                  "the first forward: peftkern.projection_groups(model))" if self.group_candidates else "")
        on = ", ".join(f"{n} on {b}" for b, n in self.backends.most_common())
        on = f" ({on})" if on else ""
        return (f"{self.fused_now} of {self.lora_layers} LoRA layers{on}{ia3} run peftkern's fused ops{groups}"
                + (f"; the others keep peft's forward ({why})" if why else ""))


def accelerate(model: nn.Module, group_projections: bool = True) -> Summary:
    """Route every peft `lora.Linear` layer of `model` (a `PeftModel` or any model with peft LoRA layers
    injected) through peftkern's fused LoRA op, every peft `ia3.Linear` through `ia3_linear`, and the attention
    of a prefix-tuning PeftModel through `prefix_attention` (see integrations/prefix.py), in place. Prompt
    tuning and other prompt-learning methods keep peft's path (they only prepend embeddings).
    Calling it again is harmless; layers added later (a new adapter on new target modules) need another call.
    group_projections: sibling LoRA layers that read the same tensor (q/k/v, gate/up) run as one group
    (integrations/lora_group.py); the results are the same either way. Logs one summary line on logger
    "peftkern"."""
    summary = Summary()
    for mod in _lora.layers(model):
        summary.lora_layers += 1
        impl = _qlora if _qlora.handles(mod) else _lora  # LoRA on a bitsandbytes base: qlora.py
        why = impl.patchable(mod)
        if why is not None:
            summary.reasons[why] += 1
            continue
        impl.patch(mod)
        summary.patched += 1
        now = impl.state_why_not(mod)
        if now is None:
            summary.fused_now += 1
            summary.backends[impl.backend_of(mod)] += 1
        else:
            summary.reasons[now] += 1
    if group_projections:
        summary.group_candidates = _lora_group.add_candidates(model)
    for mod in _ia3.layers(model):
        summary.ia3_layers += 1
        why = _ia3.patchable(mod)
        if why is None:
            _ia3.patch(mod)
            why = _ia3.state_why_not(mod)
        if why is None:
            summary.ia3_fused_now += 1
            summary.ia3_backends[_ia3.backend_of(mod)] += 1
        else:
            summary.reasons[why or "IA3 adapter disabled, merged or inactive"] += 1
    if _prefix.is_prefix_model(model):
        why = _prefix.why_not(model)
        if why is None:
            summary.prefix_layers = _prefix.accelerate(model)
            summary.prefix_backend = _prefix_backend(model)
        else:
            summary.reasons[why] += 1
    log.info("peftkern.accelerate(%s): %s", type(model).__name__, summary)
    return summary


def restore(model: nn.Module) -> int:
    """Undo `accelerate`: every patched LoRA / IA3 layer (and a prefix-tuning model's attention) runs
    peft's own forward again. Returns how many layers / models were restored."""
    n = int(_prefix.restore(model))
    for mod in _lora.layers(model):
        _lora_group.remove(mod)
    n += sum(_lora.unpatch(mod) for mod in _lora.layers(model))
    return n + sum(_ia3.unpatch(mod) for mod in _ia3.layers(model))


def _prefix_backend(model) -> str:
    """The backend prefix_attention runs on for this model's device and head dim, as the op would choose it now
    (the Triton kernels' other limit, batch x heads, depends on the call)."""
    from .. import _backend

    if _backend.requested_backend() == "cuda":
        return "cuda backward, triton forward (requested)"
    cfg = model.get_base_model().config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    device = next(model.parameters()).device

    def triton_ok():
        from ..triton import prefix as tri  # Triton's module only: nothing compiles here

        return f"head dim {head_dim} > {tri.MAX_HEAD_DIM}" if head_dim > tri.MAX_HEAD_DIM else None

    try:
        return "on " + _backend.dispatch("prefix_attention", device, {"torch": lambda: None, "triton": triton_ok})
    except _backend.BackendUnavailable as e:
        return f"unavailable ({e})"
