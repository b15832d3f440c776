"""peftkern.ops.lora_group.lora_linear_group: several LoRA linears reading one x (q/k/v, gate/up) as one group.

Each member is checked against the fp64 reference with its own mask (drawn from its own seed, in member order),
forward and every gradient, under the 2x-torch rule; the masks of the members are independent; x is read once
for the group's shrinks and dA reductions (launch counts)."""

from __future__ import annotations

import math

import pytest
import torch
from _util import DEVICE, DTYPES, assert_close_rule
from test_lora import keep_mask

import peftkern
from peftkern.ops.lora import draw_seed, lora_linear
from peftkern.ops.lora_group import lora_linear_group
from peftkern.reference import lora as ref

pytestmark = pytest.mark.usefixtures("poison_empty")


def make_members(in_f, specs, dtype):
    """specs: [(out_f, r, bias, p, adapter_dtype or None, scaling)]."""
    members = []
    for out_f, r, bias, p, adt, s in specs:
        adt = adt or dtype
        w = (torch.randn(out_f, in_f, device=DEVICE) / math.sqrt(in_f)).to(dtype)
        b = torch.randn(out_f, device=DEVICE).to(dtype) if bias else None
        a = (torch.randn(r, in_f, device=DEVICE) / math.sqrt(in_f)).to(adt).requires_grad_(True)
        bb = torch.randn(out_f, r, device=DEVICE).to(adt).requires_grad_(True)
        members.append((w, b, a, bb, s, p))
    return members


def _leaves(x, members):
    return [x] + [t for m in members for t in (m[2], m[3])]


def check_group(backend, dtype, lead, in_f, specs, *, use=None, deterministic=True):
    x = torch.randn(*lead, in_f, dtype=dtype, device=DEVICE).requires_grad_(True)
    members = make_members(in_f, specs, dtype)
    use = use if use is not None else range(len(members))
    m = x.numel() // in_f
    torch.manual_seed(77)
    seeds = [draw_seed(p) for *_, p in members]
    keeps = [None if s is None else keep_mask(backend, m, in_f, mem[5], int(s)).reshape(x.shape)
             for s, mem in zip(seeds, members)]

    torch.manual_seed(77)  # the group draws the same seeds, in member order
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    with peftkern.use_backend(backend):
        ys = lora_linear_group(x, members)
        gys = [torch.randn_like(y) for y in ys]
        loss = sum((ys[g] * gys[g]).sum() for g in use)
        got = torch.autograd.grad(loss, _leaves(x, members), allow_unused=True)

    def ref_run(cast):
        xx = cast(x)
        mm = [(cast(w), None if b is None else cast(b), cast(a), cast(bb), s, p) for w, b, a, bb, s, p in members]
        yy = [ref.lora_linear(xx, w, b, a, bb, s, k, p) for (w, b, a, bb, s, p), k in zip(mm, keeps)]
        loss = sum((yy[g] * gys[g].to(yy[g].dtype)).sum() for g in use)
        return yy, torch.autograd.grad(loss, _leaves(xx, mm), allow_unused=True)

    y64, want = ref_run(lambda t: t.detach().double().requires_grad_(t.requires_grad))
    y_same, same = ref_run(lambda t: t)
    for g, y in enumerate(ys):
        assert y.dtype == dtype and y.shape == (*lead, specs[g][0])
        assert_close_rule(f"y{g}", y, y64[g], y_same[g])
    names = ["dx"] + [f"{n}{g}" for g in range(len(members)) for n in ("dA", "dB")]
    for name, gg, g64, gs in zip(names, got, want, same):
        if g64 is None:
            assert gg is None or not gg.any(), f"{name}: a member whose output is unused gets a gradient"
            continue
        assert_close_rule(name, gg, g64, gs)
    return ys, got


QKV = [(24, 8, True, 0.0, None, 2.0), (16, 4, False, 0.0, None, 0.5), (16, 16, True, 0.0, None, 1.0)]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5])
def test_qkv_group(backend, dtype, p):
    specs = [(o, r, b, p, a, s) for o, r, b, _, a, s in QKV]
    check_group(backend, dtype, (3, 11), 40, specs)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_different_dropout_per_member_and_fp32_adapters(backend):
    specs = [(24, 8, True, 0.1, torch.float32, 2.0), (56, 16, False, 0.0, torch.float32, 1.0)]  # gate/up
    check_group(backend, torch.float16, (37,), 40, specs)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_four_members_run_in_chunks(backend):
    specs = [(24, 8, True, 0.2, None, 1.0)] * 4
    check_group(backend, torch.float32, (19,), 40, specs)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_unused_output_gets_no_gradient(backend):
    specs = [(o, r, b, 0.1, a, s) for o, r, b, _, a, s in QKV]
    _, got = check_group(backend, torch.float32, (2, 9), 40, specs, use=[0, 2])
    assert got[3] is None and got[4] is None  # member 1's dA, dB


def test_one_read_of_dy_path():
    """Without deterministic algorithms the backward takes the one-read dy kernel (atomics) per member."""
    specs = [(o, r, b, 0.1, a, s) for o, r, b, _, a, s in QKV]
    check_group("triton", torch.float32, (33,), 40, specs, deterministic=False)


def test_masks_of_members_are_independent():
    """Members with identical weights and p=0.5: each output equals its own mask's result, and the masks differ."""
    in_f, m = 32, 20
    x = torch.randn(m, in_f, device=DEVICE)
    w = torch.randn(16, in_f, device=DEVICE)
    a, b = torch.randn(8, in_f, device=DEVICE), torch.randn(16, 8, device=DEVICE)
    members = [(w, None, a, b, 1.0, 0.5)] * 3
    torch.manual_seed(5)
    seeds = [int(draw_seed(0.5)) for _ in members]
    assert len(set(seeds)) == 3
    with peftkern.use_backend("triton"):
        torch.manual_seed(5)
        ys = lora_linear_group(x, members)
        keeps = [keep_mask("triton", m, in_f, 0.5, s) for s in seeds]
    assert not torch.equal(keeps[0], keeps[1]) and not torch.equal(keeps[1], keeps[2])
    agree = (keeps[0] == keeps[1]).float().mean().item()
    assert 0.35 < agree < 0.65, f"masks of two members agree on {agree:.2f} of elements (independent: ~0.5)"
    for y, k in zip(ys, keeps):
        torch.testing.assert_close(y, ref.lora_linear(x, w, None, a, b, 1.0, k, 0.5))
    assert not torch.allclose(ys[0], ys[1])


def test_equals_the_members_own_calls():
    """Same seeds, same masks: the group gives what the members' own lora_linear calls give."""
    specs = [(o, r, b, 0.3, a, s) for o, r, b, _, a, s in QKV]
    x = torch.randn(3, 7, 40, device=DEVICE)
    members = make_members(40, specs, torch.float32)
    with peftkern.use_backend("triton"):
        torch.manual_seed(3)
        group = lora_linear_group(x, members)
        torch.manual_seed(3)
        alone = [lora_linear(x, *mm) for mm in members]
    for g, a in zip(group, alone):
        torch.testing.assert_close(g, a, rtol=1e-5, atol=1e-5)


def test_x_read_once_per_group(monkeypatch):
    """Three members: one shrink launch and one dA launch over x (not three), one dx epilogue."""
    from peftkern.triton import lora as tri
    from peftkern.triton import lora_group as tg

    calls = {"group_shrink": 0, "group_adapter_grad": 0, "group_epilogue_": 0, "shrink": 0, "adapter_grad": 0}
    for mod, name in ((tg, "group_shrink"), (tg, "group_adapter_grad"), (tg, "group_epilogue_"), (tri, "shrink"),
                      (tri, "adapter_grad")):
        real = getattr(mod, name)

        def counted(*a, _real=real, _name=name, **k):
            calls[_name] += 1
            return _real(*a, **k)

        monkeypatch.setattr(mod, name, counted)
    specs = [(o, r, b, 0.1, a, s) for o, r, b, _, a, s in QKV]
    x = torch.randn(17, 40, device=DEVICE, requires_grad=True)
    members = make_members(40, specs, torch.float32)
    torch.use_deterministic_algorithms(False)
    with peftkern.use_backend("triton"):
        ys = lora_linear_group(x, members)
        sum(y.sum() for y in ys).backward()
    want = {"group_shrink": 1, "group_adapter_grad": 1, "group_epilogue_": 1, "shrink": 0, "adapter_grad": 0}
    assert calls == want, calls


def test_no_grad_and_nd_input():
    specs = [(o, r, b, 0.0, a, s) for o, r, b, _, a, s in QKV]
    x = torch.randn(2, 3, 5, 40, device=DEVICE)
    members = make_members(40, specs, torch.float32)
    with torch.no_grad(), peftkern.use_backend("triton"):
        ys = lora_linear_group(x, members)
    for y, mm in zip(ys, members):
        assert y.shape == (2, 3, 5, mm[0].shape[0])
        torch.testing.assert_close(y, ref.lora_linear(x, *mm[:4], mm[4]), rtol=1e-5, atol=1e-5)


def test_ranks_past_the_group_kernels_run_per_member(monkeypatch):
    from peftkern.triton import lora_group as tg

    monkeypatch.setattr(tg, "group_shrink", lambda *a, **k: pytest.fail("a rank past MAX_RANK reached the kernel"))
    specs = [(96, 80, False, 0.0, None, 1.0), (96, 8, False, 0.0, None, 1.0)]
    x = torch.randn(5, 96, device=DEVICE)
    members = make_members(96, specs, torch.float32)
    with peftkern.use_backend("triton"):
        ys = lora_linear_group(x, members)
    for y, mm in zip(ys, members):
        torch.testing.assert_close(y, ref.lora_linear(x, *mm[:4], mm[4]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bad, match", [
    (lambda ms: [], "at least one member"),
    (lambda ms: [ms[0][:5]], "each member is"),
    (lambda ms: [(ms[0][0][:, :-1], *ms[0][1:])], "weight expects in="),
])
def test_bad_members(bad, match):
    members = make_members(40, QKV[:1], torch.float32)
    with pytest.raises((ValueError, RuntimeError, TypeError), match=match):
        lora_linear_group(torch.randn(3, 40, device=DEVICE), bad(members))
