"""Projection groups: sibling LoRA layers that read the same tensor (q/k/v, gate/up) run as one
`lora_linear_group` call, so x is read once for their shrinks and dA, and dx is written once.

No names are hard-coded. `accelerate` makes the fused LoRA children of one module that share in_features
*candidates*; the first forward watches which of them are called with the very same tensor, and those (two or
more) form a group, in the order they were called. From then on the first member called computes every
member's output; the others, called with that same tensor (same object, same version), take theirs. A member
called with another tensor, or not called after the group computed its output three times in a row, leaves.
Each member keeps its own dropout seed, drawn in the call order its own calls would use, and its own mask.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from .. import _backend
from ..ops import lora_group as _group_ops
from . import lora as _lora

_STALE_LIMIT = 3  # outputs computed for a member that was never called, in a row, before it leaves


class _Group:
    """Candidates while `forming`, then a group of members in call order."""

    __slots__ = ("__weakref__", "forming", "members", "pending", "seen", "stale")

    def __init__(self, members):
        self.forming = True
        self.members = [weakref.ref(m) for m in members]
        self.seen: list = []  # (layer, x) in call order, while forming
        self.pending: dict = {}  # layer -> (x, x._version, y): outputs computed for members not yet called
        self.stale: dict = {}  # layer -> outputs in a row it never took

    def live(self) -> list:
        return [m for m in (r() for r in self.members) if m is not None]

    def call(self, layer, x, args, kwargs):
        """layer's output from the group, or None: the caller takes the per-layer path."""
        if args or kwargs or torch.compiler.is_compiling() or not isinstance(x, torch.Tensor):
            return None
        if self.forming:
            self._watch(layer, x)
            return None
        got = self.pending.pop(layer, None)
        if got is not None:
            gx, version, y = got
            if gx is x and x._version == version:  # its state was checked when its output was computed
                self.stale.pop(layer, None)
                return y
            _leave(self, layer)  # called with another tensor (or changed since): not a member
            return None
        if self.pending:
            gx = next(iter(self.pending.values()))[0]
            if gx is x:
                return None  # left out of this computation (its state or the input did not allow it)
            self._expire()
        return self._compute(layer, x)

    def _watch(self, layer, x) -> None:
        if any(m is layer for m, _ in self.seen) or len(self.seen) == len(self.members):
            _form(self)
            return
        self.seen.append((layer, x))
        if len(self.seen) == len(self.members):
            _form(self)

    def _expire(self) -> None:
        for m in list(self.pending):
            self.stale[m] = n = self.stale.get(m, 0) + 1
            if n >= _STALE_LIMIT:
                _leave(self, m)
        self.pending.clear()

    def _compute(self, layer, x):
        compute_dtype = _backend.autocast_dtype(x.device.type)
        order = self.live()
        order.remove(layer)
        order.insert(0, layer)  # the caller first: its seed is drawn first, as its own call would draw it
        members, specs, x_in = [], [], None
        x_cast = x if compute_dtype is None else x.to(compute_dtype)  # autocast's cast of x, once for the group
        for m in order:
            plan = _lora._plan(m)
            if (_lora._input_why_not(plan, m, x, (), {}, compute_dtype) is not None or len(plan.active) != 1
                    or plan.active[0] in m.lora_variant):  # DoRA runs its own op (integrations/dora.py)
                if m is layer:
                    return None
                continue
            xm, spec = _lora._operands(plan, m, x_cast, compute_dtype)
            if x_in is not None and (xm.dtype != x_in.dtype or spec[0].dtype != specs[0][0].dtype):
                continue
            x_in = xm
            members.append(m)
            specs.append(spec)
        if len(specs) < 2:
            return None
        if compute_dtype is not None:
            with torch.autocast(x.device.type, enabled=False):
                ys = _group_ops.lora_linear_group_checked(x_in, specs)
        else:
            ys = _group_ops.lora_linear_group_checked(x_in, specs)
        version = x._version
        for m, y in zip(members[1:], ys[1:]):
            self.pending[m] = (x, version, y)
        return ys[0]


_groups = _lora.groups  # layer -> its _Group (candidates or formed)


def _form(cand: _Group) -> None:
    """Split the candidates by the tensor each was called with; two or more on one tensor form a group."""
    by_input: dict[int, list] = {}
    for m, x in cand.seen:
        by_input.setdefault(id(x), []).append(m)
    cand.seen = []
    for m in cand.live():
        _groups.pop(m, None)
    for members in by_input.values():
        if len(members) > 1:
            group = _Group(members)
            group.forming = False
            for m in members:
                _groups[m] = group


def _leave(group: _Group, layer) -> None:
    group.members = [r for r in group.members if r() is not None and r() is not layer]
    group.pending.pop(layer, None)
    group.stale.pop(layer, None)
    _groups.pop(layer, None)
    if len(group.members) < 2:
        for m in group.live():
            _groups.pop(m, None)
        group.members = []


def add_candidates(model: nn.Module) -> int:
    """Make candidate groups of the fused LoRA children of each module that share in_features. Returns how many
    candidate groups exist in `model` afterwards."""
    for parent in model.modules():
        by_in: dict[int, list] = {}
        for child in parent.children():
            if _lora.is_accelerated(child) and child not in _groups:
                by_in.setdefault(child.in_features, []).append(child)
        for members in by_in.values():
            if len(members) > 1:
                cand = _Group(members)
                for m in members:
                    _groups[m] = cand
    return len({id(g) for m in model.modules() if (g := _groups.get(m)) is not None})


def remove(layer) -> None:
    group = _groups.get(layer)
    if group is not None:
        _leave(group, layer)


def projection_groups(model: nn.Module) -> list[tuple[str, ...]]:
    """The groups formed so far in `model` (after its first forward), as tuples of module names in call order."""
    names = {m: n for n, m in model.named_modules()}
    out, done = [], set()
    for m in model.modules():
        g = _groups.get(m)
        if g is None or g.forming or id(g) in done:
            continue
        done.add(id(g))
        out.append(tuple(names.get(x, "?") for x in g.live()))
    return out
