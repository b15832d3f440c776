"""The bottleneck adapter's CUDA op, peftkern_cuda::bottleneck_adapter (csrc/adapter/): its Meta kernel on any
machine with nvcc (no GPU needed), and on a GPU the forward through peftkern's cuda backend against fp64 (the
backward runs on the Triton kernels). Tests marked `gpu` are deselected without a CUDA device (tests/conftest.py).
"""

from __future__ import annotations

import pytest
import torch
from _cuda_ext import build_and_load, gpu
from _util import assert_close_rule
from test_adapter import make_inputs

import peftkern
from peftkern.ops.adapter import bottleneck_adapter
from peftkern.reference import adapter as ref


@pytest.fixture(scope="module")
def built():
    yield from build_and_load()


def test_meta_kernel_opcheck(built):
    """The C++ Meta kernel (what torch.compile traces the op with) passes opcheck on meta tensors, dynamic
    shapes included, with no GPU."""
    assert torch._C._dispatch_has_kernel_for_dispatch_key("peftkern_cuda::bottleneck_adapter", "Meta")
    h = torch.float16
    e = lambda *shape: torch.empty(*shape, device="meta", dtype=h)
    args = (e(5, 96), e(16, 96), e(16), e(96, 16), e(96), e(5, 96), "gelu", 0.5)
    overload = torch.ops.peftkern_cuda.bottleneck_adapter.default
    checks = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    assert torch.library.opcheck(overload, args, test_utils=checks) == dict.fromkeys(checks, "SUCCESS")
    outs = overload(*args)
    want = [((5, 96), h), ((5, 16), h)]
    assert [(tuple(o.shape), o.dtype, o.device.type) for o in outs] == [(s, d, "meta") for s, d in want]


@gpu
@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("r, act, residual", [(64, "relu", False), (8, "gelu", True), (100, "silu", False),
                                              (1, "gelu_tanh", True)])
def test_cuda_forward(dtype, r, act, residual):
    x, dw, db, uw, ub, res = make_inputs((3, 67), 264, r, dtype, residual=residual, grads="none")
    with torch.no_grad(), peftkern.use_backend("cuda"):
        y = bottleneck_adapter(x, dw, db, uw, ub, res, act, 0.5)
    with torch.no_grad():
        y64 = ref.bottleneck_adapter(*[None if t is None else t.double() for t in (x, dw, db, uw, ub, res)], act, 0.5)
        assert_close_rule("y", y, y64, ref.bottleneck_adapter(x, dw, db, uw, ub, res, act, 0.5))
