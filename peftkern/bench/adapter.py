"""Bottleneck adapter microbenchmark: peftkern's backends beside the eager composition (F.linear, act,
F.linear, add) and its torch.compile, on the same inputs in one process. Adapter tensors are in x's dtype.
The cuda backend is a forward kernel: its rows' backward is the Triton backward (logged as a fallback).
A spec for the shared harness (bench/_harness.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..ops.adapter import CUDA_MAX_R, bottleneck_adapter
from ..reference import adapter as ref
from . import _harness
from ._check import check_op

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
BASELINES = ("eager", "eager+compile")
SCALING = 0.5


def _eager(x, dw, db, uw, ub, res, act, s):
    return (x if res is None else res) + F.linear(_ACT[act](F.linear(x, dw, db)), uw, ub) * s


def _setup(case: Case, dtype, device, compile_baseline: bool) -> _harness.Setup:
    x0 = torch.randn(case.m, case.d, device=device, dtype=dtype)
    res0 = torch.randn_like(x0) if case.residual else None
    g = lambda *s, std: (torch.randn(*s, device=device) * std).to(dtype).requires_grad_(True)
    dw, db = g(case.r, case.d, std=case.d ** -0.5), g(case.r, std=0.02)
    uw, ub = g(case.d, case.r, std=case.r ** -0.5), g(case.d, std=0.02)
    s, act = SCALING, case.act

    def check(name, run, leaves):
        """Output and every gradient (x, residual, the four adapter tensors) of one call against fp64."""
        x, res = leaves
        reference = lambda x, dw, db, uw, ub, res: ref.bottleneck_adapter(x, dw, db, uw, ub, res, act, s)
        return check_op(run, reference, [x, dw, db, uw, ub, res],
                        ["dx", "d_down_w", "d_down_b", "d_up_w", "d_up_b", "d_residual"])

    cuda_refused = None
    if dtype == torch.float32 or case.r > CUDA_MAX_R:
        cuda_refused = f"fp16/bf16 and r <= {CUDA_MAX_R} only"
    # Compulsory traffic: read x (and the residual), write y, read the weights once.
    bytes_min = (case.m * case.d * (3 if case.residual else 2) + 2 * case.d * case.r) * x0.element_size()
    return _harness.Setup(
        inputs=[x0, res0],
        baselines={
            "eager": lambda x, res: _eager(x, dw, db, uw, ub, res, act, s),
            "eager+compile": _harness.compiled(compile_baseline, _eager,
                                               lambda c, x, res: c(x, dw, db, uw, ub, res, act, s)),
        },
        op=lambda x, res: bottleneck_adapter(x, dw, db, uw, ub, res, act, s),
        check=check,
        params=[dw, db, uw, ub],
        cuda_refused=cuda_refused,
        work={"flops_fwd": 4 * case.m * case.d * case.r, "bytes_fwd_min": bytes_min},
    )


SPEC = _harness.OpSpec(
    op="adapter", presets=PRESETS, quick=QUICK, setup=_setup,
    shape=lambda c: dict(m=c.m, d=c.d, r=c.r, act=c.act, residual=c.residual),
)


def run(preset: str, dtype, device, quick: bool, timeit, peak_bytes, progress, compile_baseline: bool):
    return _harness.run(SPEC, preset, dtype, device, quick, timeit, peak_bytes, progress, compile_baseline)
