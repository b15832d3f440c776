"""peftkern::bottleneck_adapter against the fp64 reference: forward, every gradient, every backend."""

from __future__ import annotations

import math

import pytest
import torch
from _util import DEVICE, DTYPES, assert_close_rule

import peftkern
from peftkern.nn.adapter import BottleneckAdapter
from peftkern.ops.adapter import bottleneck_adapter
from peftkern.reference import adapter as ref

ACTS = ["relu", "gelu", "gelu_tanh", "silu"]
BACKENDS = ["torch", "triton"]


pytestmark = pytest.mark.usefixtures("poison_empty")


def make_inputs(lead, d, r, dtype, adapter_dtype=None, residual=False, bias=True, noncontig=False, grads="all"):
    adapter_dtype = adapter_dtype or dtype
    if noncontig:
        x = torch.randn(*lead, 2 * d, dtype=dtype, device=DEVICE)[..., ::2]
    else:
        x = torch.randn(*lead, d, dtype=dtype, device=DEVICE)
    p = lambda *s, scale=1.0: (torch.randn(*s, device=DEVICE) * scale).to(adapter_dtype)
    dw, uw = p(r, d, scale=1 / math.sqrt(d)), p(d, r, scale=1 / math.sqrt(r))
    db, ub = (p(r), p(d)) if bias else (None, None)
    res = torch.randn(*lead, d, dtype=dtype, device=DEVICE) if residual else None
    if noncontig and residual:
        res = torch.randn(*lead, d, 3, dtype=dtype, device=DEVICE)[..., 1]
    tensors = [x, dw, db, uw, ub, res]
    for i, t in enumerate(tensors):
        if t is not None and (grads == "all" or (grads == "params" and i in (1, 2, 3, 4)) or (grads == "x" and i == 0)):
            t.requires_grad_(True)
    return tensors


def grads_of(y, gy, tensors):
    return list(torch.autograd.grad(y, [t for t in tensors if t is not None and t.requires_grad], gy))


def check_case(backend, dtype, lead, d, r, act="gelu", *, residual=False, adapter_dtype=None, bias=True,
               noncontig=False, grads="all", scaling=0.7):
    tensors = make_inputs(lead, d, r, dtype, adapter_dtype, residual, bias, noncontig, grads)
    with peftkern.use_backend(backend):
        y = bottleneck_adapter(*tensors, act, scaling)
        gy = torch.randn_like(y)
        got = grads_of(y, gy, tensors)

    t64 = [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in tensors]
    y64 = ref.bottleneck_adapter(*t64, act, scaling)
    want = grads_of(y64, gy.double(), t64)
    y_same = ref.bottleneck_adapter(*tensors, act, scaling)  # torch in the same dtypes
    same = grads_of(y_same, gy, tensors)

    assert y.dtype == dtype and y.shape == tensors[0].shape
    assert_close_rule("y", y, y64, y_same)
    names = [n for n, t in zip(["dx", "d_down_w", "d_down_b", "d_up_w", "d_up_b", "d_residual"], tensors)
             if t is not None and t.requires_grad]
    for name, g, g64, gs in zip(names, got, want, same):
        assert g.dtype == gs.dtype, name
        assert_close_rule(name, g, g64, gs)


# ------------------------------------------------------------------ correctness


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("r", [1, 8, 64])
def test_activations_and_ranks(backend, dtype, act, r):
    # Serial for odd r, parallel (separate residual) for r = 8: both paths see every activation.
    check_case(backend, dtype, (37,), 96, r, act, residual=(r == 8))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("residual", [False, True])
def test_3d_noncontiguous_no_bias(backend, dtype, residual):
    check_case(backend, dtype, (3, 13), 96, 16, "silu", residual=residual, noncontig=True, bias=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [d for d in DTYPES if d != torch.float32], ids=str)
def test_fp32_adapter_on_half_x(backend, dtype):
    """fp32 adapters on a half x compute in fp32; the result and dx keep x's dtype, param grads are fp32."""
    check_case(backend, dtype, (2, 19), 96, 8, "gelu_tanh", residual=True, adapter_dtype=torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grads", ["params", "x"])
def test_partial_grads(backend, grads):
    """Only the adapter trains (x is a frozen activation), or only x needs a gradient (frozen adapter)."""
    check_case(backend, torch.float32, (29,), 96, 8, "relu", grads=grads)
    check_case(backend, torch.float32, (29,), 96, 8, "relu", residual=True, grads=grads)


def test_r_blocked(monkeypatch):
    """r above the register tile: z and dz are blocked over r through global memory."""
    from peftkern.triton import adapter as tri

    monkeypatch.setattr(tri, "MAX_BLOCK_R", 16)
    assert tri.r_blocks(40) == (16, 3)
    check_case("triton", torch.float32, (37,), 96, 40, "gelu", residual=True)
    check_case("triton", torch.float32, (2, 20), 96, 40, "silu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_larger_tiles(backend):
    """Several row and d tiles (and two M splits in the weight-gradient kernel) with ragged edges."""
    check_case(backend, torch.float32, (150,), 200, 24, "gelu")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("residual", [False, True])
def test_empty_batch(backend, residual):
    x, dw, db, uw, ub, res = make_inputs((0, 3), 96, 8, torch.float32, residual=residual)
    with peftkern.use_backend(backend):
        y = bottleneck_adapter(x, dw, db, uw, ub, res, "gelu", 0.5)
        assert y.shape == (0, 3, 96)
        y.sum().backward()
    assert x.grad.shape == x.shape
    for p in (dw, db, uw, ub):
        assert torch.equal(p.grad, torch.zeros_like(p))


# ------------------------------------------------------------------ bad inputs


def _good():
    return dict(x=torch.randn(4, 16), down_weight=torch.randn(4, 16), down_bias=torch.randn(4),
                up_weight=torch.randn(16, 4), up_bias=torch.randn(16), residual=None, activation="relu", scaling=1.0)


@pytest.mark.parametrize("change, err, match", [
    (dict(x=torch.randn(4, 15)), ValueError, r"down_weight has shape \(4, 16\), expected \(r, 15\)"),
    (dict(down_weight=torch.randn(4, 16, 1)), ValueError, "down_weight must be 2-D"),
    (dict(up_weight=torch.randn(4, 16)), ValueError, r"up_weight has shape \(4, 16\), expected \(16, 4\)"),
    (dict(down_bias=torch.randn(5)), ValueError, "down_bias has shape"),
    (dict(up_bias=torch.randn(15)), ValueError, "up_bias has shape"),
    (dict(down_weight=torch.randn(0, 16), up_weight=torch.randn(16, 0), down_bias=torch.randn(0)), ValueError,
     "bottleneck r must be >= 1"),
    (dict(residual=torch.randn(4, 17)), ValueError, "residual has shape"),
    (dict(residual=torch.randn(4, 16).half()), TypeError, "residual is torch.float16 but x"),
    (dict(x=torch.randn(4, 16, dtype=torch.float64)), TypeError, "x must be float32"),
    (dict(up_bias=torch.randn(16).half()), TypeError, "up_bias is torch.float16 but down_weight"),
    (dict(x=torch.randn(4, 16).half(), residual=None, **{k: v.bfloat16() for k, v in _good().items()
                                                       if k in ("down_weight", "down_bias", "up_weight", "up_bias")}),
     TypeError, "adapter tensors are torch.bfloat16 but x is torch.float16"),
    (dict(activation="tanh"), ValueError, "activation must be one of"),
    (dict(scaling=torch.tensor(1.0)), TypeError, "scaling must be"),
    (dict(x=[1.0]), TypeError, "x must be a torch.Tensor"),
    (dict(up_weight=torch.randn(16, 4, device="meta")), ValueError, "is on meta"),
])
def test_bad_inputs(change, err, match):
    with pytest.raises(err, match=match):
        bottleneck_adapter(**(_good() | change))


def test_strict_mode_refuses_fallback():
    """PEFTKERN_STRICT=1 (set by conftest): asking for a backend that cannot take the call raises."""
    if DEVICE.type == "cuda":
        pytest.skip("on a GPU the cuda backend may be built")
    x, dw, db, uw, ub, _ = make_inputs((5,), 32, 4, torch.float32)
    with pytest.raises(peftkern.BackendUnavailable, match="cuda"), peftkern.use_backend("cuda"):
        bottleneck_adapter(x, dw, db, uw, ub)


# ------------------------------------------------------------------ torch.library / compile


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("residual", [False, True])
def test_opcheck(backend, residual):
    x, dw, db, uw, ub, res = make_inputs((3, 5), 24, 4, torch.float32, residual=residual)
    with peftkern.use_backend(backend):
        torch.library.opcheck(torch.ops.peftkern.bottleneck_adapter.default, (x, dw, db, uw, ub, res, "gelu", 0.5))
        dy = torch.randn(3, 5, 24, device=DEVICE)
        z = torch.randn(15, 4, device=DEVICE)
        for need_dx, need_params in ((True, True), (False, True), (True, False)):
            torch.library.opcheck(torch.ops.peftkern.bottleneck_adapter_backward.default,
                                  (dy, x.detach(), z, dw.detach(), uw.detach(), "silu", 0.5, residual, need_dx,
                                   need_params, backend))


def test_compile_fullgraph():
    x, dw, db, uw, ub, res = make_inputs((2, 9), 32, 4, torch.float32, residual=True)

    def step(x, dw, db, uw, ub, res):
        return bottleneck_adapter(x, dw, db, uw, ub, res, "gelu", 0.5).square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    args = (x, dw, db, uw, ub, res)
    with peftkern.use_backend("triton"):
        loss_c = compiled(*args)
        g_c = torch.autograd.grad(loss_c, args)
        loss_e = step(*args)
        g_e = torch.autograd.grad(loss_e, args)
        explained = torch._dynamo.explain(step)(*args)
    torch.testing.assert_close(loss_c, loss_e)
    for gc, ge in zip(g_c, g_e):
        torch.testing.assert_close(gc, ge)
    assert explained.graph_break_count == 0


# ------------------------------------------------------------------ nn module


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_starts_as_identity_and_trains(backend):
    layer = BottleneckAdapter(40, 6, "gelu", 2.0, device=DEVICE)
    x = torch.randn(5, 7, 40, device=DEVICE)
    res = torch.randn_like(x)
    with peftkern.use_backend(backend):
        assert torch.equal(layer(x), x) and torch.equal(layer(x, residual=res), res)
        layer(x).square().sum().backward()
    assert layer.up_weight.grad.abs().sum() > 0 and layer.up_bias.grad.abs().sum() > 0
    assert sum(p.numel() for p in layer.parameters()) == 2 * 40 * 6 + 6 + 40


# ------------------------------------------------------------------ memory


@pytest.mark.parametrize("act, pdt", [("gelu", torch.bfloat16), ("relu", torch.bfloat16), ("gelu", torch.float32)])
def test_saved_bytes_vs_eager(act, pdt):
    """Backward keeps x and z = x W_dᵀ + b_d only; the eager composition also keeps act(z) (and z for
    gelu), and an fp32 adapter on a bf16 x keeps the fp32 copy of x."""
    from peftkern._memory import saved_bytes

    d, r, m = 256, 16, 512
    x = torch.randn(m, d, dtype=torch.bfloat16, requires_grad=True)
    params = make_inputs((1,), d, r, pdt)[1:5]
    ours = saved_bytes(lambda: bottleneck_adapter(x, *params, None, act, 1.0), params)
    eager = saved_bytes(lambda: ref.bottleneck_adapter(x, *params, None, act, 1.0), params)
    z_bytes = m * r * ref.compute_dtype(x.dtype, pdt).itemsize
    assert ours == x.numel() * x.element_size() + z_bytes, ours
    assert ours <= eager if act == "relu" else ours < eager, (ours, eager)


def test_backward_runs_on_the_forwards_backend(monkeypatch):
    """The backward follows the forward's backend even where autograd runs it outside the context."""
    from peftkern.ops import adapter as adapter_op

    calls = []
    real = adapter_op.ref.bottleneck_adapter_bwd
    monkeypatch.setattr(adapter_op.ref, "bottleneck_adapter_bwd", lambda *a: calls.append(1) or real(*a))
    x, dw, db, uw, ub, res = make_inputs((5,), 24, 4, torch.float32)
    with peftkern.use_backend("torch"):
        y = bottleneck_adapter(x, dw, db, uw, ub)
    with peftkern.use_backend("triton"):
        y.sum().backward()
    assert calls == [1]
