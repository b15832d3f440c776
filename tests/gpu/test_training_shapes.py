"""Correctness at training shapes on the default GPU path of every op (benchmarks/gpu_check.sh, step a).

On a GPU: the backend peftkern picks by itself (auto; Triton where the CUDA extension is not built), bf16
activations with fp32 adapters as peft keeps them (fp16 in the rehearsal), Llama-1B projection shapes with
a ragged M = 4099.
Forward and every gradient against an fp64 reference on the same inputs, under the rule
err <= 2 x err(torch in the same dtype) + tiny; LoRA with dropout 0.1 and the kernel's own mask
(`peftkern.triton.lora.dropout_keep` materialises it), so a wrong mask or a wrong element fails.

Without a GPU these tests skip, unless PEFTKERN_REHEARSE=1 (gpu_check.sh --rehearse): then the same
checks run at tiny shapes on the Triton kernels under TRITON_INTERPRET=1, so the file cannot rot.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from _util import assert_close_rule

import peftkern
from peftkern.ops import bottleneck_adapter, ia3_linear, lora_linear, prefix_attention
from peftkern.ops.lora import draw_seed
from peftkern.reference import adapter as ref_adapter
from peftkern.reference import ia3 as ref_ia3
from peftkern.reference import lora as ref_lora
from peftkern.reference import prefix as ref_prefix

ON_GPU = torch.cuda.is_available()
REHEARSE = os.environ.get("PEFTKERN_REHEARSE", "0") == "1"
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
# The default path on a GPU is auto dispatch; on CPU auto means the torch reference, so the rehearsal
# names Triton (the interpreter runs it) to exercise the same kernels.
BACKEND = "auto" if ON_GPU else "triton"
# bf16 on the GPU. The rehearsal takes fp16: Triton's interpreter multiplies bf16 bits as integers in tl.dot
# (triton#11584) and truncates fp32 -> bf16 stores instead of rounding (twice torch's error, measured with
# Triton 3.8), so bf16 results there say nothing about the kernels.
BASE = torch.bfloat16 if ON_GPU else torch.float16

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (ON_GPU or REHEARSE),
                       reason="needs CUDA (PEFTKERN_REHEARSE=1 runs it at tiny shapes under the Triton interpreter)"),
    pytest.mark.usefixtures("poison_empty"),
]

# (GPU shape, rehearsal shape) per case.
M = 4099 if ON_GPU else 37
LORA = {"2048->2048": (2048, 2048), "8192->2048": (8192, 2048)} if ON_GPU else {"64->48": (64, 48), "96->48": (96, 48)}
IA3 = ({"kv 2048->512": (2048, 512, False), "ff 8192->2048": (8192, 2048, True)} if ON_GPU
       else {"kv 64->32": (64, 32, False), "ff 96->48": (96, 48, True)})
ADAPTER_D, ADAPTER_R = (2048, 64) if ON_GPU else (64, 8)
# (B, H, Hkv, L, S, P, D): Llama-3.2-1B attention (GQA 32/8, D=64) and Llama-2-7B's heads (D=128).
PREFIX = ({"gqa D=64": (2, 32, 8, 2048, 2048, 64, 64), "mha D=128": (1, 32, 32, 1024, 1024, 64, 128)} if ON_GPU
          else {"gqa D=64": (2, 4, 2, 40, 40, 8, 64), "mha D=32": (1, 2, 2, 33, 33, 5, 32)})


def _grads(y, gy, leaves):
    return torch.autograd.grad(y, leaves, gy)


def _compare(names, y, got, y64, want, y_same, same):
    assert torch.isfinite(y).all()
    assert_close_rule("y", y, y64, y_same)
    for name, g, g64, gs in zip(names, got, want, same):
        assert g.dtype == gs.dtype, (name, g.dtype, gs.dtype)
        assert_close_rule(name, g, g64, gs)


def _lora_mask(m, n, p, seed):
    from peftkern.triton.lora import dropout_keep

    return dropout_keep(m, n, p, seed, DEVICE)


@pytest.mark.parametrize("case", list(LORA))
def test_lora_dropout_fp32_adapters_on_half_base(case):
    d_in, d_out = LORA[case]
    r, p, s = 16 if ON_GPU else 4, 0.1, 2.0
    x = torch.randn(1, M, d_in, device=DEVICE, dtype=BASE).requires_grad_(True)
    w = (torch.randn(d_out, d_in, device=DEVICE) / math.sqrt(d_in)).to(BASE)  # frozen, no bias (Llama)
    a = (torch.randn(r, d_in, device=DEVICE) / math.sqrt(d_in)).requires_grad_(True)  # fp32, as peft keeps them
    b = (torch.randn(d_out, r, device=DEVICE) * 0.1).requires_grad_(True)
    leaves = [x, a, b]

    torch.manual_seed(1234)
    seed = int(draw_seed(p))
    keep = _lora_mask(M, d_in, p, seed).reshape(x.shape)
    assert 0.85 < keep.float().mean().item() < 0.95  # a real mask, at the rate asked
    torch.manual_seed(1234)  # the op draws the same seed
    with peftkern.use_backend(BACKEND):
        y = lora_linear(x, w, None, a, b, s, p)
        gy = torch.randn_like(y)
        got = _grads(y, gy, leaves)

    l64 = [t.detach().double().requires_grad_(True) for t in leaves]
    y64 = ref_lora.lora_linear(l64[0], w.double(), None, l64[1], l64[2], s, keep, p)
    want = _grads(y64, gy.double(), l64)
    y_same = ref_lora.lora_linear(x, w, None, a, b, s, keep, p)  # peft's computation in these dtypes
    same = _grads(y_same, gy, leaves)
    assert y.dtype == BASE and y.shape == (1, M, d_out)
    _compare(["dx", "dA", "dB"], y, got, y64, want, y_same, same)


@pytest.mark.parametrize("case", list(IA3))
def test_ia3_fp32_scale_on_half_base(case):
    d_in, d_out, ff = IA3[case]
    x = torch.randn(1, M, d_in, device=DEVICE, dtype=BASE).requires_grad_(True)
    w = (torch.randn(d_out, d_in, device=DEVICE) / math.sqrt(d_in)).to(BASE)
    n = d_in if ff else d_out
    sign = torch.randint(0, 2, (n,), device=DEVICE) * 2 - 1
    lv = (torch.empty(n, device=DEVICE).uniform_(0.5, 1.5) * sign).requires_grad_(True)  # fp32
    leaves = [x, lv]
    with peftkern.use_backend(BACKEND):
        y = ia3_linear(x, w, None, lv, ff)
        gy = torch.randn_like(y)
        got = _grads(y, gy, leaves)
    l64 = [t.detach().double().requires_grad_(True) for t in leaves]
    y64 = ref_ia3.ia3_linear(l64[0], w.double(), None, l64[1], ff)
    want = _grads(y64, gy.double(), l64)
    y_same = ref_ia3.ia3_linear(x, w, None, lv, ff)
    same = _grads(y_same, gy, leaves)
    assert y.dtype == BASE
    _compare(["dx", "dl"], y, got, y64, want, y_same, same)


@pytest.mark.parametrize("placement,act,residual,adapter_dtype", [
    ("houlsby", "relu", False, BASE),            # add_adapters' default: the adapter in the layer's dtype
    ("parallel", "silu", True, BASE),
    ("pfeiffer-fp32", "gelu", False, torch.float32),
])
def test_adapter(placement, act, residual, adapter_dtype):
    d, r, s = ADAPTER_D, ADAPTER_R, 0.5
    x = torch.randn(1, M, d, device=DEVICE, dtype=BASE).requires_grad_(True)
    prm = lambda *shape, scale: (torch.randn(*shape, device=DEVICE) * scale).to(adapter_dtype).requires_grad_(True)
    dw, db, uw, ub = prm(r, d, scale=d ** -0.5), prm(r, scale=0.1), prm(d, r, scale=r ** -0.5), prm(d, scale=0.1)
    res = torch.randn_like(x).requires_grad_(True) if residual else None
    leaves = [t for t in (x, dw, db, uw, ub, res) if t is not None]
    names = ["dx", "d_down_w", "d_down_b", "d_up_w", "d_up_b", "d_residual"][: len(leaves)]
    with peftkern.use_backend(BACKEND):
        y = bottleneck_adapter(x, dw, db, uw, ub, res, act, s)
        gy = torch.randn_like(y)
        got = _grads(y, gy, leaves)
    l64 = [t.detach().double().requires_grad_(True) for t in leaves]
    args64 = l64[:5] + [l64[5] if residual else None]
    y64 = ref_adapter.bottleneck_adapter(*args64, act, s)
    want = _grads(y64, gy.double(), l64)
    y_same = ref_adapter.bottleneck_adapter(x, dw, db, uw, ub, res, act, s)
    same = _grads(y_same, gy, leaves)
    assert y.dtype == BASE
    _compare(names, y, got, y64, want, y_same, same)


@pytest.mark.parametrize("case", list(PREFIX))
def test_prefix_shared_prefix_causal(case):
    B, H, Hkv, L, S, P, D = PREFIX[case]
    rnd = lambda *shape: torch.randn(*shape, device=DEVICE, dtype=BASE).requires_grad_(True)
    leaves = [rnd(B, H, L, D), rnd(B, Hkv, S, D), rnd(B, Hkv, S, D), rnd(Hkv, P, D), rnd(Hkv, P, D)]
    with peftkern.use_backend(BACKEND):
        out = prefix_attention(*leaves, causal=True)
        gout = torch.randn_like(out)
        got = _grads(out, gout, leaves)
    l64 = [t.detach().double().requires_grad_(True) for t in leaves]
    o64 = ref_prefix.attention(*l64, True)
    want = _grads(o64, gout.double(), l64)
    del l64
    o_same = ref_prefix.attention(*leaves, True)  # the same attention in bf16, scores materialized
    same = _grads(o_same, gout, leaves)
    assert out.dtype == BASE and out.shape == (B, H, L, D)
    _compare(["dq", "dk", "dv", "dprefix_k", "dprefix_v"], out, got, o64, want, o_same, same)
