"""Prefix-tuning's CUDA op, peftkern_cuda::prefix_grad_reduce (csrc/prefix/): registered on any machine with
nvcc (no GPU needed); on a GPU, the cuda backward (Triton attention + the CUDA C++ batch reduction of the shared
prefix's gradient) against the triton one, and the raw reduction against torch. Tests marked `gpu` are deselected
without a CUDA device (tests/conftest.py).
"""

from __future__ import annotations

import pytest
import torch
from _cuda_ext import build_and_load, gpu
from _util import DEVICE, DTYPES
from test_prefix import NAMES, make_inputs

import peftkern


@pytest.fixture(scope="module")
def built():
    yield from build_and_load()


def test_registered_for_cuda_only(built):
    """The op has a CUDA kernel and no Meta one: it runs only inside peftkern::prefix_attention_backward,
    whose fake kernel stands for it."""
    assert torch._C._dispatch_has_kernel_for_dispatch_key("peftkern_cuda::prefix_grad_reduce", "CUDA")
    assert not torch._C._dispatch_has_kernel_for_dispatch_key("peftkern_cuda::prefix_grad_reduce", "Meta")


@gpu
@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [64, 24])
def test_cuda_prefix_grad_reduce(dtype, D):
    """The cuda backward (Triton attention + CUDA C++ batch reduction) equals the triton one's sum."""
    leaves, mask = make_inputs(5, 4, 2, 33, 40, 7, D, dtype, mask="random")
    scale = D ** -0.5
    with torch.no_grad(), peftkern.use_backend("triton"):
        out, lse = torch.ops.peftkern.prefix_attention(*leaves, mask, True, scale)
    gout = torch.randn_like(out)
    args = (gout, *leaves, out, lse, mask, True, scale)
    want = torch.ops.peftkern.prefix_attention_backward(*args, "triton")
    got = torch.ops.peftkern.prefix_attention_backward(*args, "cuda")
    for name, g, w in zip(NAMES, got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        torch.testing.assert_close(g, w, rtol=0, atol=0 if name[1] != "p" else 2e-3 * w.abs().max().item())
    part = torch.randn(2, 6, 1003, device=DEVICE)  # odd N: the scalar path
    k_sum, v_sum = torch.ops.peftkern_cuda.prefix_grad_reduce(part, dtype)
    torch.testing.assert_close(k_sum, part[0].sum(0).to(dtype))
    torch.testing.assert_close(v_sum, part[1].sum(0).to(dtype))
