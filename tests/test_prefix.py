"""peftkern::prefix_attention against explicit concat attention in fp64: output and every gradient."""

from __future__ import annotations

import pytest
import torch
from _util import DEVICE, DTYPES, assert_close_rule

import peftkern
from peftkern.ops import prefix as prefix_op
from peftkern.ops.prefix import prefix_attention
from peftkern.reference import prefix as ref

NAMES = ("dq", "dk", "dv", "dprefix_k", "dprefix_v")


pytestmark = pytest.mark.usefixtures("poison_empty")


def make_inputs(B, H, Hkv, L, S, P, D, dtype, shared=True, mask=None, layout="contiguous"):
    def rnd(*shape):
        return torch.randn(*shape, device=DEVICE, dtype=dtype)

    if layout == "transformers":  # (B, L, H, D) projections viewed as (B, H, L, D), as HF attention gets them
        q, k, v = (rnd(B, n, H_, D).transpose(1, 2) for n, H_ in ((L, H), (S, Hkv), (S, Hkv)))
        pk, pv = (rnd(P, Hkv, D).transpose(0, 1) for _ in range(2))
        if not shared:  # a per-batch prefix that is an expanded view (batch stride 0)
            pk, pv = pk.expand(B, -1, -1, -1), pv.expand(B, -1, -1, -1)
    else:
        q, k, v = rnd(B, H, L, D), rnd(B, Hkv, S, D), rnd(B, Hkv, S, D)
        lead = (Hkv,) if shared else (B, Hkv)
        pk, pv = rnd(*lead, P, D), rnd(*lead, P, D)
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v, pk, pv)]  # detach keeps the strides
    if mask == "random":
        mask = torch.rand(B, S, device=DEVICE) > 0.3
    elif mask == "row_masked":  # batch row 0 has every sequence key masked: it attends the prefix only
        mask = torch.rand(B, S, device=DEVICE) > 0.3
        mask[0] = False
    return leaves, mask


def check_case(backend, dtype, B, H, Hkv, L, S, P, D, *, causal=True, mask=None, shared=True,
               layout="contiguous", scale=None):
    leaves, mask = make_inputs(B, H, Hkv, L, S, P, D, dtype, shared, mask, layout)
    with peftkern.use_backend(backend):
        out = prefix_attention(*leaves, causal=causal, key_padding_mask=mask, softmax_scale=scale)
        gout = torch.randn_like(out)
        got = torch.autograd.grad(out, leaves, gout)

    l64 = [t.detach().double().requires_grad_(True) for t in leaves]
    o64 = ref.attention(*l64, causal, mask, scale)
    want = torch.autograd.grad(o64, l64, gout.double())
    o_same = ref.attention(*leaves, causal, mask, scale)
    same = torch.autograd.grad(o_same, leaves, gout)

    assert out.dtype == dtype and out.shape == (B, H, L, D)
    assert_close_rule("out", out, o64, o_same)
    for name, g, g64, gs in zip(NAMES, got, want, same):
        assert_close_rule(name, g, g64, gs)


# ------------------------------------------------------------------ correctness

CASES = {
    # name: (B, H, Hkv, L, S, P, D, causal, mask, shared)
    "gqa-L<S": (2, 4, 2, 21, 29, 5, 32, True, None, True),
    "decode-L1-gqa": (3, 4, 2, 1, 40, 16, 64, True, "random", True),
    "P1-noncausal": (1, 2, 2, 17, 17, 1, 64, False, "random", False),
    "L>S": (2, 2, 1, 19, 7, 3, 16, True, None, False),
    "mqa-D24-shift1": (2, 3, 1, 17, 18, 5, 24, True, "row_masked", False),
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_shapes(backend, dtype, case):
    B, H, Hkv, L, S, P, D, causal, mask, shared = CASES[case]
    check_case(backend, dtype, B, H, Hkv, L, S, P, D, causal=causal, mask=mask, shared=shared)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shared", [True, False])
def test_fully_masked_row_attends_prefix(backend, causal, shared):
    check_case(backend, torch.float32, 2, 2, 2, 11, 14, 3, 16, causal=causal, mask="row_masked", shared=shared)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_prefix_64(backend):
    check_case(backend, torch.float16, 1, 2, 1, 9, 11, 64, 32, mask="random")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [192, 256])
def test_head_dim_up_to_256(backend, dtype, D):
    """Head dims past 128 (BLOCK_D = 256: the kernels' `_wide` tile lists): a padded one (192) and a full one."""
    check_case(backend, dtype, 2, 4, 2, 19, 23, 5, D, mask="random")
    check_case(backend, dtype, 1, 2, 2, 7, 9, 3, D, causal=False, shared=False)


def test_head_dim_past_256_is_refused_by_triton():
    """Strict mode (conftest): the Triton kernels refuse D > 256 and say why instead of falling back silently."""
    leaves, _ = make_inputs(1, 2, 2, 3, 4, 2, 320, torch.float32)
    with peftkern.use_backend("triton"), pytest.raises(peftkern.BackendUnavailable, match="head dim 320 > 256"):
        prefix_attention(*leaves)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("shared", [True, False])
def test_transformers_layout(backend, shared):
    """Strided q/k/v (B, L, H, D).transpose(1, 2), a transposed prefix, an expanded per-batch prefix."""
    check_case(backend, torch.float32, 2, 4, 2, 12, 15, 4, 32, mask="random", shared=shared, layout="transformers",
               scale=0.3)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_no_sequence_keys_and_empty(backend):
    check_case(backend, torch.float32, 2, 2, 1, 5, 0, 4, 16)  # S = 0: the prefix alone
    leaves, _ = make_inputs(0, 2, 2, 5, 6, 3, 16, torch.float32)
    with peftkern.use_backend(backend):
        out = prefix_attention(*leaves)
        assert out.shape == (0, 2, 5, 16)
        out.sum().backward()
    assert torch.equal(leaves[3].grad, torch.zeros_like(leaves[3]))
    leaves, _ = make_inputs(2, 2, 2, 0, 6, 3, 16, torch.float32, shared=False)
    with peftkern.use_backend(backend):
        prefix_attention(*leaves).sum().backward()
    assert all(torch.equal(t.grad, torch.zeros_like(t)) for t in leaves[1:])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_autocast_casts_like_sdpa(backend):
    """Under autocast, mixed operands (Llama's RoPE leaves q, k in fp32, v in the autocast dtype) are
    cast to the autocast dtype, as autocast does for SDPA; gradients come back in each leaf's dtype."""
    dev, half = DEVICE.type, torch.float16  # bf16 tl.dot is broken under the interpreter
    leaves, _ = make_inputs(2, 4, 2, 9, 9, 3, 16, torch.float32)
    leaves[2] = leaves[2].detach().to(half).requires_grad_(True)
    with peftkern.use_backend(backend):
        with torch.autocast(dev, dtype=half):
            out = prefix_attention(*leaves)
            grads = torch.autograd.grad(out.float().sum(), leaves)
        # autocast only casts the operands: the op itself runs exactly as on fp16 inputs (the torch
        # backend's fp32 upcasts are not cast back down)
        plain = prefix_attention(*[t.detach().to(half) for t in leaves])
    assert out.dtype == half
    torch.testing.assert_close(out, plain, atol=0, rtol=0)
    assert [g.dtype for g in grads] == [t.dtype for t in leaves]


def test_backward_deterministic():
    leaves, mask = make_inputs(3, 4, 2, 20, 20, 5, 16, torch.float32, mask="random")
    with peftkern.use_backend("triton"):
        out = prefix_attention(*leaves, key_padding_mask=mask)
        gout = torch.randn_like(out)
        g1 = torch.autograd.grad(out, leaves, gout, retain_graph=True)
        g2 = torch.autograd.grad(out, leaves, gout)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_backward_runs_on_the_forwards_backend(monkeypatch):
    """The backward follows the forward's backend even where autograd runs it outside the context."""
    calls = []
    real = prefix_op.ref.prefix_attention_bwd
    monkeypatch.setattr(prefix_op.ref, "prefix_attention_bwd", lambda *a: calls.append(1) or real(*a))
    leaves, _ = make_inputs(1, 2, 2, 4, 4, 2, 16, torch.float32)
    with peftkern.use_backend("torch"):
        out = prefix_attention(*leaves)
    with peftkern.use_backend("triton"):
        out.sum().backward()
    assert calls == [1]


# ------------------------------------------------------------------ bad inputs


def _good():
    return dict(q=torch.randn(2, 4, 5, 8), k=torch.randn(2, 2, 6, 8), v=torch.randn(2, 2, 6, 8),
                prefix_k=torch.randn(2, 3, 8), prefix_v=torch.randn(2, 3, 8))


@pytest.mark.parametrize("change, err, match", [
    (dict(q=torch.randn(4, 5, 8)), ValueError, "q must be 4-D"),
    (dict(k=torch.randn(2, 2, 6, 7)), ValueError, "k has shape"),
    (dict(v=torch.randn(2, 2, 5, 8)), ValueError, "v has shape"),
    (dict(k=torch.randn(2, 3, 6, 8), v=torch.randn(2, 3, 6, 8)), ValueError, "not a multiple"),
    (dict(prefix_k=torch.randn(3, 8)), ValueError, "prefix_k must be 3-D"),
    (dict(prefix_k=torch.randn(1, 3, 8), prefix_v=torch.randn(1, 3, 8)), ValueError, "prefix_k has shape"),
    (dict(prefix_k=torch.randn(3, 2, 3, 8), prefix_v=torch.randn(3, 2, 3, 8)), ValueError, "B=2"),
    (dict(prefix_k=torch.randn(2, 0, 8), prefix_v=torch.randn(2, 0, 8)), ValueError, "P >= 1"),
    (dict(prefix_v=torch.randn(2, 4, 8)), ValueError, "prefix_v has shape"),
    (dict(prefix_k=torch.randn(2, 3, 8).half()), TypeError, "prefix_k is torch.float16 but q"),
    (dict(q=torch.randn(2, 4, 5, 8, dtype=torch.float64)), TypeError, "q must be float32"),
    (dict(key_padding_mask=torch.ones(2, 6)), TypeError, "key_padding_mask must be a bool"),
    (dict(key_padding_mask=torch.ones(2, 5, dtype=torch.bool)), ValueError, r"expected \(B=2, S=6\)"),
    (dict(causal=1), TypeError, "causal must be a bool"),
    (dict(softmax_scale=-1.0), ValueError, "softmax_scale must be > 0"),
    (dict(softmax_scale=torch.tensor(0.5)), TypeError, "softmax_scale must be"),
    (dict(prefix_v=torch.randn(2, 3, 8, device="meta")), ValueError, "is on meta"),
])
def test_bad_inputs(change, err, match):
    with pytest.raises(err, match=match):
        prefix_attention(**(_good() | change))


# ------------------------------------------------------------------ torch.library / compile


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("shared", [True, False])
def test_opcheck(backend, shared):
    leaves, mask = make_inputs(2, 4, 2, 6, 7, 3, 16, torch.float32, shared=shared, mask="random")
    q, k, v, pk, pv = leaves
    with peftkern.use_backend(backend):
        torch.library.opcheck(torch.ops.peftkern.prefix_attention.default, (q, k, v, pk, pv, mask, True, 0.25))
        with torch.no_grad():
            out, lse = torch.ops.peftkern.prefix_attention(q, k, v, pk, pv, mask, True, 0.25)
        args = (torch.randn_like(out), *[t.detach() for t in leaves], out, lse, mask, True, 0.25, backend)
        torch.library.opcheck(torch.ops.peftkern.prefix_attention_backward.default, args)


def test_compile_fullgraph():
    leaves, mask = make_inputs(2, 4, 2, 9, 12, 3, 16, torch.float32, mask="random")
    pk, pv = leaves[3], leaves[4]

    def step(q, k, v):
        return prefix_attention(q, k, v, pk, pv, key_padding_mask=mask).square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    with peftkern.use_backend("triton"):
        loss_c = compiled(*leaves[:3])
        g_c = torch.autograd.grad(loss_c, leaves)
        loss_e = step(*leaves[:3])
        g_e = torch.autograd.grad(loss_e, leaves)
    torch.testing.assert_close(loss_c, loss_e)
    for gc, ge in zip(g_c, g_e):
        torch.testing.assert_close(gc, ge)
    assert torch._dynamo.explain(step)(*leaves[:3]).graph_break_count == 0
