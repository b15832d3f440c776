"""The CPU host extension (csrc/host, peftkern/_host_ext.py): the eager fp32 torch backend of lora_linear as one C++
autograd node. It must give exactly the bits of the Python path (same aten ops, same mask), take the calls it is for,
and build / load / refuse as the CUDA extension does, without a compiler in the build-logic tests."""

from __future__ import annotations

import json
import logging

import pytest
import torch

import peftkern
from peftkern import _host_ext
from peftkern.ops import lora as lora_ops
from peftkern.reference import lora as ref

_HOST_NODE = ("CppFunction", "LoraLinearFp32")  # the C++ node: generic, or its own name once torch named it


@pytest.fixture(scope="module")
def host():
    mod = _host_ext.module()
    if mod is None:
        pytest.fail(f"the host extension did not build here: {_host_ext.status()['why_not']}")
    return mod


def _inputs(lead, bias, base_grad, adapter_grad, x_grad):
    x = torch.randn(*lead, 24, requires_grad=x_grad)
    w = torch.randn(20, 24).requires_grad_(base_grad)
    b = torch.randn(20).requires_grad_(base_grad) if bias else None
    a = torch.randn(4, 24).requires_grad_(adapter_grad)
    bb = torch.randn(20, 4).requires_grad_(adapter_grad)
    return x, w, b, a, bb


def _run(args, p, dy):
    torch.manual_seed(11)
    y = lora_ops.lora_linear(*args, 0.7, p)
    leaves = [t for t in args if t is not None and t.requires_grad]
    return y, (torch.autograd.grad(y, leaves, dy) if leaves else ())


@pytest.mark.parametrize("lead", [(), (7,), (2, 5), (3, 1, 4)], ids=str)
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("grads", ["all", "adapters", "x only", "base too"])
def test_same_bits_as_the_python_path(host, lead, p, bias, grads):
    """Output and every gradient equal bit for bit to _LoraLinearEagerFp32's (which the fp64 tests check), for any
    rank of x, with and without bias and dropout, and whichever inputs need a gradient."""
    args = _inputs(lead, bias, grads == "base too", grads != "x only", grads in ("all", "x only", "base too"))
    dy = torch.randn(*lead, 20)
    y, got = _run(args, p, dy)
    assert type(y.grad_fn).__name__ in _HOST_NODE or not y.requires_grad
    with _host_ext.forced(None):
        y_py, want = _run(args, p, dy)
    assert y_py.grad_fn is None or type(y_py.grad_fn).__name__ == "_LoraLinearEagerFp32Backward"
    assert torch.equal(y, y_py)
    assert len(got) == len(want) and all(torch.equal(g, w) for g, w in zip(got, want))


def test_the_mask_is_the_seeds(host):
    """p = 0.5, A = I, B = I, W = 0: y = s · x · keep / (1 - p), keep the mask reference.lora draws for the seed."""
    x = torch.randn(6, 16) + 3.0  # no zeros: a zero in y is a dropped element
    eye = torch.eye(16)
    torch.manual_seed(3)
    seed = int(lora_ops.draw_seed(0.5))
    torch.manual_seed(3)
    y = lora_ops.lora_linear(x, torch.zeros(16, 16), None, eye, eye, 1.0, 0.5)
    keep = ref.dropout_keep((6, 16), 0.5, seed, "cpu")
    torch.testing.assert_close(y, x * keep / 0.5)


def test_seed_drawn_in_cpp_is_draw_seeds(host):
    """The host path draws its seed in C++: the value torch.randint(0, 2**31 - 1, ()) gives (ops.lora.draw_seed), and
    it advances torch's default generator as that draw does."""
    torch.manual_seed(123)
    want = [int(lora_ops.draw_seed(0.1)) for _ in range(200)]
    after = torch.rand(3)
    torch.manual_seed(123)
    assert [host.draw_seed() for _ in range(200)] == want
    assert torch.equal(torch.rand(3), after)


def test_a_replaced_draw_seed_sees_every_draw(host, monkeypatch):
    """Tests record seeds by replacing draw_seed; the host path then takes its seeds from it (same values)."""
    x, w, b, a, bb = _inputs((4,), True, False, True, True)
    torch.manual_seed(9)
    y = lora_ops.lora_linear(x, w, b, a, bb, 0.5, 0.3)
    seen = []
    real = lora_ops.draw_seed
    monkeypatch.setattr(lora_ops, "draw_seed", lambda p: seen.append(1) or real(p))
    torch.manual_seed(9)
    assert torch.equal(lora_ops.lora_linear(x, w, b, a, bb, 0.5, 0.3), y) and seen == [1]


def test_routing():
    """CPU fp32 on the torch backend only: a half x, or adapters in another dtype, take the Python Function."""
    x, w, b, a, bb = _inputs((5,), True, False, True, True)
    y = lora_ops.lora_linear(x.half(), w.half(), b.half(), a, bb, 0.5, 0.1)
    assert type(y.grad_fn).__name__ == "_LoraLinearEagerBackward"
    if _host_ext.module() is not None:
        assert type(lora_ops.lora_linear(x, w, b, a, bb, 0.5, 0.1).grad_fn).__name__ in _HOST_NODE


def test_off_switch(monkeypatch):
    monkeypatch.setenv("PEFTKERN_HOST_EXT", "0")
    with _host_ext.forced(None):
        _host_ext._state.clear()
        assert _host_ext.module() is None and _host_ext.status()["why_not"] == "off (PEFTKERN_HOST_EXT=0)"


def test_checkpointing_recomputes_the_same_mask(host):
    """Reentrant checkpointing runs the forward without grad, then with grad: the seed repeats, so does the mask."""
    from torch.utils.checkpoint import checkpoint

    x, w, b, a, bb = _inputs((9,), True, False, True, True)
    torch.manual_seed(2)
    y = lora_ops.lora_linear(x, w, b, a, bb, 0.5, 0.4)
    y.sum().backward()
    plain = [t.grad.clone() for t in (x, a, bb)]
    for t in (x, a, bb):
        t.grad = None
    torch.manual_seed(2)
    y_ck = checkpoint(lambda t: lora_ops.lora_linear(t, w, b, a, bb, 0.5, 0.4), x, use_reentrant=True)
    assert torch.equal(y, y_ck)
    y_ck.sum().backward()  # reentrant checkpointing refuses autograd.grad
    assert all(torch.equal(g, t.grad) for g, t in zip(plain, (x, a, bb)))


def test_saved_tensor_hooks_see_what_it_saves(host):
    """Saved-tensor hooks (offloading, non-reentrant checkpointing) see the C++ node's saved tensors: x, ts (M x r) and
    the bool mask beside the weights; peft's composition keeps its fp32 noise and the dropped x instead."""
    from peftkern._memory import saved_bytes

    x, w, b, a, bb = _inputs((64,), True, False, True, True)
    params = [w, b, a, bb]
    ours = saved_bytes(lambda: lora_ops.lora_linear(x, w, b, a, bb, 0.5, 0.1), params)
    drop = torch.nn.Dropout(0.1)
    peft_like = saved_bytes(lambda: torch.nn.functional.linear(x, w, b) + torch.nn.functional.linear(
        torch.nn.functional.linear(drop(x), a), bb) * 0.5, params)
    assert ours == x.nbytes + x.numel() + 64 * 4 * 4 < peft_like, (ours, peft_like)


# ------------------------------------------------------------------------ build logic, without a compiler


class _FakeBuilder:
    """Stands in for torch.utils.cpp_extension: load() writes a file where the .so goes (or fails)."""

    def __init__(self, fail=None):
        self.calls, self.fail = 0, fail

    def load(self, name, sources, build_directory, **kw):
        self.calls += 1
        if self.fail:
            raise RuntimeError(self.fail)
        from pathlib import Path

        Path(build_directory, f"{name}.so").write_bytes(b"\x7fELF not really")


@pytest.fixture
def fake_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTKERN_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("PEFTKERN_NO_BUILD", raising=False)
    fake = _FakeBuilder()
    monkeypatch.setattr(_host_ext, "_builder", lambda: fake)
    return fake


def test_build_writes_meta_last_and_is_cached(fake_cache):
    so = _host_ext.build()
    meta = json.loads((so.parent / _host_ext.META_NAME).read_text())
    assert meta["torch"] == torch.__version__ and meta["so_sha256"] and fake_cache.calls == 1
    assert _host_ext.build() == so and fake_cache.calls == 1  # up to date: no second build


def test_damaged_or_unfinished_builds_are_rebuilt(fake_cache):
    so = _host_ext.build()
    so.write_bytes(b"damaged")
    assert "damaged" in _host_ext._mismatch(so.parent, _host_ext.source_dir())
    _host_ext.build()
    assert fake_cache.calls == 2
    (so.parent / _host_ext.META_NAME).unlink()  # a build killed before its meta: never loaded as is
    assert "not built" in _host_ext._mismatch(so.parent, _host_ext.source_dir())
    _host_ext.build()
    assert fake_cache.calls == 3


def test_no_build_and_failed_builds_fall_back_with_a_reason(fake_cache, monkeypatch, caplog):
    monkeypatch.setenv("PEFTKERN_NO_BUILD", "1")
    with pytest.raises(RuntimeError, match="PEFTKERN_NO_BUILD"):
        _host_ext.build()
    monkeypatch.delenv("PEFTKERN_NO_BUILD")
    monkeypatch.setattr(_host_ext, "_builder", lambda: _FakeBuilder(fail="c++: not found"))
    with _host_ext.forced(None), caplog.at_level(logging.WARNING, logger="peftkern"):
        _host_ext._state.clear()
        assert _host_ext.module() is None
        assert "c++: not found" in _host_ext.status()["why_not"] and "host extension unavailable" in caplog.text
        x, w, b, a, bb = _inputs((3,), True, False, True, True)
        y = peftkern.ops.lora_linear(x, w, b, a, bb, 0.5, 0.2)  # the Python path, same math
        assert type(y.grad_fn).__name__ == "_LoraLinearEagerFp32Backward"
