"""IA3 linear microbenchmark: peftkern beside peft's IA3 layer, torch.compile of it, and the frozen
base linear (the floor), on the same inputs in one process; both modes (k/v output scale and
feed-forward input scale). A spec for the shared harness (bench/_harness.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.ia3 import ia3_linear
from ..reference import ia3 as ref
from . import _harness
from ._check import check_op


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
BASELINES = ("peft", "peft+compile", "base")


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


def _setup(case: Case, dtype, device, compile_baseline: bool) -> _harness.Setup:
    x = torch.randn(case.m, case.d_in, device=device, dtype=dtype)
    layer = _peft_layer(case, dtype, device)
    w, b = layer.base_layer.weight, layer.base_layer.bias
    lv = layer.ia3_l["default"]  # fp32, peft's (out, 1) / (1, in) layout
    ff = case.feedforward

    def check(name, run, leaves):
        """Output and every gradient (x, ia3_l) of one call against fp64 (peft's computation in the same
        dtypes bounds the error)."""
        # peft keeps l as (out, 1) or (1, in); the reference broadcasts a flat vector against y or x
        reference = lambda x, w, b, lv: ref.ia3_linear(x, w, b, lv.reshape(-1), ff)
        return check_op(run, reference, [*leaves, w, b, lv], ["dx", "dW", "db", "dl"])

    return _harness.Setup(
        inputs=[x],
        baselines={"base": lambda x: F.linear(x, w, b), "peft": lambda x: layer(x),
                   "peft+compile": _harness.compiled(compile_baseline, layer)},
        op=lambda x: ia3_linear(x, w, b, lv, ff),
        check=check,
        params=[w, b, lv],
        work={"flops_fwd": 2 * case.m * case.d_in * case.d_out,
              "bytes_fwd_min": (case.m * (case.d_in + case.d_out) + case.d_in * case.d_out) * x.element_size()},
    )


SPEC = _harness.OpSpec(
    op="ia3", presets=PRESETS, quick=QUICK, setup=_setup,
    shape=lambda c: dict(m=c.m, d_in=c.d_in, d_out=c.d_out, feedforward=c.feedforward),
)


def run(preset: str, dtype, device, quick: bool, timeit, peak_bytes, progress, compile_baseline: bool):
    return _harness.run(SPEC, preset, dtype, device, quick, timeit, peak_bytes, progress, compile_baseline)
