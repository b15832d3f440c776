"""peftkern::dora_linear (peft's DoRA linear) vs an fp64 oracle of peft's expression, under the 2x rule."""

from __future__ import annotations

import math

import pytest
import torch
from _util import DEVICE, DTYPES, assert_close_rule

import peftkern
from peftkern.ops import dora as dora_ops
from peftkern.ops.lora import draw_seed
from peftkern.reference import dora as ref
from peftkern.reference.lora import dropout_keep

pytestmark = pytest.mark.usefixtures("poison_empty")


def make_inputs(lead, in_f, out_f, r, dtype, adapter_dtype, bias, base_grad=False, scaling=0.7):
    x = torch.randn(*lead, in_f, dtype=dtype, device=DEVICE).requires_grad_(True)
    w = (torch.randn(out_f, in_f, device=DEVICE) / math.sqrt(in_f)).to(dtype).requires_grad_(base_grad)
    b = torch.randn(out_f, device=DEVICE).to(dtype).requires_grad_(base_grad) if bias else None
    a = (torch.randn(r, in_f, device=DEVICE) / math.sqrt(in_f)).to(adapter_dtype).requires_grad_(True)
    bb = (torch.randn(out_f, r, device=DEVICE) * 0.3).to(adapter_dtype).requires_grad_(True)
    n = ref.weight_norm(w, a, bb, scaling)
    m = (n * (1 + 0.2 * torch.randn(out_f, device=DEVICE))).to(adapter_dtype).requires_grad_(True)
    return [x, w, b, a, bb, m]


def grads_of(y, gy, tensors):
    return list(torch.autograd.grad(y, [t for t in tensors if t is not None and t.requires_grad], gy))


def check_case(backend, dtype, lead, in_f, out_f, r, *, bias=True, p=0.0, adapter_dtype=None, base_grad=False,
               scaling=0.7):
    adapter_dtype = adapter_dtype or dtype
    tensors = make_inputs(lead, in_f, out_f, r, dtype, adapter_dtype, bias, base_grad, scaling)
    x = tensors[0]
    m_rows = x.numel() // in_f
    torch.manual_seed(1234)
    seed = draw_seed(p)
    keep = None if p == 0.0 else dropout_keep((m_rows, in_f), p, int(seed), DEVICE).reshape(x.shape)
    torch.manual_seed(1234)  # the op draws the same seed
    with peftkern.use_backend(backend):
        y = dora_ops.dora_linear(*tensors, scaling, p)
        gy = torch.randn_like(y)
        got = grads_of(y, gy, tensors)
    t64 = [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in tensors]
    y64 = ref.dora_linear(*t64, scaling, keep, p)
    want = grads_of(y64, gy.double(), t64)
    y_same = ref.dora_linear(*tensors, scaling, keep, p)  # peft's expression in the same dtypes
    same = grads_of(y_same, gy, tensors)
    assert y.dtype == dtype and y.shape == (*lead, out_f)
    assert_close_rule("y", y, y64, y_same)
    names = [n for n, t in zip(["dx", "dW", "db", "dA", "dB", "dm"], tensors) if t is not None and t.requires_grad]
    assert len(got) == len(names)
    for name, g, g64, gs in zip(names, got, want, same):
        assert g64.abs().max() > 0, name
        assert_close_rule(name, g, g64, gs)


BACKENDS = ["torch", "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_awkward_shapes(backend, dtype, p):
    check_case(backend, dtype, (37,), 100, 52, 1, p=p)
    check_case(backend, dtype, (3, 7), 40, 24, 5, bias=False, p=p)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_fp32_adapters_on_half_base(backend, p):
    check_case(backend, torch.float16, (2, 9), 48, 40, 4, p=p, adapter_dtype=torch.float32)


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_trainable_base(p):
    check_case("torch", torch.float32, (5, 3), 20, 12, 3, p=p, base_grad=True)


def test_rank_above_min_in_out():
    check_case("torch", torch.float32, (11,), 6, 5, 8, p=0.1)


def test_empty_batch():
    x, w, b, a, bb, m = make_inputs((0, 3), 16, 8, 2, torch.float32, torch.float32, True)
    y = dora_ops.dora_linear(x, w, b, a, bb, m, 0.5)
    assert y.shape == (0, 3, 8)
    y.sum().backward()
    assert m.grad.abs().max() == 0 and a.grad.shape == a.shape


def test_weight_norm_matches_materialised():
    w = torch.randn(30, 50, dtype=torch.float64)
    a, bb = torch.randn(6, 50, dtype=torch.float64), torch.randn(30, 6, dtype=torch.float64)
    want = torch.linalg.norm(w + 1.3 * (bb @ a), dim=1)
    got = dora_ops.dora_weight_norm(w.float(), a.float(), bb.float(), 1.3)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=0)


def test_weight_sq_norm_cache_follows_the_tensor():
    w = torch.randn(10, 7)
    first = dora_ops.weight_sq_norm(w)
    assert dora_ops.weight_sq_norm(w) is first  # cached
    with torch.no_grad():
        w.mul_(2)  # bumps _version
    again = dora_ops.weight_sq_norm(w)
    torch.testing.assert_close(again, 4 * first)
    torch.testing.assert_close(dora_ops.weight_sq_norm(w, transposed=True), (w * w).sum(0))


def test_norm_gets_no_gradient():
    """peft detaches ||W + s·BA||: dA and dB come from the LoRA term only."""
    x, w, b, a, bb, m = make_inputs((4,), 12, 10, 2, torch.float64, torch.float64, False)
    y = dora_ops.dora_linear(x.float(), w.float(), None, a.float(), bb.float(), m.float(), 0.9)
    g = torch.autograd.grad(y.sum(), [a, bb, m], allow_unused=True)
    n = ref.weight_norm(w, a, bb, 0.9).double()
    gs = (m / n).detach()
    want = torch.autograd.grad(((x @ a.t() @ bb.t()) * 0.9 * gs).sum(), [a, bb])
    torch.testing.assert_close(g[0].double(), want[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g[1].double(), want[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("change, err, match", [
    (lambda t: t.__setitem__(5, torch.randn(7)), ValueError, "magnitude"),
    (lambda t: t.__setitem__(5, torch.randn(8).to(torch.int64)), TypeError, "magnitude"),
    (lambda t: t.__setitem__(3, torch.randn(2, 15)), ValueError, "lora_A"),
])
def test_bad_inputs(change, err, match):
    t = make_inputs((3,), 16, 8, 2, torch.float32, torch.float32, True)
    t = [None if v is None else v.detach() for v in t]
    change(t)
    with pytest.raises(err, match=match):
        dora_ops.dora_linear(*t, 0.5)
    with pytest.raises(err, match=match):
        torch.ops.peftkern.dora_linear(*t, torch.ones(8), 0.5, 0.0, None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_opcheck(backend, p):
    x, w, b, a, bb, m = make_inputs((3, 5), 24, 20, 4, torch.float32, torch.float32, True)
    n = ref.weight_norm(w, a, bb, 0.5)
    seed = torch.tensor(123) if p else None
    with peftkern.use_backend(backend):
        torch.library.opcheck(torch.ops.peftkern.dora_linear.default, (x, w, b, a, bb, m, n, 0.5, p, seed))
        dy = torch.randn(3, 5, 20, device=DEVICE)
        t = torch.randn(15, 4, device=DEVICE)
        u = torch.randn(15, 20, device=DEVICE)
        for need in [(True, True, True), (False, True, False), (True, False, True)]:
            torch.library.opcheck(torch.ops.peftkern.dora_linear_backward.default,
                                  (dy, x.detach(), w, a.detach(), bb.detach(), m.detach(), n, t, u, 0.5, p, seed,
                                   *need, backend))
    torch.library.opcheck(torch.ops.peftkern.dora_weight_norm.default, (w, a.detach(), bb.detach(), 0.5, None))
    torch.library.opcheck(torch.ops.peftkern.dora_weight_norm.default,
                          (w, a.detach(), bb.detach(), 0.5, ref.weight_sq_norm(w)))


def test_compile_fullgraph():
    x, w, b, a, bb, m = make_inputs((2, 9), 32, 24, 4, torch.float32, torch.float32, True)

    def step(x, a, bb, m):
        return dora_ops.dora_linear(x, w, b, a, bb, m, 0.5).square().sum()

    eager = torch.autograd.grad(step(x, a, bb, m), [x, a, bb, m])
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(x, a, bb, m), [x, a, bb, m])
    for g, e in zip(got, eager):
        torch.testing.assert_close(g, e)


def test_backward_op_checks_its_saved_tensors():
    x, w, b, a, bb, m = [None if t is None else t.detach() for t in
                         make_inputs((3, 5), 24, 20, 4, torch.float32, torch.float32, True)]
    n = ref.weight_norm(w, a, bb, 0.5)
    dy, t, u = torch.randn(3, 5, 20), torch.randn(15, 4), torch.randn(15, 20)
    op = torch.ops.peftkern.dora_linear_backward
    with pytest.raises(ValueError, match="dy must have shape"):
        op(dy[:, :4], x, w, a, bb, m, n, t, u, 0.5, 0.0, None, True, True, True, "torch")
    with pytest.raises(ValueError, match="u must have shape"):
        op(dy, x, w, a, bb, m, n, t, u[:, :3], 0.5, 0.0, None, True, True, True, "torch")
    with pytest.raises(ValueError, match="t must be float32"):
        op(dy, x, w, a, bb, m, n, t.double(), u, 0.5, 0.0, None, True, True, True, "torch")


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_triton_scale_passes_run_and_split_rows(p, monkeypatch):
    """On the triton backend the magnitude scale is one Triton pass each way (triton/dora.py): forward without
    dropout, backward always; 600 rows take two row splits for the column sums of dm (fp64 rule as above)."""
    from peftkern.triton import dora as tri

    calls = []
    for name in ("dora_scale", "dora_scale_bwd"):
        real = getattr(tri, name)
        monkeypatch.setattr(tri, name, lambda *a, _n=name, _r=real: calls.append(_n) or _r(*a))
    assert tri._splits(600, 24, torch.device(DEVICE)) == 2
    check_case("triton", torch.float32, (600,), 20, 24, 3, p=p)
    want = ["dora_scale_bwd"] if p else ["dora_scale", "dora_scale_bwd"]
    assert calls == want, calls
