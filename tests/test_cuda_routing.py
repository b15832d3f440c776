"""Which backend each op picks on a CUDA device, tested on the CPU: the extension's availability is faked
(`peftkern._ext.available`), Triton is taken to run on CUDA tensors, and the ops' own routing functions
(`_fwd_backends`, `_bwd_backends`, `lora._backends`) are handed to `_backend.dispatch` with a CUDA device.
No tensor is placed on a GPU and no kernel runs: only the decisions are checked."""

from __future__ import annotations

import logging
import re

import pytest
import torch

from peftkern import _backend, _ext
from peftkern.ops import adapter, ia3, lora, prefix

CUDA = torch.device("cuda")  # a device object only; every tensor here stays on the CPU


class FakeExtension:
    """Stands in for `_ext.available`: says whether the extension is loaded, and records each question's
    build_if_missing (an explicit cuda request may build it; auto dispatch must never start a build)."""

    def __init__(self):
        self.ok, self.why, self.asked = True, "", []

    def available(self, build_if_missing: bool = False) -> tuple[bool, str]:
        self.asked.append(build_if_missing)
        return self.ok, self.why


@pytest.fixture
def ext(monkeypatch):
    fake = FakeExtension()
    monkeypatch.setattr(_ext, "available", fake.available)
    monkeypatch.setattr(_backend, "triton_unavailable", lambda device: None)
    monkeypatch.setattr(_backend, "_logged", set())  # each test sees its own fallback log lines
    monkeypatch.setattr(lora, "_eager_backends", {})  # and its own eager-path choices
    monkeypatch.setenv("PEFTKERN_STRICT", "1")
    return fake


@pytest.fixture
def lenient(monkeypatch):
    monkeypatch.setenv("PEFTKERN_STRICT", "0")


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "peftkern" and r.levelno >= logging.WARNING]


def _infos(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "peftkern" and r.levelno == logging.INFO]


# ------------------------------------------------------------------------------------------------ LoRA


def _lora(m=4, r=8, x_dtype=torch.bfloat16, a_dtype=torch.float32, p=0.0, contiguous_weight=True):
    x2d = torch.zeros(m, 64, dtype=x_dtype)
    weight = torch.zeros(48, 64, dtype=x_dtype)
    if not contiguous_weight:
        weight = torch.zeros(64, 48, dtype=x_dtype).t()
    return lora._fwd_backends(x2d, weight, torch.zeros(r, 64, dtype=a_dtype), p)


def test_lora_auto_takes_triton_on_cuda_decode_is_opt_in(ext, caplog):
    caplog.set_level(logging.INFO, logger="peftkern")
    with _backend.use_backend("auto"):
        assert _backend.dispatch("lora_linear", CUDA, _lora(m=1)) == "triton"  # strict does not apply to auto
    assert ext.asked == [False]  # auto asks for a loaded extension, never a build
    assert any("opt-in" in m for m in _infos(caplog)) and not _warnings(caplog)


@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize(("x_dtype", "a_dtype"), [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                  (torch.float16, torch.float16)], ids=["fp32", "bf16-fp32A", "fp16"])
def test_lora_explicit_cuda_takes_decode_rows(ext, caplog, m, x_dtype, a_dtype):
    caplog.set_level(logging.INFO, logger="peftkern")
    with _backend.use_backend("cuda"):
        assert _backend.dispatch("lora_linear", CUDA, _lora(m=m, r=128, x_dtype=x_dtype, a_dtype=a_dtype)) == "cuda"
    assert ext.asked == [True]  # an explicit request may build the extension
    assert not [r for r in caplog.records if r.name == "peftkern"]


LORA_REFUSALS = {
    "M=17": (dict(m=17), "M <= 16 rows, got 17", "triton"),
    "dropout": (dict(p=0.1), "no dropout", "triton"),
    "r=129": (dict(r=129), "rank r <= 128", "triton"),  # the decode kernel's limit; Triton takes any rank
    "fp16 adapters on bf16": (dict(a_dtype=torch.float16), "adapters in fp32 or in x's dtype", "triton"),
    "strided weight": (dict(contiguous_weight=False), "contiguous weight", "triton"),
}


@pytest.mark.parametrize("case", list(LORA_REFUSALS))
def test_lora_explicit_cuda_refusal_raises_under_strict(ext, case):
    kwargs, why, _ = LORA_REFUSALS[case]
    refused = "backend 'cuda' cannot take this call: .*" + re.escape(why)
    with _backend.use_backend("cuda"), pytest.raises(_backend.BackendUnavailable, match=refused):
        _backend.dispatch("lora_linear", CUDA, _lora(**kwargs))


@pytest.mark.parametrize("case", list(LORA_REFUSALS))
def test_lora_explicit_cuda_refusal_falls_back_logged(ext, lenient, caplog, case):
    kwargs, why, fallback = LORA_REFUSALS[case]
    with _backend.use_backend("cuda"):
        assert _backend.dispatch("lora_linear", CUDA, _lora(**kwargs)) == fallback
    warned = _warnings(caplog)
    assert len(warned) == 1 and why in warned[0] and warned[0].endswith(f"using {fallback}")


def test_lora_explicit_cuda_without_the_extension(ext, lenient, caplog):
    ext.ok, ext.why = False, "not built here (fake)"
    with _backend.use_backend("cuda"):
        assert _backend.dispatch("lora_linear", CUDA, _lora(m=1)) == "triton"
    assert ext.asked == [True]
    assert any("not built here (fake)" in m for m in _warnings(caplog))


def test_lora_explicit_cuda_without_the_extension_raises_under_strict(ext):
    ext.ok, ext.why = False, "not built here (fake)"
    with _backend.use_backend("cuda"), pytest.raises(_backend.BackendUnavailable, match=r"not built here \(fake\)"):
        _backend.dispatch("lora_linear", CUDA, _lora(m=1))


def test_cuda_request_on_cpu_tensors_never_asks_the_extension(ext):
    refused = "runs on CUDA tensors, got cpu"
    with _backend.use_backend("cuda"), pytest.raises(_backend.BackendUnavailable, match=refused):
        _backend.dispatch("lora_linear", torch.device("cpu"), _lora(m=1))
    assert ext.asked == []


@pytest.mark.parametrize("loaded", [True, False])
def test_lora_eager_path_choices(ext, loaded):
    """The eager path's cached choice: auto never takes the cuda decode kernel, loaded or not; an explicit
    cuda request leaves the forward to the op (it depends on M) and runs the Triton backward."""
    ext.ok = loaded
    with _backend.use_backend("auto"):
        assert lora._backends(CUDA, 8) == ("triton", "triton")
        assert lora._backends(CUDA, 129) == ("triton", "triton")  # the Triton kernels take any rank
    assert True not in ext.asked
    with _backend.use_backend("cuda"):
        assert lora._backends(CUDA, 8) == ("", "triton")


@pytest.mark.parametrize(("module", "op"), [(lora, "lora_linear_backward"), (adapter, "bottleneck_adapter_backward")])
def test_backward_without_a_cuda_kernel_runs_triton_for_a_cuda_request(ext, module, op):
    """LoRA's and the adapter's backward have no CUDA C++ kernel: a cuda request hands them Triton (by design,
    so no fallback and no strict error), and their backward routing offers no cuda at all."""
    impls = module._bwd_backends(8) if module is lora else module._bwd_backends()
    assert "cuda" not in impls
    with _backend.use_backend("cuda"):
        requested = _backend.backward_backend(cuda_backward=False)
    assert requested == "triton"
    assert _backend.dispatch(op, CUDA, impls, requested=requested) == "triton"
    with pytest.raises(_backend.BackendUnavailable, match=f"{op} has no cuda implementation"):
        _backend.dispatch(op, CUDA, impls, requested="cuda")


def test_lora_large_rank_backward_stays_on_triton(ext):
    for r in (129, 512):
        assert _backend.dispatch("lora_linear_backward", CUDA, lora._bwd_backends(r), requested="auto") == "triton"


# --------------------------------------------------------------------------------------------- adapter


def _adapter(x_dtype=torch.float16, w_dtype=None, r=64):
    x = torch.zeros(3, 96, dtype=x_dtype)
    return adapter._fwd_backends(x, torch.zeros(r, 96, dtype=w_dtype or x_dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_adapter_auto_takes_cuda_when_loaded(ext, dtype):
    with _backend.use_backend("auto"):
        assert _backend.dispatch("bottleneck_adapter", CUDA, _adapter(dtype, r=128)) == "cuda"
    assert ext.asked == [False]


def test_adapter_auto_without_the_extension_takes_triton_quietly(ext, caplog):
    caplog.set_level(logging.INFO, logger="peftkern")
    ext.ok, ext.why = False, "not built (fake)"
    with _backend.use_backend("auto"):
        assert _backend.dispatch("bottleneck_adapter", CUDA, _adapter()) == "triton"
    assert ext.asked == [False] and not _warnings(caplog)
    assert any("not built (fake)" in m for m in _infos(caplog))


ADAPTER_REFUSALS = {
    "fp32 x": (dict(x_dtype=torch.float32), "fp16/bf16 x with adapters of x's dtype"),
    "fp32 adapters on fp16": (dict(w_dtype=torch.float32), "fp16/bf16 x with adapters of x's dtype"),
    "r=129": (dict(r=129), "r <= 128, got 129"),
}


@pytest.mark.parametrize("case", list(ADAPTER_REFUSALS))
def test_adapter_cuda_refusals(ext, monkeypatch, caplog, case):
    kwargs, why = ADAPTER_REFUSALS[case]
    with _backend.use_backend("cuda"), pytest.raises(_backend.BackendUnavailable, match=re.escape(why)):
        _backend.dispatch("bottleneck_adapter", CUDA, _adapter(**kwargs))
    with _backend.use_backend("auto"):  # auto moves on to Triton, strict or not
        assert _backend.dispatch("bottleneck_adapter", CUDA, _adapter(**kwargs)) == "triton"
    assert not _warnings(caplog)
    monkeypatch.setattr(_backend, "_logged", set())  # auto's note of this reason would hide the warning
    monkeypatch.setenv("PEFTKERN_STRICT", "0")
    with _backend.use_backend("cuda"):
        assert _backend.dispatch("bottleneck_adapter", CUDA, _adapter(**kwargs)) == "triton"
    assert any(why in m for m in _warnings(caplog))


# ------------------------------------------------------------------------------------------------- IA3


@pytest.mark.parametrize("feedforward", [True, False], ids=["feedforward", "output"])
def test_ia3_auto_takes_cuda_when_loaded(ext, feedforward):
    # The output case needs aten::mm.dtype (a GEMM with fp32 output); torch versions without it use Triton.
    want = "cuda" if feedforward or hasattr(torch.ops.aten.mm, "dtype") else "triton"
    with _backend.use_backend("auto"):
        assert _backend.dispatch("ia3_linear", CUDA, ia3._fwd_backends(feedforward)) == want
    assert ext.asked == [False]


def test_ia3_backward_follows_the_request(ext, monkeypatch):
    """IA3's backward has a CUDA path: a cuda request reaches it, and falls back to Triton (strict: raises)
    when the extension is not there."""
    with _backend.use_backend("cuda"):
        assert _backend.dispatch("ia3_linear_backward", CUDA, ia3._bwd_backends()) == "cuda"
    ext.ok, ext.why = False, "not built (fake)"
    with _backend.use_backend("cuda"), pytest.raises(_backend.BackendUnavailable, match=r"not built \(fake\)"):
        _backend.dispatch("ia3_linear_backward", CUDA, ia3._bwd_backends())
    monkeypatch.setenv("PEFTKERN_STRICT", "0")
    with _backend.use_backend("cuda"):
        assert _backend.dispatch("ia3_linear_backward", CUDA, ia3._bwd_backends()) == "triton"


# ---------------------------------------------------------------------------------------------- prefix


def _prefix_bwd(shared_prefix=True, head_dim=64):
    q = torch.zeros(2, 4, 8, head_dim)
    k = torch.zeros(2, 4, 8, head_dim)
    prefix_k = torch.zeros(4, 3, head_dim) if shared_prefix else torch.zeros(2, 4, 3, head_dim)
    return prefix._bwd_backends(q, k, prefix_k)


def test_prefix_backward_auto_reduces_a_shared_prefix_on_cuda(ext):
    with _backend.use_backend("auto"):
        assert _backend.dispatch("prefix_attention_backward", CUDA, _prefix_bwd()) == "cuda"
        assert _backend.dispatch("prefix_attention_backward", CUDA, _prefix_bwd(shared_prefix=False)) == "triton"
    with _backend.use_backend("cuda"):  # prefix's backward has a CUDA part: the forward's request is kept
        assert _backend.backward_backend(cuda_backward=True) == "cuda"


def test_prefix_backward_per_batch_prefix_refused_for_cuda(ext):
    with pytest.raises(_backend.BackendUnavailable, match="per-batch"):
        _backend.dispatch("prefix_attention_backward", CUDA, _prefix_bwd(shared_prefix=False), requested="cuda")


def test_prefix_backward_head_dim_beyond_triton_goes_to_torch(ext, caplog):
    impls = _prefix_bwd(head_dim=1024)
    with _backend.use_backend("auto"):  # strict (set) concerns explicit requests only
        assert _backend.dispatch("prefix_attention_backward", CUDA, impls) == "torch"
    assert any("head dim 1024" in m for m in _warnings(caplog))  # a CUDA tensor on torch is a warning


def test_op_without_a_cuda_forward_runs_triton_for_a_cuda_request(ext, lenient, caplog):
    """prefix_attention's forward offers torch and triton only: a cuda request runs Triton, logged."""
    impls = {"torch": lambda: None, "triton": lambda: None}
    with _backend.use_backend("cuda"):
        assert _backend.dispatch("prefix_attention", CUDA, impls) == "triton"
    assert any("prefix_attention has no cuda implementation" in m for m in _warnings(caplog))
    assert ext.asked == []  # no implementation: the extension is not even asked
