"""peftkern::lora_linear against the fp64 reference: forward, every gradient, every backend."""

from __future__ import annotations

import math

import pytest
import torch
from _util import DEVICE, DTYPES, assert_close_rule
from torch import nn

import peftkern
from peftkern.ops.lora import draw_seed
from peftkern.reference import lora as ref

pytestmark = pytest.mark.usefixtures("poison_empty")


def keep_mask(backend: str, m: int, n: int, p: float, seed: int) -> torch.Tensor:
    """The dropout mask `backend` draws for `seed` (each backend has its own generator)."""
    if backend == "triton":
        from peftkern.triton.lora import dropout_keep

        return dropout_keep(m, n, p, seed, DEVICE)
    return ref.dropout_keep((m, n), p, seed, DEVICE)


def make_inputs(lead, in_f, out_f, r, dtype, adapter_dtype, bias, noncontig=False, base_grad=False):
    if noncontig:
        x = torch.randn(*lead, 2 * in_f, dtype=dtype, device=DEVICE)[..., ::2]
        assert not x.is_contiguous()
    else:
        x = torch.randn(*lead, in_f, dtype=dtype, device=DEVICE)
    x.requires_grad_(True)
    w = (torch.randn(out_f, in_f, device=DEVICE) / math.sqrt(in_f)).to(dtype).requires_grad_(base_grad)
    b = torch.randn(out_f, device=DEVICE).to(dtype).requires_grad_(base_grad) if bias else None
    a = (torch.randn(r, in_f, device=DEVICE) / math.sqrt(in_f)).to(adapter_dtype).requires_grad_(True)
    bb = torch.randn(out_f, r, device=DEVICE).to(adapter_dtype).requires_grad_(True)
    return x, w, b, a, bb


def grads_of(y, gy, tensors):
    gs = torch.autograd.grad(y, [t for t in tensors if t is not None and t.requires_grad], gy)
    return list(gs)


def check_case(backend, dtype, lead, in_f, out_f, r, *, bias=True, p=0.0, adapter_dtype=None,
               noncontig=False, base_grad=False, scaling=0.7):
    adapter_dtype = adapter_dtype or dtype
    x, w, b, a, bb = make_inputs(lead, in_f, out_f, r, dtype, adapter_dtype, bias, noncontig, base_grad)
    tensors = [x, w, b, a, bb]
    m = x.numel() // in_f

    torch.manual_seed(1234)
    seed = draw_seed(p)
    keep = None if p == 0.0 else keep_mask(backend, m, in_f, p, int(seed)).reshape(x.shape)

    torch.manual_seed(1234)  # the op draws the same seed
    with peftkern.use_backend(backend):
        y = peftkern.ops.lora_linear(x, w, b, a, bb, scaling, p)
        gy = torch.randn_like(y)
        got = grads_of(y, gy, tensors)

    t64 = [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in tensors]
    y64 = ref.lora_linear(*t64, scaling, keep, p)
    want = grads_of(y64, gy.double(), t64)
    # PyTorch in the same dtypes (for a half base with fp32 adapters: exactly peft's computation).
    y_same = ref.lora_linear(x, w, b, a, bb, scaling, keep, p)
    same = grads_of(y_same, gy, tensors)

    assert y.dtype == dtype and y.shape == (*lead, out_f)
    assert_close_rule("y", y, y64, y_same)
    names = [n for n, t in zip(["dx", "dW", "db", "dA", "dB"], tensors) if t is not None and t.requires_grad]
    for name, g, g64, gs in zip(names, got, want, same):
        assert_close_rule(name, g, g64, gs)


# ------------------------------------------------------------------ correctness


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("r", [1, 8, 16, 64])
def test_shapes_and_ranks(backend, dtype, r):
    check_case(backend, dtype, (37,), 100, 72, r)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5])
def test_bias_and_dropout(backend, dtype, bias, p):
    check_case(backend, dtype, (3, 13), 100, 72, 8, bias=bias, p=p)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [d for d in DTYPES if d != torch.float32], ids=str)
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_fp32_adapters_on_half_base(backend, dtype, p):
    """peft's default: adapters stay fp32 on a half base; the result keeps the base's dtype."""
    check_case(backend, dtype, (2, 19), 100, 72, 16, adapter_dtype=torch.float32, p=p)


@pytest.mark.parametrize("mode", ["fused", "cublas"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_triton_gemm_modes(mode, dtype, p, monkeypatch):
    """Both ways the Triton backend runs the big GEMMs: fused (LoRA term in the GEMM) and cuBLAS
    followed by the in-place LoRA epilogue pass."""
    monkeypatch.setenv("PEFTKERN_LORA_GEMM", mode)
    check_case("triton", dtype, (3, 13), 100, 72, 8, p=p, adapter_dtype=torch.float32)
    check_case("triton", dtype, (40,), 64, 130, 4, p=p, bias=False)


def test_gemm_mode_env_is_checked(monkeypatch):
    from peftkern.triton.lora import gemm_mode

    monkeypatch.setenv("PEFTKERN_LORA_GEMM", "cutlass")
    with pytest.raises(ValueError, match="PEFTKERN_LORA_GEMM"):
        gemm_mode(torch.device("cpu"))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_non_contiguous_x(backend):
    check_case(backend, torch.float32, (37,), 100, 72, 8, noncontig=True, p=0.1)
    check_case(backend, torch.float32, (3, 7), 64, 48, 4, noncontig=True)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_trainable_base(backend, p):
    """Gradients reach weight and bias when the base is not frozen."""
    check_case(backend, torch.float32, (2, 11), 100, 72, 8, base_grad=True, p=p)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_larger_tiles(backend):
    """Shapes spanning several tiles in every dim, with ragged edges."""
    check_case(backend, torch.float32, (131,), 200, 150, 32, p=0.1)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_batch(backend):
    x = torch.randn(0, 100, device=DEVICE, requires_grad=True)
    w = torch.randn(72, 100, device=DEVICE)
    a = torch.randn(8, 100, device=DEVICE, requires_grad=True)
    bb = torch.randn(72, 8, device=DEVICE, requires_grad=True)
    with peftkern.use_backend(backend):
        y = peftkern.ops.lora_linear(x, w, None, a, bb, 2.0, 0.1)
        assert y.shape == (0, 72)
        y.sum().backward()
    assert x.grad.shape == (0, 100)
    assert torch.equal(a.grad, torch.zeros_like(a)) and torch.equal(bb.grad, torch.zeros_like(bb))


def test_x_without_grad_skips_dx():
    x = torch.randn(5, 32, device=DEVICE)
    w = torch.randn(24, 32, device=DEVICE)
    a = torch.randn(4, 32, device=DEVICE, requires_grad=True)
    bb = torch.randn(24, 4, device=DEVICE, requires_grad=True)
    with peftkern.use_backend("triton"):
        peftkern.ops.lora_linear(x, w, None, a, bb, 1.0).sum().backward()
    assert a.grad is not None and bb.grad is not None and x.grad is None


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_frozen_adapters_skip_their_reductions(backend, p, monkeypatch):
    """Frozen adapters (another adapter trains, or only the input needs a gradient): dx still equals
    the reference with the forward's mask, and no dA / dB reduction over M runs."""
    import peftkern.triton.lora as tri

    calls = []
    for mod, name in ((tri, "adapter_grad"), (ref, "dropout_keep")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    x, w, b, a, bb = make_inputs((3, 7), 40, 24, 4, torch.float32, torch.float32, True)
    a.requires_grad_(False)
    bb.requires_grad_(False)
    dy = torch.randn(3, 7, 24, device=DEVICE)
    with peftkern.use_backend(backend):
        torch.manual_seed(5)
        seed = draw_seed(p)
        torch.manual_seed(5)
        peftkern.ops.lora_linear(x, w, b, a, bb, 0.5, p).backward(dy)
    keep = keep_mask(backend, 21, 40, p, int(seed)) if p else torch.ones(21, 40, dtype=torch.bool, device=DEVICE)
    lora_dx = ((dy.reshape(21, 24).double() @ bb.double()) * 0.5 @ a.double()) * keep.double() / (1 - p)
    want = dy.reshape(21, 24).double() @ w.double() + lora_dx
    torch.testing.assert_close(x.grad.reshape(21, 40).double(), want, atol=1e-4, rtol=1e-4)
    assert "adapter_grad" not in calls and a.grad is None and bb.grad is None


# ------------------------------------------------------------------ dropout semantics


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_dropout_reproducible_and_rate(backend):
    x = torch.randn(64, 256, device=DEVICE)
    w = torch.zeros(64, 256, device=DEVICE)
    a = torch.eye(256, device=DEVICE)[:64].contiguous()
    bb = torch.eye(64, device=DEVICE)
    with peftkern.use_backend(backend):
        torch.manual_seed(7)
        y1 = peftkern.ops.lora_linear(x, w, None, a, bb, 1.0, 0.25)
        torch.manual_seed(7)
        y2 = peftkern.ops.lora_linear(x, w, None, a, bb, 1.0, 0.25)
        y3 = peftkern.ops.lora_linear(x, w, None, a, bb, 1.0, 0.25)
    assert torch.equal(y1, y2), "torch.manual_seed must reproduce the dropout mask"
    assert not torch.equal(y1, y3), "a new call draws a new mask"
    kept = y1 != 0  # y = drop(x)[:, :64] exactly
    assert abs(kept.float().mean().item() - 0.75) < 0.03
    torch.testing.assert_close(y1[kept], x[:, :64][kept] / 0.75)


# ------------------------------------------------------------------ bad inputs


def _good():
    return dict(x=torch.randn(4, 16), weight=torch.randn(8, 16), bias=torch.randn(8),
                lora_A=torch.randn(2, 16), lora_B=torch.randn(8, 2), scaling=1.0, dropout_p=0.0)


@pytest.mark.parametrize("change, err, match", [
    (dict(x=torch.randn(4, 15)), ValueError, "x has 15 features"),
    (dict(weight=torch.randn(8, 16, 1)), ValueError, "weight must be 2-D"),
    (dict(bias=torch.randn(7)), ValueError, "bias has shape"),
    (dict(lora_A=torch.randn(2, 15)), ValueError, "lora_A has shape"),
    (dict(lora_B=torch.randn(8, 3)), ValueError, "lora_B has shape"),
    (dict(lora_A=torch.randn(0, 16), lora_B=torch.randn(8, 0)), ValueError, "rank r=0"),
    (dict(x=torch.randn(4, 16, dtype=torch.float64)), TypeError, "x must be float32"),
    (dict(x=torch.randn(4, 16).half()), TypeError, "x is torch.float16 but weight"),
    (dict(lora_B=torch.randn(8, 2).half()), TypeError, "lora_A is torch.float32 but lora_B"),
    (dict(dropout_p=1.0), ValueError, "dropout_p must be"),
    (dict(dropout_p=-0.1), ValueError, "dropout_p must be"),
    (dict(scaling=torch.tensor(1.0)), TypeError, "scaling must be"),
    (dict(x=[1.0]), TypeError, "x must be a torch.Tensor"),
    (dict(x=torch.randn(4, 16, device="meta")), ValueError, "is on meta"),
])
def test_bad_inputs(change, err, match):
    kw = _good() | change
    with pytest.raises(err, match=match):
        peftkern.ops.lora_linear(**kw)


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown peftkern backend"), peftkern.use_backend("tpu"):
        pass


# ------------------------------------------------------------------ torch.library / compile


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_opcheck(backend, p):
    x, w, b, a, bb = make_inputs((3, 5), 24, 20, 4, torch.float32, torch.float32, True)
    seed = torch.tensor(123) if p else None
    with peftkern.use_backend(backend):
        torch.library.opcheck(torch.ops.peftkern.lora_linear.default, (x, w, b, a, bb, 0.5, p, seed))
        dy = torch.randn(3, 5, 20, device=DEVICE)
        t = torch.randn(15, 4, device=DEVICE)
        torch.library.opcheck(torch.ops.peftkern.lora_linear_backward.default,
                              (dy, x.detach(), w, a.detach(), bb.detach(), t, 0.5, p, seed, True, True, backend))
        torch.library.opcheck(torch.ops.peftkern.lora_linear_backward.default,
                              (dy, x.detach(), w, a.detach(), bb.detach(), t, 0.5, p, seed, True, False, backend))


def test_compile_fullgraph():
    x, w, b, a, bb = make_inputs((2, 9), 32, 24, 4, torch.float32, torch.float32, True)

    def step(x, a, bb):
        return peftkern.ops.lora_linear(x, w, b, a, bb, 0.5, 0.1).square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    with peftkern.use_backend("triton"):
        torch.manual_seed(3)
        loss_c = compiled(x, a, bb)
        g_c = torch.autograd.grad(loss_c, [x, a, bb])
        torch.manual_seed(3)
        loss_e = step(x, a, bb)
        g_e = torch.autograd.grad(loss_e, [x, a, bb])
    # The eager fp32 path folds 1/(1-p)·s into its mask, the op's torch backend scales t: the same mask, another
    # association of the scalings, so fp32 rounding apart (both are checked against fp64 elsewhere).
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
    for gc, ge in zip(g_c, g_e):
        torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-4)
    explained = torch._dynamo.explain(step)(x, a, bb)
    assert explained.graph_break_count == 0


# ------------------------------------------------------------------ nn module


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_lora_linear_module_merge(backend):
    base = nn.Linear(40, 30).to(DEVICE)
    layer = peftkern.nn.LoraLinear(base, r=4, lora_alpha=8, dropout=0.1)
    x = torch.randn(6, 40, device=DEVICE)
    torch.testing.assert_close(layer.eval()(x), base(x))  # B starts at zero
    with torch.no_grad():
        layer.lora_B.normal_()
    with peftkern.use_backend(backend):
        y = layer.eval()(x)
        layer.merge()
        torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=1e-5)
        layer.unmerge()
        torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=1e-5)
        layer.train()(x).sum().backward()
    assert layer.lora_A.grad is not None and base.weight.grad is None


# ------------------------------------------------------------------ memory


def test_saved_bytes_half_of_peft():
    """With dropout 0.1 peft saves x, the fp32 copy of x, its dropout mask and output, and xAᵀ;
    peftkern saves x, t = drop(x)Aᵀ and a seed."""
    peft = pytest.importorskip("peft")
    from peftkern._memory import saved_bytes

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(256, 256)

        def forward(self, x):
            return self.proj(x)

    net = peft.get_peft_model(Net().to(torch.bfloat16),
                              peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.1, target_modules=["proj"]))
    layer = net.base_model.model.proj
    x = torch.randn(512, 256, dtype=torch.bfloat16, requires_grad=True)
    params = list(net.parameters())
    peft_bytes = saved_bytes(lambda: layer(x), params)
    a, bb = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    ours = saved_bytes(lambda: peftkern.ops.lora_linear(
        x, layer.base_layer.weight, layer.base_layer.bias, a, bb, layer.scaling["default"], 0.1), params)
    assert ours <= 0.5 * peft_bytes, (ours, peft_bytes)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_mask_same_in_every_kernel(p):
    """Each Triton kernel that applies dropout (forward shrink, dx GEMM, dA reduction, the cuBLAS-path
    epilogue) must draw exactly the mask `dropout_keep` materializes, whatever its tile sizes."""
    from peftkern.triton import lora as tri

    m, n, seed = 37, 101, 4321  # ragged in both dims, not a multiple of 4 or of any tile
    keep = tri.dropout_keep(m, n, p, seed, DEVICE).float()
    ones = torch.ones(m, n, device=DEVICE)
    eye = torch.eye(n, device=DEVICE)
    eye_m = torch.eye(m, device=DEVICE)
    prec = "ieee"
    # shrink: t = drop(1) · Iᵀ / (1-p)... with scale 1 the kept entries are exactly 1.
    t = tri.shrink(ones, eye.stride(), eye, n, 1.0, p, seed, prec)
    torch.testing.assert_close(t, keep, rtol=0, atol=0)
    # adapter_grad: P[k, r] = Σ_m drop(1)[m, k] · I[m, r] = keep[r, k].
    torch.testing.assert_close(tri.adapter_grad(ones, eye_m, 1.0, p, seed, prec).t(), keep, rtol=0, atol=0)
    # GEMM epilogue (dx path) and the in-place epilogue: lora term = 1 everywhere, masked.
    col = torch.ones(m, 1, device=DEVICE)
    row = torch.ones(n, 1, device=DEVICE)
    zeros = torch.zeros(m, 16, device=DEVICE)
    w = torch.zeros(n, 16, device=DEVICE)
    out = tri.gemm_lora(zeros, w, w.stride(), col, row, row.stride(), None, torch.float32, n, 1.0, p, seed)
    torch.testing.assert_close(out, keep, rtol=0, atol=0)
    out = tri.lora_epilogue_(torch.zeros(m, n, device=DEVICE), col, row, row.stride(), None, 1.0, p, seed)
    torch.testing.assert_close(out, keep, rtol=0, atol=0)
    assert 0.0 < keep.mean().item() < 1.0


def test_backward_runs_on_the_forwards_backend(monkeypatch):
    """The backward follows the forward's backend even where autograd runs it outside the context. (An fp16 base: fp32
    calls on the torch backend take their own node, _LoraLinearEagerFp32 or the host extension's, torch only.)"""
    from peftkern.ops import lora as lora_op

    calls = []
    real = lora_op.ref.lora_linear_bwd
    monkeypatch.setattr(lora_op.ref, "lora_linear_bwd", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, w, b, a, bb = make_inputs((5,), 24, 20, 4, torch.float16, torch.float32, True)
    with peftkern.use_backend("torch"):
        y = peftkern.ops.lora_linear(x, w, b, a, bb, 0.5, 0.1)
    with peftkern.use_backend("triton"):
        y.sum().backward()
    assert calls == [1]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("r", [192, 256, 512])
def test_large_ranks(backend, r, p):
    """Ranks past one 128-wide tile: the Triton kernels take them in chunks (forward, every gradient, the kernel's
    own dropout mask). Small in/out keep the interpreter fast, so r also exceeds min(in, out) there; r = 256 runs
    on a layer wider than the rank too."""
    check_case(backend, torch.float32, (3, 7), 40, 36, r, p=p)
    if r == 256:
        check_case(backend, torch.float32, (13,), 300, 280, r, p=p)


@pytest.mark.parametrize("mode", ["fused", "cublas"])
def test_large_rank_both_gemm_modes(mode, monkeypatch):
    """The chunked prologue (fused GEMM) and the chunked epilogue pass (cuBLAS mode), fp16 base, fp32 adapters,
    with the deterministic backward (shrink + adapter_grad instead of the one-pass dy kernel) as well."""
    monkeypatch.setenv("PEFTKERN_LORA_GEMM", mode)
    check_case("triton", torch.float16, (19,), 40, 36, 200, p=0.1, adapter_dtype=torch.float32)
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        check_case("triton", torch.float32, (19,), 40, 36, 300, p=0.1, bias=False)
    finally:
        torch.use_deterministic_algorithms(old, warn_only=True)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_rank_above_min_in_out(backend, p):
    """peft accepts any rank, r > min(in, out) included (the product is then not full rank): so does the op."""
    check_case(backend, torch.float32, (5, 3), 16, 24, 32, p=p)
    check_case(backend, torch.float32, (9,), 24, 16, 20, p=p, bias=False)


def test_large_rank_stays_on_triton(monkeypatch):
    """r = 130 used to fall back to the torch reference; now the Triton kernels run it and nothing is logged."""
    import logging

    from peftkern.ops import lora as lora_op

    monkeypatch.delenv("PEFTKERN_STRICT")
    for name in ("lora_linear_fwd", "lora_linear_bwd"):
        monkeypatch.setattr(lora_op.ref, name, lambda *a, _n=name, **k: pytest.fail(f"the reference {_n} ran"))
    records = []
    handler = logging.Handler()
    handler.emit = lambda rec: records.append(rec.getMessage())
    logging.getLogger("peftkern").addHandler(handler)
    try:
        x, w, b, a, bb = make_inputs((6,), 160, 150, 130, torch.float32, torch.float32, True)
        with peftkern.use_backend("triton"):
            peftkern.ops.lora_linear(x, w, b, a, bb, 0.5, 0.1).sum().backward()
    finally:
        logging.getLogger("peftkern").removeHandler(handler)
    assert not records, records
    assert a.grad is not None and bb.grad is not None


def test_compile_inductor_matches_eager():
    """Inductor (not only aot_eager) trusts the fake kernels' shapes, dtypes and strides. Inductor draws
    random numbers its own way (so the dropout seed differs from eager's) unless fallback_random is set."""
    import torch._inductor.config as inductor_config

    x, w, b, a, bb = make_inputs((2, 9), 32, 24, 4, torch.float32, torch.float32, True)

    def step(x, a, bb):
        return (peftkern.ops.lora_linear(x, w, b, a, bb, 0.5, 0.1) * 2.0).square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    with peftkern.use_backend("torch"), inductor_config.patch(fallback_random=True):
        torch.manual_seed(5)
        loss_c = compiled(x, a, bb)
        g_c = torch.autograd.grad(loss_c, [x, a, bb])
        torch.manual_seed(5)
        loss_e = step(x, a, bb)
        g_e = torch.autograd.grad(loss_e, [x, a, bb])
    # The eager fp32 path folds 1/(1-p)·s into its mask, the op's torch backend scales t: the same mask, another
    # association of the scalings, so fp32 rounding apart (both are checked against fp64 elsewhere).
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
    for gc, ge in zip(g_c, g_e):
        torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_under_autocast_operands_are_cast_as_autocast_casts_linear(p):
    """peftkern.ops.lora_linear under autocast: every float operand in autocast's dtype (as F.linear's are in peft's
    layer), the result in that dtype, gradients back to the fp32 leaves; the same as casting by hand."""
    dt = torch.bfloat16
    x, w, b, a, bb = make_inputs((2, 5), 24, 20, 4, torch.float32, torch.float32, True)
    with torch.autocast(DEVICE.type, dtype=dt):
        torch.manual_seed(3)
        y = peftkern.ops.lora_linear(x, w, b, a, bb, 0.5, p)
    assert y.dtype == dt
    y.float().sum().backward()
    assert x.grad.dtype == a.grad.dtype == bb.grad.dtype == torch.float32
    torch.manual_seed(3)
    by_hand = peftkern.ops.lora_linear(*(t.detach().to(dt) for t in (x, w, b, a, bb)), 0.5, p)
    torch.testing.assert_close(y, by_hand, rtol=0, atol=0)
    with torch.autocast(DEVICE.type, dtype=dt), pytest.raises((TypeError, ValueError, RuntimeError)):
        peftkern.ops.lora_linear(x.long(), w, b, a, bb, 0.5, p)  # checks still run before any cast hides a bad input
