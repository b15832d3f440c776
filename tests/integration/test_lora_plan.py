"""The accelerated LoRA layer decides its fused path once per layer state (integrations/lora.py `_plan`), not
per call: every state change after the first call must still give peft's result, or peft's forward."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from _lora_models import lora_layers, lora_model
from _util import DEVICE
from torch import nn

import peftkern
from peftkern.integrations import lora as integration
from peftkern.ops import lora as lora_ops

peft = pytest.importorskip("peft")


def _pair(**kw):
    plain = lora_model("llama", **kw).eval()
    ours = copy.deepcopy(plain)
    peftkern.accelerate(ours)
    return plain, ours


def _same(plain, ours, x):
    """The first q_proj of both models on x: equal outputs (both fp32, same math up to rounding)."""
    a, b = lora_layers(plain)[0], lora_layers(ours)[0]
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x), rtol=1e-5, atol=1e-5)


@pytest.fixture
def x():
    return torch.randn(3, 5, 32, device=DEVICE)


def _fused_calls(monkeypatch):
    calls = []
    real = lora_ops.lora_linear_checked  # what the integration calls (its plan has checked the arguments)
    monkeypatch.setattr(lora_ops, "lora_linear_checked", lambda *a: calls.append(1) or real(*a))
    return calls


def test_state_changes_after_the_first_call(x, monkeypatch):
    plain, ours = _pair()
    calls = _fused_calls(monkeypatch)
    _same(plain, ours, x)  # the plan is built here
    assert len(calls) == 1
    for model in (plain, ours):  # each change below must reach the cached plan
        layer = lora_layers(model)[0]
        layer.scaling["default"] = 0.25  # set_scale-like edit of the dict
    _same(plain, ours, x)
    new_a = torch.randn(4, 32, device=DEVICE)
    for model in (plain, ours):
        lora_layers(model)[0].lora_A["default"].weight = nn.Parameter(new_a.clone())
    _same(plain, ours, x)
    with plain.disable_adapter(), ours.disable_adapter():
        _same(plain, ours, x)
    for model in (plain, ours):
        lora_layers(model)[0].merge()
    _same(plain, ours, x)
    for model in (plain, ours):
        lora_layers(model)[0].unmerge()
    _same(plain, ours, x)
    assert len(calls) == 4  # disabled and merged calls ran peft's base-only forward


def test_a_second_adapter_switched_in(x):
    plain, ours = _pair()
    for model in (plain, ours):
        torch.manual_seed(3)
        model.add_adapter("other", peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    peftkern.accelerate(ours)
    _same(plain, ours, x)
    for model in (plain, ours):
        model.set_adapter("other")
    _same(plain, ours, x)


def test_a_hook_added_after_the_first_call_is_honoured(x, monkeypatch):
    monkeypatch.setenv("PEFTKERN_STRICT", "0")
    plain, ours = _pair()
    _same(plain, ours, x)
    seen = []
    for model in (plain, ours):
        lora_layers(model)[0].base_layer.register_forward_hook(lambda m, i, o: seen.append(1))
    _same(plain, ours, x)
    assert len(seen) == 2, "the accelerated layer must run peft's forward (the hook fires) once its base is hooked"


def test_dtype_change_after_the_first_call_falls_back(x, monkeypatch, caplog):
    monkeypatch.setenv("PEFTKERN_STRICT", "0")
    plain, ours = _pair()
    _same(plain, ours, x)
    plain.double()
    ours.double()
    with caplog.at_level(logging.WARNING, logger="peftkern"):
        _same(plain, ours, x.double())
    assert any("float64" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("change", ["narrow lora_A in place", "lora_B to float16", "p = 1"])
def test_weight_changes_in_place_are_caught_before_the_op(x, change, monkeypatch, caplog):
    """The op's per-call checks of the weights run once per layer state: an in-place change of a weight's shape or
    dtype (same Parameter object) makes a new plan that refuses it; the dropout p is checked per call."""
    monkeypatch.setenv("PEFTKERN_STRICT", "0")
    _, ours = _pair()
    layer = lora_layers(ours)[0]
    layer(x)
    real = lora_ops.lora_linear_checked

    def refuse(*a):
        pytest.fail("the op ran on a changed layer")

    monkeypatch.setattr(lora_ops, "lora_linear_checked", refuse)
    if change == "p = 1":
        layer.lora_dropout["default"] = nn.Dropout(0.5)
        layer.train()
        monkeypatch.setattr(lora_ops, "lora_linear_checked", real)
        layer(x)
        monkeypatch.setattr(lora_ops, "lora_linear_checked", refuse)
        layer.lora_dropout["default"].p = 1.0
        with caplog.at_level(logging.WARNING, logger="peftkern"):
            assert not layer(x).isnan().any()  # peft's forward: p=1 drops the whole LoRA term
        assert any("dropout probability 1.0" in r.getMessage() for r in caplog.records)
        return
    if change == "narrow lora_A in place":
        w = layer.lora_A["default"].weight
        w.data = w.data[:, :16]  # same storage start, another shape
    else:
        w = layer.lora_B["default"].weight
        w.data = w.data.half()
    with caplog.at_level(logging.WARNING, logger="peftkern"), pytest.raises(Exception):  # noqa: B017
        layer(x)  # peft's own forward, which cannot run on such weights either
    assert any("runs peft's forward" in r.getMessage() for r in caplog.records)


def test_dropout_probability_change_is_read_per_call(x):
    plain, ours = _pair(lora_dropout=0.0)
    ours.train()
    layer = lora_layers(ours)[0]
    y0 = layer(x)
    layer.lora_dropout["default"] = nn.Dropout(0.5)  # a new module: a new plan
    layer.train()
    y1 = layer(x)
    assert not torch.equal(y0, y1)
    layer.lora_dropout["default"].p = 0.0  # same module, p read per call
    torch.testing.assert_close(layer(x), y0)


def test_plans_do_not_travel_with_copies(x):
    _, ours = _pair()
    lora_layers(ours)[0](x)
    assert not any("plan" in k for k in vars(lora_layers(ours)[0]))
    clone = copy.deepcopy(ours)
    torch.testing.assert_close(lora_layers(clone)[0](x), lora_layers(ours)[0](x))


# ------------------------------------------------------------------------- the op's eager path


def test_eager_calls_skip_the_custom_op_and_compiled_calls_use_it():
    x = torch.randn(4, 16, requires_grad=True)
    w, a, b = torch.randn(8, 16), torch.randn(4, 16, requires_grad=True), torch.randn(8, 4, requires_grad=True)
    y = lora_ops.lora_linear(x, w, None, a, b, 0.5, 0.1)
    assert type(y.grad_fn).__name__ in _EAGER_NODES
    with torch.device("meta"):  # meta tensors take the op and its fake kernel
        ym = lora_ops.lora_linear(x.to("meta"), w.to("meta"), None, a.to("meta"), b.to("meta"), 0.5, 0.1)
    assert ym.shape == (4, 8) and type(ym.grad_fn).__name__ not in _EAGER_NODES


# The eager paths' autograd nodes: the host extension's C++ node (CPU fp32), its Python twin, the general Function.
_EAGER_NODES = {"CppFunction", "LoraLinearFp32", "_LoraLinearEagerFp32Backward", "_LoraLinearEagerBackward"}


def test_dropout_seed_is_drawn_on_the_cpu():
    torch.set_default_device("meta")
    try:
        seed = lora_ops.draw_seed(0.1)
    finally:
        torch.set_default_device(None)
    assert seed.device.type == "cpu"


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_eager_and_op_paths_agree(p):
    """Same seed, same backend: the eager Function and the custom op give the same output and gradients."""
    x = torch.randn(2, 3, 16, requires_grad=True)
    w, bias = torch.randn(8, 16), torch.randn(8)
    a, b = torch.randn(4, 16, requires_grad=True), torch.randn(8, 4, requires_grad=True)
    dy = torch.randn(2, 3, 8)
    torch.manual_seed(7)
    y = lora_ops.lora_linear(x, w, bias, a, b, 0.5, p)
    got = (y, *torch.autograd.grad(y, (x, a, b), dy))
    torch.manual_seed(7)
    y2, _ = torch.ops.peftkern.lora_linear(x, w, bias, a, b, 0.5, p, lora_ops.draw_seed(p))
    want = (y2, *torch.autograd.grad(y2, (x, a, b), dy))
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r)


def test_plan_survives_and_reflects_restore(x):
    plain, ours = _pair()
    _same(plain, ours, x)
    peftkern.restore(ours)
    assert not integration.is_accelerated(lora_layers(ours)[0])
    _same(plain, ours, x)
    peftkern.accelerate(ours)
    _same(plain, ours, x)


@pytest.mark.parametrize("lead", [(6,), (2, 3)])
def test_fp32_torch_path_saves_what_the_op_saves(lead):
    """fp32 without dropout the torch backend takes its own node (the host extension's on the CPU): it keeps the same
    bytes for backward as the op (x and an M x r product), its output is a tensor of its own (in-place ops on it
    work), and it gives the op's output and gradients."""
    from peftkern._memory import saved_bytes

    x = torch.randn(*lead, 16, requires_grad=True)
    w, bias = torch.randn(8, 16), torch.randn(8)
    a, b = torch.randn(4, 16, requires_grad=True), torch.randn(8, 4, requires_grad=True)
    params = [w, bias, a, b]
    with peftkern.use_backend("torch"):
        eager = saved_bytes(lambda: lora_ops.lora_linear(x, w, bias, a, b, 0.5), params)
        y = lora_ops.lora_linear(x, w, bias, a, b, 0.5)
    assert type(y.grad_fn).__name__ in _EAGER_NODES and y._base is None
    y.clone().add_(1.0)
    op = saved_bytes(lambda: torch.ops.peftkern.lora_linear(x, w, bias, a, b, 0.5, 0.0, None)[0], params)
    assert eager == op > 0
    y2, _ = torch.ops.peftkern.lora_linear(x, w, bias, a, b, 0.5, 0.0, None)
    dy = torch.randn_like(y)
    for g, r in zip(torch.autograd.grad(y, (x, a, b), dy), torch.autograd.grad(y2, (x, a, b), dy)):
        torch.testing.assert_close(g, r)
    torch.testing.assert_close(y, y2)
    out = lora_ops.lora_linear(x, w, bias, a, b, 0.5) * 1.0
    out.add_(1.0)  # a layer's output is often modified in place (residual adds, inplace activations)
    lora_ops.lora_linear(x, w, bias, a, b, 0.5).add_(1.0).sum().backward()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_no_grad_forward_draws_the_grad_forwards_mask(backend):
    """Reentrant checkpointing runs the forward under no_grad and recomputes it with grad: both must use the
    same dropout mask for the same RNG state."""
    x = torch.randn(6, 16, requires_grad=True)
    w, a, b = torch.randn(8, 16), torch.randn(4, 16, requires_grad=True), torch.randn(8, 4, requires_grad=True)
    with peftkern.use_backend(backend):
        torch.manual_seed(3)
        with torch.no_grad():
            y0 = lora_ops.lora_linear(x, w, None, a, b, 0.5, 0.4)
        torch.manual_seed(3)
        y1 = lora_ops.lora_linear(x, w, None, a, b, 0.5, 0.4)
    torch.testing.assert_close(y0, y1.detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_backend_draws_its_mask_once(monkeypatch, dtype):
    """On the torch backend the eager path keeps its mask for backward (one draw per call, not two); the op path
    regenerates it from the seed, and both give the same gradients (test_eager_and_op_paths_agree). Counted on the
    Python paths (the host extension's C++ node runs the fp32 one's ops: tests/test_host_ext.py)."""
    from peftkern import _host_ext
    from peftkern.reference import lora as ref

    draws = []
    real = ref._uniform  # every mask of the torch backend is drawn here
    monkeypatch.setattr(ref, "_uniform", lambda *a, **k: draws.append(1) or real(*a, **k))
    x = torch.randn(5, 16, requires_grad=True, dtype=dtype)
    w = torch.randn(8, 16, dtype=dtype)
    a, b = torch.randn(4, 16, requires_grad=True), torch.randn(8, 4, requires_grad=True)
    with peftkern.use_backend("torch"), _host_ext.forced(None):
        lora_ops.lora_linear(x, w, None, a, b, 0.5, 0.3).sum().backward()
    assert len(draws) == 1
