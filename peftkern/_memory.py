"""Counting the memory a training step keeps: bytes saved for backward, peak allocation."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable

import torch


class SavedTensors:
    """While active, records what autograd saves for backward; `nbytes()` is the size of the distinct storages of
    those still kept (each storage once, `exclude`d ones left out).

    Two things a plain `saved_tensors_hooks` pack hook misses or miscounts:
    - nested hooks: PyTorch applies only the innermost pair, so whatever an op packs under its own
      `saved_tensors_hooks` (peftkern's 4-bit LoRA keeps its dequantised weight as a recipe there) never reaches an
      outer hook. While active, every pair pushed inside is wrapped: its pack result is recorded (a tensor counts,
      anything else, such as a recipe to rebuild the tensor in backward, does not) through `nested(t, packed)`.
    - graphs that die during the forward: a tensor saved by a graph that is freed before the forward returns (peft's
      DoRA computes B·A through a graph it then detaches) is not kept. Only tensors still alive count (weak
      references); a storage freed and reused by another tensor is therefore not counted twice or lost.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = (), keep: Callable[[torch.Tensor], bool] | None = None,
                 nested: Callable[[torch.Tensor, object], None] | None = None):
        self._skip = {t.untyped_storage()._cdata for t in exclude if t is not None}
        self._keep = keep
        self._entries: list[tuple[Callable[[], object], int, int]] = []
        self._nested = nested or (lambda t, packed: self.record(packed))
        self._push = None
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda kept: kept)

    def record(self, t, pin: bool = False) -> None:
        """Count `t` (a tensor; anything else is ignored) while it is alive; `pin`: as kept, whatever becomes of it
        (for a tensor a model of the step says is kept although this run dropped it)."""
        if not isinstance(t, torch.Tensor) or (self._keep is not None and not self._keep(t)):
            return
        st = t.untyped_storage()
        if st._cdata in self._skip:
            return
        alive = (lambda st=st: st) if pin else weakref.ref(t)  # a pin holds the storage: its key stays unique
        self._entries.append((alive, st._cdata, st.nbytes()))

    def _pack(self, t):
        kept = t.detach()  # not t itself: an output saving itself would make a cycle that keeps its graph alive
        self.record(kept)
        return kept

    def nbytes(self) -> int:
        seen = {key: n for alive, key, n in self._entries if alive() is not None}
        return sum(seen.values())

    def __enter__(self) -> SavedTensors:
        self._hooks.__enter__()
        ag = torch._C._autograd
        self._push = push = ag._push_saved_tensors_default_hooks

        def push_wrapped(pack_hook, unpack_hook):
            def pack(t):
                packed = pack_hook(t)
                self._nested(t, packed)
                return packed

            return push(pack, unpack_hook)

        ag._push_saved_tensors_default_hooks = push_wrapped
        return self

    def __exit__(self, *exc) -> None:
        torch._C._autograd._push_saved_tensors_default_hooks = self._push
        self._hooks.__exit__(*exc)


def saved_bytes(fn: Callable[[], torch.Tensor], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of distinct storages autograd saves while running `fn()` and still keeps when it returns, minus
    `exclude` (the parameters, which live anyway); also what ops save under their own saved_tensors_hooks
    (SavedTensors). Activations saved twice through views count once."""
    with SavedTensors(exclude, keep=lambda t: t.device.type != "meta") as saved:
        out = fn()
    n = saved.nbytes()  # while `out` holds the graph
    del out
    return n
