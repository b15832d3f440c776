"""IA3's CUDA ops (csrc/ia3/): ia3_scale, ia3_bias_scale and ia3_colsum_mul, the pieces the cuda backend of
peftkern::ia3_linear pairs with cuBLAS GEMMs. Registration and the argument checks that run before a launch on
any machine with nvcc (no GPU needed); on a GPU each kernel against torch (the elementwise ones bit for bit: one
fp32 product, one rounding; the column reduction against fp64 under the 2x rule). ia3_linear on the cuda backend
end to end is in tests/test_ia3.py (its BACKENDS hold "cuda" on a GPU). Tests marked `gpu` are deselected
without a CUDA device (tests/conftest.py).
"""

from __future__ import annotations

import re

import pytest
import torch
from _cuda_ext import build_and_load, gpu
from _util import assert_close_rule

OPS = ("ia3_scale", "ia3_bias_scale", "ia3_colsum_mul")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (M, N): vectorised rows; odd N (scalar tails); one row; no rows.
SHAPES = [(64, 256), (37, 100), (1, 8), (0, 24)]


@pytest.fixture(scope="module")
def built():
    yield from build_and_load()


def test_registered_for_cuda_only(built):
    """CUDA kernels and no Meta ones: the ops run only inside peftkern::ia3_linear(_backward), whose fake
    kernels stand for them."""
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"peftkern_cuda::{op}", "CUDA"), op
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(f"peftkern_cuda::{op}", "Meta"), op


def test_argument_checks(built):
    """The checks run before a launch: call the CUDA kernels on CPU tensors through the dispatcher's CUDA key
    (no GPU needed) and expect errors naming the argument."""
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    ns = torch.ops.peftkern_cuda
    t, l4 = torch.randn(3, 4), torch.randn(4)
    cases = [
        (ns.ia3_scale, (t.double(), l4, 1), "t must be float32, float16 or bfloat16"),
        (ns.ia3_scale, (t, l4, 1), "t must be a CUDA tensor"),
        (ns.ia3_bias_scale, (t.half(), None, l4, torch.float16), "z must be float32"),
        (ns.ia3_bias_scale, (t, None, l4, torch.float16), "z must be a contiguous 2-D CUDA tensor"),
        (ns.ia3_colsum_mul, (t.int(), t, l4, False, False), "a must be float32, float16 or bfloat16"),
        (ns.ia3_colsum_mul, (t, t, l4, False, False), "a must be a CUDA tensor"),
    ]
    for op, args, expect in cases:
        with pytest.raises(RuntimeError, match=re.escape(expect)):
            op.default.redispatch(keys, *args)


# ---------------------------------------------------------------------------------------------
# GPU: against torch


def _l(n):
    """IA3 vector in fp32, |l| in [0.5, 1.5] with both signs (the output case divides by it)."""
    sign = torch.randint(0, 2, (n,), device="cuda") * 2 - 1
    return torch.empty(n, device="cuda").uniform_(0.5, 1.5) * sign


def _misaligned(t):
    """The same values at a data pointer off 16-byte alignment (still contiguous): the scalar path."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    v = buf[1:].view(t.shape)
    v.copy_(t)
    return v


def _exact(name, got, want):
    assert got.dtype == want.dtype and got.shape == want.shape, (name, got.dtype, got.shape)
    torch.testing.assert_close(got, want, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")


@gpu
@pytest.mark.parametrize("misalign", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ia3_scale(built, dtype, shape, misalign):
    t = torch.randn(shape, device="cuda").to(dtype)
    if misalign and t.numel():
        t = _misaligned(t)
    for dim in (0, 1):
        lv = _l(shape[dim])
        got = torch.ops.peftkern_cuda.ia3_scale(t, lv, dim)
        want = (t.float() * (lv[:, None] if dim == 0 else lv[None, :])).to(dtype)
        _exact(f"dim={dim}", got, want)


@gpu
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ia3_bias_scale(built, dtype, shape, with_bias):
    z = torch.randn(shape, device="cuda")
    bias = torch.randn(shape[1], device="cuda").to(dtype) if with_bias else None
    lv = _l(shape[1])
    got = torch.ops.peftkern_cuda.ia3_bias_scale(z, bias, lv, dtype)
    want = ((z if bias is None else z + bias.float()) * lv).to(dtype)
    _exact("y", got, want)


@gpu
@pytest.mark.parametrize("misalign", [False, True])
@pytest.mark.parametrize("shape", [*SHAPES, (4099, 2048)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ia3_colsum_mul(built, dtype, shape, misalign):
    a = torch.randn(shape, device="cuda").to(dtype)
    b = torch.randn(shape, device="cuda").to(dtype)
    if misalign and a.numel():
        a, b = _misaligned(a), _misaligned(b)
    lv = _l(shape[1])
    for divide, write_scaled in ((False, True), (True, False), (False, False)):
        dl, scaled = torch.ops.peftkern_cuda.ia3_colsum_mul(a, b, lv, divide, write_scaled)
        want64 = (a.double() * b.double()).sum(0)
        same = (a.float() * b.float()).sum(0)
        if divide:
            want64, same = want64 / lv.double(), same / lv
        assert dl.dtype == torch.float32 and dl.shape == (shape[1],)
        assert_close_rule(f"dl divide={divide}", dl, want64, same)
        if write_scaled:
            _exact("scaled", scaled, (a.float() * lv).to(dtype))
        else:
            assert scaled.numel() == 0
        again, _ = torch.ops.peftkern_cuda.ia3_colsum_mul(a, b, lv, divide, write_scaled)
        assert torch.equal(dl, again), "dl must not depend on scheduling (fixed summation order)"
