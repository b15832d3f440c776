"""peftkern::dequantize_4bit (reference/quant.py, triton/quant.py) element for element against bitsandbytes'
own dequantize_4bit, and ops.lora_4bit.lora_linear_4bit against lora_linear on the dequantised weight."""

from __future__ import annotations

import pytest
import torch
from _util import DEVICE

import peftkern
from peftkern.ops import lora as lora_ops
from peftkern.ops import lora_4bit as ops
from peftkern.reference import quant as ref

F = pytest.importorskip("bitsandbytes.functional")

BACKENDS = ["torch", "triton"]
SHAPES = [((37, 100), 64), ((5, 7), 32), ((64, 256), 128), ((1, 4096), 4096), ((3, 96), 256)]  # odd, tiny, 1-row


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_dequantize_matches_bitsandbytes(quant_type, nested, backend):
    torch.manual_seed(0)
    for (shape, bs) in SHAPES:
        for wdtype in (torch.float32, torch.float16, torch.bfloat16):
            w = (torch.randn(shape) * 3).to(wdtype).to(DEVICE)
            q, qs = F.quantize_4bit(w, blocksize=bs, quant_type=quant_type, compress_statistics=nested)
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                want = F.dequantize_4bit(q, qs).to(dtype)
                with peftkern.use_backend(backend):
                    got = ops.dequantize(q, qs, dtype)
                assert got.dtype == dtype and got.shape == want.shape
                assert torch.equal(got, want), (shape, bs, wdtype, dtype, (got.float() - want.float()).abs().max())


def test_reference_matches_bitsandbytes():
    w = torch.randn(33, 64, device=DEVICE)
    q, qs = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(ref.dequantize_4bit(q, qs, torch.float32), F.dequantize_4bit(q, qs))


def test_opcheck():
    w = torch.randn(16, 64, device=DEVICE)
    for nested in (False, True):
        q, qs = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=nested)
        torch.library.opcheck(torch.ops.peftkern.dequantize_4bit.default, (q, *ops.state_args(qs), torch.float16))


def test_bad_state_raises():
    w = torch.randn(16, 64, device=DEVICE)
    q, qs = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    args = list(ops.state_args(qs))
    args[0] = args[0][:8]
    with pytest.raises(RuntimeError, match="16 entries"):
        torch.ops.peftkern.dequantize_4bit(q, *args, torch.float32)


@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_linear_4bit_equals_lora_linear_on_dequantised(backend, p):
    """Same seed, same backend: exactly lora_linear on the dequantised weight (forward and every gradient)."""
    torch.manual_seed(1)
    out_f, in_f, r = 48, 100, 3
    w = torch.randn(out_f, in_f, device=DEVICE)
    q, qs = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    wd = F.dequantize_4bit(q, qs)
    x = torch.randn(2, 37, in_f, device=DEVICE, requires_grad=True)
    a = torch.randn(r, in_f, device=DEVICE, requires_grad=True)
    b = torch.randn(out_f, r, device=DEVICE, requires_grad=True)
    bias = torch.randn(out_f, device=DEVICE)
    dy = torch.randn(2, 37, out_f, device=DEVICE)
    res = []
    with peftkern.use_backend(backend):
        for fn in (lambda: ops.lora_linear_4bit(x, q, qs, bias, a, b, 0.5, p),
                   lambda: lora_ops.lora_linear(x, wd, bias, a, b, 0.5, p)):
            torch.manual_seed(7)
            y = fn()
            gx, ga, gb = torch.autograd.grad(y, (x, a, b), dy)
            res.append((y, gx, ga, gb))
    for got, want in zip(*res):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_cuda_request_runs_triton_dequant(monkeypatch):
    """PEFTKERN_BACKEND=cuda: the dequantisation has no C++ kernel and runs Triton's (by design, not a fallback:
    no error under PEFTKERN_STRICT=1)."""
    seen = []
    monkeypatch.setattr(ops, "_triton", lambda: type("T", (), {"dequantize_4bit": staticmethod(
        lambda *a: seen.append(1) or ref.dequantize_4bit(*a))}))
    w = torch.randn(16, 64, device=DEVICE)
    q, qs = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
    with peftkern.use_backend("cuda"):
        got = ops.dequantize(q, qs, torch.float32)
    assert seen and torch.equal(got, F.dequantize_4bit(q, qs))
