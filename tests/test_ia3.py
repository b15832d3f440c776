"""peftkern::ia3_linear against an fp64 oracle and against peft's own IA3 layer: forward, every
gradient, both modes (output scale for k/v, input scale for feed-forward), every backend."""

from __future__ import annotations

import math

import pytest
import torch
from _util import DEVICE, DTYPES, assert_close_rule
from torch import nn

import peftkern
from peftkern.nn.ia3 import IA3Linear
from peftkern.ops.ia3 import ia3_linear
from peftkern.reference import ia3 as ref

BACKENDS = ["torch", "triton"] + (["cuda"] if DEVICE.type == "cuda" else [])
HALF = [d for d in DTYPES if d != torch.float32]


pytestmark = pytest.mark.usefixtures("poison_empty")


def make_inputs(lead, in_f, out_f, ff, dtype, l_dtype, bias=True, noncontig=False, base_grad=False, x_grad=True,
                l_grad=True):
    if noncontig:
        x = torch.randn(*lead, 2 * in_f, dtype=dtype, device=DEVICE)[..., ::2]
        assert not x.is_contiguous()
    else:
        x = torch.randn(*lead, in_f, dtype=dtype, device=DEVICE)
    x.requires_grad_(x_grad)
    w = (torch.randn(out_f, in_f, device=DEVICE) / math.sqrt(in_f)).to(dtype).requires_grad_(base_grad)
    b = torch.randn(out_f, device=DEVICE).to(dtype).requires_grad_(base_grad) if bias else None
    # |l| in [0.5, 1.5], both signs: the output case rebuilds Z = y / l (l must not be 0).
    n = in_f if ff else out_f
    sign = torch.randint(0, 2, (n,), device=DEVICE) * 2 - 1
    lv = (torch.empty(n, device=DEVICE).uniform_(0.5, 1.5) * sign).to(l_dtype).requires_grad_(l_grad)
    return x, w, b, lv


def grads_of(y, gy, tensors):
    return list(torch.autograd.grad(y, [t for t in tensors if t is not None and t.requires_grad], gy))


def check_case(backend, dtype, lead, in_f, out_f, ff, *, l_dtype=None, **kw):
    x, w, b, lv = make_inputs(lead, in_f, out_f, ff, dtype, l_dtype or dtype, **kw)
    tensors = [x, w, b, lv]
    with peftkern.use_backend(backend):
        y = ia3_linear(x, w, b, lv, ff)
        gy = torch.randn_like(y)
        got = grads_of(y, gy, tensors) if y.requires_grad else []

    t64 = [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in tensors]
    y64 = ref.ia3_linear(*t64, ff)
    y_same = ref.ia3_linear(x, w, b, lv, ff)  # peft's computation in the same dtypes
    assert y.dtype == dtype and y.shape == (*lead, out_f)
    assert_close_rule("y", y, y64, y_same)
    if not got:
        return
    want = grads_of(y64, gy.double(), t64)
    same = grads_of(y_same, gy, tensors)
    names = [n for n, t in zip(["dx", "dW", "db", "dl"], tensors) if t is not None and t.requires_grad]
    for name, g, g64, gs in zip(names, got, want, same):
        assert g.dtype == gs.dtype, (name, g.dtype, gs.dtype)
        assert_close_rule(name, g, g64, gs)


# ------------------------------------------------------------------ correctness


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ff", [False, True], ids=["out", "ff"])
def test_forward_backward(backend, dtype, ff):
    check_case(backend, dtype, (37,), 100, 72, ff)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("ff", [False, True], ids=["out", "ff"])
def test_fp32_l_on_half_base(backend, dtype, ff):
    """peft's default: ia3_l stays fp32 on a half base; the result keeps the base's dtype."""
    check_case(backend, dtype, (2, 19), 100, 72, ff, l_dtype=torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ff", [False, True], ids=["out", "ff"])
def test_no_bias_non_contiguous_3d(backend, ff):
    check_case(backend, torch.float32, (3, 7), 100, 72, ff, bias=False, noncontig=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ff", [False, True], ids=["out", "ff"])
def test_trainable_base(backend, ff):
    """Gradients reach weight and bias when the base is not frozen."""
    check_case(backend, torch.float32, (2, 11), 100, 72, ff, base_grad=True)


@pytest.mark.parametrize("ff", [False, True], ids=["out", "ff"])
@pytest.mark.parametrize("shape", [(131, 200, 150), (37, 40, 200)], ids=["wide", "tall"])
def test_several_tiles(ff, shape):
    """Several tiles in every dim with ragged edges, wide and tall layers."""
    m, in_f, out_f = shape
    check_case("triton", torch.float32, (m,), in_f, out_f, ff)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ff", [False, True], ids=["out", "ff"])
@pytest.mark.parametrize("which", ["only_l", "only_x"])
def test_partial_grads(backend, ff, which):
    """dl without dx (x needs no grad: no dx GEMM in the output case) and dx without dl (nothing saved)."""
    check_case(backend, torch.float32, (37,), 100, 72, ff, x_grad=which == "only_x", l_grad=which == "only_l")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ff", [False, True], ids=["out", "ff"])
def test_empty_batch(backend, ff):
    x, w, b, lv = make_inputs((0,), 100, 72, ff, torch.float32, torch.float32)
    with peftkern.use_backend(backend):
        y = ia3_linear(x, w, b, lv, ff)
        assert y.shape == (0, 72)
        y.sum().backward()
    assert x.grad.shape == (0, 100)
    assert torch.equal(lv.grad, torch.zeros_like(lv))


def test_peft_layout_of_l():
    """peft stores l as (out, 1) or (1, in); the wrapper takes it and the gradient reaches it."""
    x, w, b, lv = make_inputs((5,), 16, 12, False, torch.float32, torch.float32)
    l2 = lv.detach().reshape(12, 1).requires_grad_(True)
    with peftkern.use_backend("torch"):
        ia3_linear(x, w, b, l2).sum().backward()
    assert l2.grad.shape == (12, 1)


# ------------------------------------------------------------------ bad inputs


def _good():
    return dict(x=torch.randn(4, 16), weight=torch.randn(8, 16), bias=torch.randn(8), ia3_l=torch.randn(8),
                feedforward=False)


@pytest.mark.parametrize("change, err, match", [
    (dict(x=torch.randn(4, 15)), ValueError, "x has 15 features"),
    (dict(weight=torch.randn(8, 16, 1)), ValueError, "weight must be 2-D"),
    (dict(bias=torch.randn(7)), ValueError, "bias has shape"),
    (dict(ia3_l=torch.randn(16)), ValueError, r"ia3_l has shape \(16,\), expected \(8,\)"),
    (dict(feedforward=True), ValueError, r"ia3_l has shape \(8,\), expected \(16,\)"),
    (dict(ia3_l=torch.randn(8, 2)), ValueError, "ia3_l must be 1-D"),
    (dict(x=torch.randn(4, 16, dtype=torch.float64)), TypeError, "x must be float32"),
    (dict(x=torch.randn(4, 16).half()), TypeError, "x is torch.float16 but weight"),
    (dict(bias=torch.randn(8).half()), TypeError, "bias is torch.float16 but weight"),
    (dict(ia3_l=torch.randn(8).bfloat16()), TypeError, "ia3_l is torch.bfloat16"),
    (dict(feedforward=1), TypeError, "feedforward must be a bool"),
    (dict(x=[1.0]), TypeError, "x must be a torch.Tensor"),
    (dict(ia3_l=torch.randn(8, device="meta")), ValueError, "is on meta"),
])
def test_bad_inputs(change, err, match):
    with pytest.raises(err, match=match):
        ia3_linear(**(_good() | change))


# ------------------------------------------------------------------ torch.library / compile


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("ff", [False, True], ids=["out", "ff"])
def test_opcheck(backend, ff):
    x, w, b, lv = make_inputs((3, 5), 24, 20, ff, torch.float32, torch.float32)
    with peftkern.use_backend(backend):
        torch.library.opcheck(torch.ops.peftkern.ia3_linear.default, (x, w, b, lv, ff))
        dy = torch.randn(3, 5, 20, device=DEVICE)
        saved = x.detach() if ff else torch.randn(3, 5, 20, device=DEVICE)
        torch.library.opcheck(torch.ops.peftkern.ia3_linear_backward.default,
                              (dy, saved, w, lv.detach(), ff, True, True, backend))


def test_compile_fullgraph():
    x, w, b, l_out = make_inputs((2, 9), 32, 24, False, torch.float32, torch.float32)
    l_ff = torch.empty(24, device=DEVICE).uniform_(0.5, 1.5).requires_grad_(True)
    w2 = torch.randn(16, 24, device=DEVICE)

    def step(x, l_out, l_ff):  # a k/v-style layer feeding a feed-forward one
        h = ia3_linear(x, w, b, l_out)
        return ia3_linear(torch.relu(h), w2, None, l_ff, True).square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    with peftkern.use_backend("triton"):
        loss_c = compiled(x, l_out, l_ff)
        g_c = torch.autograd.grad(loss_c, [x, l_out, l_ff])
        loss_e = step(x, l_out, l_ff)
        g_e = torch.autograd.grad(loss_e, [x, l_out, l_ff])
    torch.testing.assert_close(loss_c, loss_e)
    for gc, ge in zip(g_c, g_e):
        torch.testing.assert_close(gc, ge)
    assert torch._dynamo.explain(step)(x, l_out, l_ff).graph_break_count == 0


# ------------------------------------------------------------------ nn module and peft parity


@pytest.mark.parametrize("ff", [False, True], ids=["out", "ff"])
def test_module_merge(ff):
    base = nn.Linear(40, 30).to(DEVICE)
    layer = IA3Linear(base, feedforward=ff)
    x = torch.randn(6, 40, device=DEVICE)
    torch.testing.assert_close(layer(x), base(x))  # l starts at ones
    with torch.no_grad():
        layer.ia3_l.uniform_(0.5, 1.5)
    w0, b0 = base.weight.clone(), base.bias.clone()
    with peftkern.use_backend("triton"):
        y = layer(x)
        layer.merge()
        assert layer.merged and not torch.equal(base.weight, w0)
        assert torch.equal(base.bias, b0) == ff  # only the output case scales the bias
        torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=1e-5)
        layer.unmerge()
        torch.testing.assert_close(base.weight, w0, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=1e-5)
        layer(x).sum().backward()
    assert layer.ia3_l.grad is not None and base.weight.grad is None


class _Block(nn.Module):
    """A k/v-style projection feeding a feed-forward one, named as peft's IA3 config expects."""

    def __init__(self, d, h):
        super().__init__()
        self.k_proj = nn.Linear(d, h)
        self.down_proj = nn.Linear(h, d)

    def forward(self, x):
        return self.down_proj(torch.relu(self.k_proj(x)))


def _peft_block(dtype, d=48, h=80):
    peft = pytest.importorskip("peft")
    net = peft.get_peft_model(_Block(d, h).to(device=DEVICE, dtype=dtype),
                              peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]))
    blk = net.base_model.model
    with torch.no_grad():
        for mod in (blk.k_proj, blk.down_proj):
            mod.ia3_l["default"].uniform_(0.5, 1.5)
    return net, blk


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_parity_with_peft(backend, dtype):
    """Same logits and grads as peft's IA3 layers (fp32 l on the base's dtype, peft's default)."""
    net, blk = _peft_block(dtype)
    x = torch.randn(3, 7, 48, device=DEVICE, dtype=dtype, requires_grad=True)
    y_peft = net(x)
    gy = torch.randn_like(y_peft)
    params = [x, blk.k_proj.ia3_l["default"], blk.down_proj.ia3_l["default"]]
    g_peft = torch.autograd.grad(y_peft, params, gy)

    def ours(x):
        k, d = blk.k_proj, blk.down_proj
        h = ia3_linear(x, k.base_layer.weight, k.base_layer.bias, k.ia3_l["default"])  # (out, 1) layout
        return ia3_linear(torch.relu(h), d.base_layer.weight, d.base_layer.bias, d.ia3_l["default"], True)

    with peftkern.use_backend(backend):
        y = ours(x)
        g = torch.autograd.grad(y, params, gy)
    assert y.dtype == y_peft.dtype == dtype
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(y, y_peft, **tol)
    for name, a, b in zip(["dx", "dl_k", "dl_ff"], g, g_peft):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, **tol, msg=lambda m, name=name: f"{name}: {m}")


# ------------------------------------------------------------------ memory


def _peft_layer(ff, d=256):
    peft = pytest.importorskip("peft")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.k_proj = nn.Linear(d, d)

        def forward(self, x):
            return self.k_proj(x)

    cfg = peft.IA3Config(target_modules=["k_proj"], feedforward_modules=["k_proj"] if ff else [])
    net = peft.get_peft_model(Net().to(torch.bfloat16), cfg)
    return net.base_model.model.k_proj, list(net.parameters())


@pytest.mark.parametrize("ff", [False, True], ids=["out", "ff"])
def test_saved_bytes_vs_peft(ff):
    """bf16 base, fp32 l (peft's default). Feed-forward: peft keeps an fp32 copy of x, we keep x.
    Output case: peft keeps Z = xWᵀ + b, we keep the output y itself (same size), so when a later
    op also saves y (attention saves V) peft holds two M×N tensors and we hold one."""
    from peftkern._memory import saved_bytes

    layer, params = _peft_layer(ff)
    base, lv = layer.base_layer, layer.ia3_l["default"]
    x = torch.randn(512, 256, dtype=torch.bfloat16, requires_grad=True)
    ours = lambda: ia3_linear(x, base.weight, base.bias, lv, ff)
    with peftkern.use_backend("torch"):
        peft_b, ours_b = saved_bytes(lambda: layer(x), params), saved_bytes(ours, params)
        if ff:
            assert ours_b == x.numel() * 2 and ours_b <= 0.5 * peft_b, (ours_b, peft_b)
            return
        assert ours_b == 512 * 256 * 2 and ours_b < peft_b, (ours_b, peft_b)
        v = torch.randn(256, dtype=torch.bfloat16, requires_grad=True)  # a consumer that saves y
        peft_b = saved_bytes(lambda: layer(x) * v, params)
        ours_b = saved_bytes(lambda: ours() * v, params)
    assert ours_b <= 0.51 * peft_b, (ours_b, peft_b)


# ------------------------------------------------------------------ determinism


@pytest.mark.parametrize("ff", [False, True], ids=["out", "ff"])
def test_dl_deterministic(ff):
    """dl is reduced through fixed partials, no atomics: two runs agree bit for bit."""
    x, w, b, lv = make_inputs((131,), 64, 48, ff, torch.float32, torch.float32)
    gy = torch.randn(131, 48, device=DEVICE)
    with peftkern.use_backend("triton"):
        g1 = torch.autograd.grad(ia3_linear(x, w, b, lv, ff), [x, lv], gy)
        g2 = torch.autograd.grad(ia3_linear(x, w, b, lv, ff), [x, lv], gy)
    assert all(torch.equal(a, c) for a, c in zip(g1, g2))
