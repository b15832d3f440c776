"""The dequant-then-GEMM recipe shared by the LoRA ops on bitsandbytes bases (lora_4bit.py, lora_8bit.py).

The frozen weight is dequantised per call into a temporary in the compute dtype and `ops.lora.lora_linear_checked`
runs the fused LoRA GEMM on it (same kernels, dropout seed and masks as plain LoRA). Autograd does not keep the
temporary: saved_tensors_hooks replace every saved view of it by a `_Recipe` (how to dequantise it again), so it
is freed when the forward returns and the backward dequantises again for dx = dy W. No persistent or saved
full-precision copy.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .. import _backend
from . import lora as _lora


def backend(op: str, device) -> str:
    """A dequantisation op's backend for `device`: the cuda backend has no C++ dequant kernel and runs Triton's
    (its design, as the LoRA backward: not a fallback)."""
    req = "triton" if _backend.requested_backend() == "cuda" else None
    return _backend.dispatch(op, device, {"torch": lambda: None, "triton": lambda: None}, requested=req)


def lora_linear(x: Tensor, w: Tensor, rebuild: Callable[[], Tensor], bias: Tensor | None, lora_A: Tensor,
                lora_B: Tensor, scaling: float, dropout_p: float) -> Tensor:
    """`lora_linear_checked` on the dequantised weight `w`; `rebuild()` makes `w` again (same values, a new
    tensor) for the backward. The caller must drop its own reference to `w` when this returns."""
    # The storage's identity, not its data_ptr (0 for every meta tensor); w is alive while the hook can run.
    pack = _packer(rebuild, w.device, w.untyped_storage()._cdata)  # must not hold w: autograd keeps the hooks
    with torch.autograd.graph.saved_tensors_hooks(pack, _unpack):  # with the graph
        return _lora.lora_linear_checked(x, w, bias, lora_A, lora_B, float(scaling), float(dropout_p))


def _packer(rebuild, device, storage):
    """The pack hook: a saved view of the dequantised weight (same storage) becomes a _Recipe, the rest stays."""

    def pack(t):
        if t.device == device and t.untyped_storage()._cdata == storage:
            return _Recipe(rebuild, t.size(), t.stride(), t.storage_offset())
        return t

    return pack


class _Recipe:
    """A saved view of the dequantised weight, kept as how to rebuild it."""

    __slots__ = ("offset", "rebuild", "size", "stride")

    def __init__(self, rebuild, size, stride, offset):
        self.rebuild, self.size, self.stride, self.offset = rebuild, size, stride, offset


def _unpack(t):
    if type(t) is not _Recipe:
        return t
    with torch.no_grad():
        w = t.rebuild()
    return w.as_strided(t.size, t.stride, t.offset)
