"""Bottleneck adapter microbenchmark: peftkern's backends beside the eager composition (F.linear, act,
F.linear, add) and its torch.compile, on the same inputs in one process. Adapter tensors are in x's dtype.
The cuda backend is a forward kernel: its rows' backward is the Triton backward (logged as a fallback)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import _backend
from ..ops.adapter import CUDA_MAX_R, bottleneck_adapter
from ..reference import adapter as ref
from ._check import check_op
from ._timing import cuda_why_not, measure_train, provider_rows, triton_why_not

_ACT = {"relu": F.relu, "gelu": F.gelu, "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"), "silu": F.silu}


@dataclass
class Case:
    name: str
    m: int
    d: int
    r: int
    act: str
    residual: bool  # parallel adapter (separate residual) or serial (x is the residual)


def _cases(m, d, r):
    return [Case("serial", m, d, r, "relu", False), Case("parallel", m, d, r, "silu", True)]


PRESETS = {"llama-7b": _cases(8192, 4096, 64), "llama-1b": _cases(8192, 2048, 64), "tiny": _cases(512, 512, 16)}
QUICK = {"tiny": [Case("serial", 256, 256, 16, "relu", False)]}


SCALING = 0.5


def _eager(x, dw, db, uw, ub, res, act, s):
    return (x if res is None else res) + F.linear(_ACT[act](F.linear(x, dw, db)), uw, ub) * s


def providers(case: Case, dtype, device, compile_baseline: bool) -> dict[str, Callable | str]:
    """name -> forward closure over shared adapter tensors, or a string saying why it is skipped."""
    g = lambda *s, std: (torch.randn(*s, device=device) * std).to(dtype).requires_grad_(True)
    dw, db = g(case.r, case.d, std=case.d ** -0.5), g(case.r, std=0.02)
    uw, ub = g(case.d, case.r, std=case.r ** -0.5), g(case.d, std=0.02)
    s = SCALING
    out: dict[str, Callable | str] = {"eager": lambda x, res: _eager(x, dw, db, uw, ub, res, case.act, s)}
    if compile_baseline:
        compiled = torch.compile(_eager)
        out["eager+compile"] = lambda x, res: compiled(x, dw, db, uw, ub, res, case.act, s)
    else:
        out["eager+compile"] = "skipped on CPU (slow to compile; pass --compile)"
    for name in _backend.BACKENDS:
        why = _backend_why_not(name, case, dtype, device)
        out[f"peftkern-{name}"] = why or _bound(name, lambda x, res: bottleneck_adapter(x, dw, db, uw, ub, res,
                                                                                         case.act, s))
    out["_params"] = [dw, db, uw, ub]  # type: ignore[assignment]
    return out


def _bound(backend: str, fn):
    def run(x, res):
        with _backend.use_backend(backend):
            return fn(x, res)

    return run


def _backend_why_not(name: str, case: Case, dtype, device) -> str | None:
    if name == "triton":
        return triton_why_not(device)
    if name == "cuda":
        if device.type != "cuda":
            return cuda_why_not(device)
        if dtype == torch.float32 or case.r > CUDA_MAX_R:
            return f"fp16/bf16 and r <= {CUDA_MAX_R} only"
        return cuda_why_not(device)
    return None


def run(preset: str, dtype, device, quick: bool, timeit, peak_bytes, progress, compile_baseline: bool):
    rows = []
    for case in (QUICK.get(preset) if quick else None) or PRESETS[preset]:
        x0 = torch.randn(case.m, case.d, device=device, dtype=dtype)
        res0 = torch.randn_like(x0) if case.residual else None
        provs = providers(case, dtype, device, compile_baseline)
        params = provs.pop("_params")
        shape = dict(m=case.m, d=case.d, r=case.r, act=case.act, residual=case.residual,
                     dtype=str(dtype).split(".")[-1])
        measure = functools.partial(_measure, x0=x0, res0=res0, case=case, params=params, device=device,
                                    quick=quick, timeit=timeit, peak_bytes=peak_bytes)
        check = functools.partial(_check, x0=x0, res0=res0, case=case, params=params)
        rows += provider_rows("adapter", case.name, shape, provs, measure, progress, check=check)
    return rows


def _check(name, fn, x0, res0, case, params):
    """Output and every gradient (x, residual, the four adapter tensors) of one call against fp64."""
    x = x0.detach().requires_grad_(True)
    res = None if res0 is None else res0.detach().requires_grad_(True)
    dw, db, uw, ub = params
    reference = lambda x, dw, db, uw, ub, res: ref.bottleneck_adapter(x, dw, db, uw, ub, res, case.act, SCALING)
    return check_op(lambda: fn(x, res), reference, [x, dw, db, uw, ub, res],
                    ["dx", "d_down_w", "d_down_b", "d_up_w", "d_up_b", "d_residual"])


def _measure(fn, x0, res0, case, params, device, quick, timeit, peak_bytes):
    x = x0.detach().requires_grad_(True)
    res = None if res0 is None else res0.detach().requires_grad_(True)
    grads = [t for t in (x, res, *params) if t is not None]
    out = measure_train(lambda: fn(x, res), grads, params, device, quick, timeit, peak_bytes)
    elt = x0.element_size()
    out["flops_fwd"] = 4 * case.m * case.d * case.r
    # Compulsory traffic: read x (and the residual), write y, read the weights once.
    out["bytes_fwd_min"] = (case.m * case.d * (3 if case.residual else 2) + 2 * case.d * case.r) * elt
    return out


BASELINES = ("eager", "eager+compile")
