"""Every op's result is a tensor of its own (not a view of the op's internals), so a model may modify a
layer's output in place (`y += residual`, `nn.ReLU(inplace=True)`) and still train: the gradients equal
those of the same computation done out of place."""

from __future__ import annotations

import pytest
import torch
from _util import DEVICE

import peftkern
from peftkern.ops import bottleneck_adapter, ia3_linear, lora_linear


def _leaves():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(DEVICE).requires_grad_(True)
    return {"x": r(2, 5, 16), "w": torch.randn(8, 16, generator=g).to(DEVICE), "a": r(4, 16), "b": r(8, 4),
            "l_in": r(16), "dw": r(4, 16), "uw": r(16, 4)}


OPS = {
    "lora": lambda t: lora_linear(t["x"], t["w"], None, t["a"], t["b"], 0.5),
    "ia3_ff": lambda t: ia3_linear(t["x"], t["w"], None, t["l_in"], True),
    "adapter": lambda t: bottleneck_adapter(t["x"], t["dw"], None, t["uw"], None, activation="relu"),
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("op", list(OPS))
def test_output_can_be_modified_in_place(op, backend):
    grads = []
    for in_place in (True, False):
        t = _leaves()
        with peftkern.use_backend(backend):
            y = OPS[op](t)
            assert y._base is None
            y = y.mul_(2).add_(1).relu_() if in_place else torch.relu(y * 2 + 1)
            leaves = [v for v in t.values() if v.requires_grad]
            grads.append(torch.autograd.grad(y.square().sum(), leaves, allow_unused=True))
    for g_in, g_out in zip(*grads):
        if g_out is not None:
            torch.testing.assert_close(g_in, g_out)


def test_ia3_output_scaling_keeps_its_output_for_backward():
    """The keys/values form saves its own output (rebuilding x Wᵀ + b as y / l), so an in-place change to
    that output is caught by autograd's version check, as for any op that saves its result."""
    t = _leaves()
    with peftkern.use_backend("torch"):
        y = ia3_linear(t["x"], t["w"], None, torch.ones(8, device=DEVICE, requires_grad=True), False)
    y.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
