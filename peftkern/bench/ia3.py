"""IA3 linear microbenchmark: peftkern beside peft's IA3 layer, torch.compile of it, and the frozen
base linear (the floor), on the same inputs in one process; both modes (k/v output scale and
feed-forward input scale)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import _backend
from ..ops.ia3 import ia3_linear
from ..reference import ia3 as ref
from ._check import check_op
from ._timing import cuda_why_not, measure_train, provider_rows, triton_why_not


@dataclass
class Case:
    name: str
    m: int
    d_in: int
    d_out: int
    feedforward: bool


def _pair(m, d_in, d_out):
    return [Case("kv", m, d_in, d_out, False), Case("ff", m, d_in, d_out, True)]


PRESETS = {"llama-7b": _pair(8192, 4096, 4096), "llama-1b": _pair(8192, 2048, 2048), "tiny": _pair(512, 512, 512)}
QUICK = {"tiny": _pair(256, 256, 256)}


class _Net(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.k_proj = nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.k_proj(x)


def _peft_layer(case: Case, dtype, device):
    import peft

    net = _Net(case.d_in, case.d_out).to(device=device, dtype=dtype)
    cfg = peft.IA3Config(target_modules=["k_proj"], feedforward_modules=["k_proj"] if case.feedforward else [])
    layer = peft.get_peft_model(net, cfg).base_model.model.k_proj
    with torch.no_grad():  # peft starts l at ones; a benchmark wants a live adapter
        layer.ia3_l["default"].uniform_(0.5, 1.5)
    return layer.train()


def providers(case: Case, dtype, device, compile_baseline: bool) -> dict[str, Callable | str]:
    """name -> forward closure over shared inputs, or a string saying why it is skipped."""
    layer = _peft_layer(case, dtype, device)
    w, b = layer.base_layer.weight, layer.base_layer.bias
    lv = layer.ia3_l["default"]  # fp32, peft's (out, 1) / (1, in) layout
    ff = case.feedforward
    out: dict[str, Callable | str] = {"base": lambda x: F.linear(x, w, b), "peft": lambda x: layer(x)}
    if compile_baseline:
        compiled = torch.compile(layer)
        out["peft+compile"] = lambda x: compiled(x)
    else:
        out["peft+compile"] = "skipped on CPU (slow to compile; pass --compile)"
    for name in _backend.BACKENDS:
        why = _backend_why_not(name, device)
        out[f"peftkern-{name}"] = why or _bound(name, lambda x: ia3_linear(x, w, b, lv, ff))
    out["_params"] = [w, b, lv]  # type: ignore[assignment]
    return out


def _bound(backend: str, fn):
    def run(x):
        with _backend.use_backend(backend):
            return fn(x)

    return run


def _backend_why_not(name: str, device) -> str | None:
    if name == "triton":
        return triton_why_not(device)
    if name == "cuda":
        return cuda_why_not(device)
    return None


def run(preset: str, dtype, device, quick: bool, timeit, peak_bytes, progress, compile_baseline: bool):
    rows = []
    for case in (QUICK.get(preset) if quick else None) or PRESETS[preset]:
        x = torch.randn(case.m, case.d_in, device=device, dtype=dtype)
        provs = providers(case, dtype, device, compile_baseline)
        params = provs.pop("_params")
        shape = dict(m=case.m, d_in=case.d_in, d_out=case.d_out, feedforward=case.feedforward,
                     dtype=str(dtype).split(".")[-1])
        measure = functools.partial(_measure, x0=x, case=case, params=params, device=device, quick=quick, timeit=timeit,
                                    peak_bytes=peak_bytes)
        check = functools.partial(_check, x0=x, case=case, params=params)
        rows += provider_rows("ia3", case.name, shape, provs, measure, progress, check=check)
    return rows


def _check(name, fn, x0, case, params):
    """Output and every gradient (x, ia3_l) of one call against fp64 (peft's computation in the same dtypes
    bounds the error)."""
    w, b, lv = params
    x = x0.detach().requires_grad_(True)
    # peft keeps l as (out, 1) or (1, in); the reference broadcasts a flat vector against y or x
    reference = lambda x, w, b, lv: ref.ia3_linear(x, w, b, lv.reshape(-1), case.feedforward)
    return check_op(lambda: fn(x), reference, [x, w, b, lv], ["dx", "dW", "db", "dl"])


def _measure(fn, x0, case, params, device, quick, timeit, peak_bytes):
    x = x0.detach().requires_grad_(True)
    live = [p for p in params if p is not None]
    res = measure_train(lambda: fn(x), [x, *[p for p in live if p.requires_grad]], live, device, quick, timeit,
                        peak_bytes)
    res["flops_fwd"] = 2 * case.m * case.d_in * case.d_out
    res["bytes_fwd_min"] = (case.m * (case.d_in + case.d_out) + case.d_in * case.d_out) * x0.element_size()
    return res


BASELINES = ("peft", "peft+compile", "base")
