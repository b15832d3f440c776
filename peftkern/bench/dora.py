"""DoRA linear microbenchmark: peftkern's dora_linear beside peft's DoRA layer (use_dora=True), torch.compile of
it, and the frozen base linear (the floor), on the same inputs in one process. A spec for the shared harness
(bench/_harness.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.dora import dora_linear, weight_sq_norm
from ..ops.lora import draw_seed
from ..reference import dora as ref
from ..reference.lora import dropout_keep
from . import _harness
from ._check import check_op


@dataclass
class Case:
    name: str
    m: int
    d_in: int
    d_out: int
    r: int
    p: float
    train: bool


PRESETS = {
    "llama-7b": [Case("train", 8192, 4096, 4096, 16, 0.0, True), Case("train-drop", 8192, 4096, 4096, 16, 0.1, True)],
    "llama-1b": [Case("train", 8192, 2048, 2048, 16, 0.0, True), Case("train-drop", 8192, 2048, 2048, 16, 0.1, True)],
    "tiny": [Case("train", 512, 512, 512, 16, 0.0, True), Case("train-drop", 512, 512, 512, 16, 0.1, True)],
}
QUICK = {"tiny": [Case("train", 256, 256, 256, 16, 0.0, True), Case("train-drop", 256, 256, 256, 16, 0.1, True)]}
BASELINES = ("peft", "peft+compile", "base")
CHECK_SEED = 1234


class _Net(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.proj(x)


def _peft_layer(case: Case, dtype, device):
    import peft

    net = _Net(case.d_in, case.d_out).to(device=device, dtype=dtype)
    cfg = peft.LoraConfig(r=case.r, lora_alpha=2 * case.r, lora_dropout=case.p, target_modules=["proj"],
                          use_dora=True)
    layer = peft.get_peft_model(net, cfg).base_model.model.proj
    with torch.no_grad():  # peft starts B at zero (and m at the norm); a benchmark wants a live adapter
        layer.lora_B["default"].weight.normal_(0, 0.02)
        layer.lora_magnitude_vector["default"].weight.mul_(1.1)
    return layer.train(case.train)


def _setup(case: Case, dtype, device, compile_baseline: bool) -> _harness.Setup:
    x = torch.randn(case.m, case.d_in, device=device, dtype=dtype)
    layer = _peft_layer(case, dtype, device)
    w, b = layer.base_layer.weight, layer.base_layer.bias
    a32, b32 = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    mag = layer.lora_magnitude_vector["default"].weight
    s = layer.scaling["default"]
    p = case.p if case.train else 0.0
    sq = weight_sq_norm(w)  # cached per frozen weight, as the integration keeps it

    def check(name, run, leaves, seed=CHECK_SEED):
        """Output and every gradient (x, lora_A, lora_B, magnitude) against fp64, with the op's own mask."""
        keep = None
        if p > 0.0:
            torch.manual_seed(seed)
            keep = dropout_keep((case.m, case.d_in), p, int(draw_seed(p)), x.device)
        reference = lambda x, w, b, a, lora_b, m: ref.dora_linear(x, w, b, a, lora_b, m, s, keep, p)
        return check_op(run, reference, [*leaves, w, b, a32, b32, mag], ["dx", "dW", "db", "dA", "dB", "dm"],
                        seed=seed)

    return _harness.Setup(
        inputs=[x],
        baselines={
            "base": lambda x: F.linear(x, w, b),
            "peft": lambda x: layer(x),
            "peft+compile": _harness.compiled(compile_baseline, layer),
        },
        op=lambda x: dora_linear(x, w, b, a32, b32, mag, s, p, weight_sq_norm=sq),
        check=check,
        params=[w, b, a32, b32, mag],
        train=case.train,
        cuda_refused="no cuda DoRA kernel (the cuda backend runs the LoRA part on Triton)",
        work={"flops_fwd": (2 if p == 0 else 4) * case.m * case.d_in * case.d_out
              + 2 * case.m * case.r * (case.d_in + case.d_out),
              "bytes_fwd_min": (case.m * (case.d_in + case.d_out) + case.d_in * case.d_out) * x.element_size()},
    )


SPEC = _harness.OpSpec(
    op="dora", presets=PRESETS, quick=QUICK, setup=_setup,
    shape=lambda c: dict(m=c.m, d_in=c.d_in, d_out=c.d_out, r=c.r, dropout=c.p if c.train else 0.0),
)


def run(preset: str, dtype, device, quick: bool, timeit, peak_bytes, progress, compile_baseline: bool):
    return _harness.run(SPEC, preset, dtype, device, quick, timeit, peak_bytes, progress, compile_baseline)
