"""Passes over activations in the Triton LoRA backward: one read of dy gives dt and dB (float atomics for dt,
so only outside deterministic mode), and in cuBLAS mode the LoRA term is written before cuBLAS adds the base
GEMM onto it (beta=1) instead of a pass reading the GEMM's output back. Counted by the launches made."""

from __future__ import annotations

import pytest
import torch
from _util import DEVICE, assert_close_rule
from test_lora import check_case

import peftkern

tri = pytest.importorskip("peftkern.triton.lora")


@pytest.fixture
def nondeterministic():
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(False)
    yield
    torch.use_deterministic_algorithms(old)


@pytest.mark.parametrize("m, n, r", [(37, 24, 3), (130, 72, 8), (5, 200, 16)])
def test_dy_pass_equals_both_reductions(m, n, r, nondeterministic):
    dy = torch.randn(m, n, device=DEVICE)
    b = torch.randn(n, r, device=DEVICE)
    t = torch.randn(m, r, device=DEVICE)
    dt, d_b = tri.dy_pass(dy, b, t, 0.7, "ieee")
    dt64 = dy.double() @ b.double() * 0.7
    db64 = dy.double().t() @ t.double() * 0.7
    assert_close_rule("dt", dt, dt64, (dy @ b) * 0.7)
    assert_close_rule("dB", d_b, db64, (dy.t() @ t) * 0.7)


def test_dy_pass_on_an_empty_batch(nondeterministic):
    dt, d_b = tri.dy_pass(torch.empty(0, 8, device=DEVICE), torch.randn(8, 2, device=DEVICE),
                          torch.empty(0, 2, device=DEVICE), 1.0, "ieee")
    assert dt.shape == (0, 2) and d_b.shape == (8, 2) and not d_b.any()


@pytest.mark.parametrize("mode", ["fused", "cublas"])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_backward_with_one_pass_over_dy(mode, p, nondeterministic, monkeypatch):
    """Every gradient still equals the fp64 reference (with the kernel's mask) on the one-pass path."""
    monkeypatch.setenv("PEFTKERN_LORA_GEMM", mode)
    check_case("triton", torch.float32, (3, 13), 100, 72, 8, p=p, adapter_dtype=torch.float32)
    check_case("triton", torch.float16, (70,), 64, 130, 4, p=p, bias=False)


def _launches(monkeypatch) -> list[str]:
    """Names of the LoRA kernels launched (each launch reads or writes the activations it names once)."""
    seen = []
    for name in ("_shrink_kernel", "_dy_kernel", "_adapter_grad_kernel", "_lora_epilogue_kernel", "_gemm_lora_kernel"):
        kernel = getattr(tri, name)

        class Counting:
            def __init__(self, kernel, name):
                self.kernel, self.name = kernel, name

            def __getitem__(self, grid):
                launch = self.kernel[grid]
                return lambda *a, **k: (seen.append(self.name), launch(*a, **k))[1]

        monkeypatch.setattr(tri, name, Counting(kernel, name))
    return seen


@pytest.mark.parametrize("mode, deterministic, fwd, bwd", [
    # cuBLAS mode: shrink reads x, the epilogue writes the LoRA term (cuBLAS adds x Wᵀ on it); backward: one
    # pass over dy (dt + dB), the dx LoRA term written, one adapter_grad reading x for dA.
    ("cublas", False, ["_shrink_kernel", "_lora_epilogue_kernel"],
     ["_dy_kernel", "_lora_epilogue_kernel", "_adapter_grad_kernel"]),
    # fused mode: the LoRA term rides in the GEMM's prologue, nothing is written twice.
    ("fused", False, ["_shrink_kernel", "_gemm_lora_kernel"],
     ["_dy_kernel", "_gemm_lora_kernel", "_adapter_grad_kernel"]),
    # deterministic algorithms: no atomics, dy is read twice (shrink for dt, adapter_grad for dB).
    ("cublas", True, ["_shrink_kernel", "_lora_epilogue_kernel"],
     ["_shrink_kernel", "_lora_epilogue_kernel", "_adapter_grad_kernel", "_adapter_grad_kernel"]),
])
def test_launches_per_layer(mode, deterministic, fwd, bwd, monkeypatch):
    monkeypatch.setenv("PEFTKERN_LORA_GEMM", mode)
    seen = _launches(monkeypatch)
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        x = torch.randn(40, 32, device=DEVICE, requires_grad=True)
        w, a = torch.randn(24, 32, device=DEVICE), torch.randn(4, 32, device=DEVICE, requires_grad=True)
        b = torch.randn(24, 4, device=DEVICE, requires_grad=True)
        with peftkern.use_backend("triton"):
            y = peftkern.ops.lora_linear(x, w, None, a, b, 0.5, 0.1)
            assert seen == fwd
            seen.clear()
            y.sum().backward()
        assert sorted(seen) == sorted(bwd)
    finally:
        torch.use_deterministic_algorithms(old)


def test_autotune_keys_separate_decode_from_training_and_dropout():
    """Tiles tuned at one row count (or with dropout off) must not serve another; and no key may hold a value
    that changes with M itself (a recompile per distinct M)."""
    import peftkern.triton.adapter as adapter
    import peftkern.triton.ia3 as ia3

    tuned = {"lora": [tri._gemm_lora_kernel, tri._shrink_kernel, tri._adapter_grad_kernel, tri._lora_epilogue_kernel,
                      tri._dy_kernel],
             "ia3": [ia3._ia3_gemm_kernel],
             "adapter": [adapter._fwd_kernel, adapter._bwd_dz_kernel, adapter._bwd_cols_kernel]}
    for op, kernels in tuned.items():
        for k in kernels:
            assert "M_KEY" in k.keys, (op, k.fn.__name__)
            assert not {"M", "SPLIT", "rows_per_split"} & set(k.keys), (op, k.fn.__name__)
            if op == "lora" and "HAS_DROPOUT" in k.fn.arg_names:
                assert "HAS_DROPOUT" in k.keys, k.fn.__name__
