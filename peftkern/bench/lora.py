"""LoRA linear microbenchmark: peftkern beside peft's layer, an eager composition, torch.compile
of peft's layer, and the frozen base linear (the floor), on the same inputs in one process.
A spec for the shared harness (bench/_harness.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.lora import CUDA_DECODE_MAX_M, draw_seed, lora_linear
from ..reference import lora as ref
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
    train: bool  # training step (fwd/bwd/full) or inference (fwd under no_grad)


PRESETS = {
    "llama-7b": [Case("train", 8192, 4096, 4096, 16, 0.1, True),
                 Case("decode-m1", 1, 4096, 4096, 16, 0.0, False),
                 Case("decode-m16", 16, 4096, 4096, 16, 0.0, False)],
    "llama-1b": [Case("train", 8192, 2048, 2048, 16, 0.1, True),
                 Case("decode-m1", 1, 2048, 2048, 16, 0.0, False)],
    "tiny": [Case("train", 512, 512, 512, 16, 0.1, True),
             Case("decode-m4", 4, 512, 512, 16, 0.0, False)],
}
QUICK = {"tiny": [Case("train", 256, 256, 256, 16, 0.1, True), Case("decode-m4", 4, 256, 256, 16, 0.0, False)]}
BASELINES = ("peft", "eager", "peft+compile", "base")
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
    cfg = peft.LoraConfig(r=case.r, lora_alpha=2 * case.r, lora_dropout=case.p, target_modules=["proj"])
    model = peft.get_peft_model(net, cfg)
    layer = model.base_model.model.proj
    with torch.no_grad():  # peft starts B at zero; a benchmark wants a live adapter
        layer.lora_B["default"].weight.normal_(0, 0.02)
    return layer.train(case.train)


def keep_mask(backend: str, m: int, n: int, p: float, seed: int, device) -> torch.Tensor:
    """The dropout keep-mask `backend` draws for `seed` (the torch backend and the kernels each have their
    own generator; the cuda backend's LoRA kernel has no dropout: a p > 0 call runs on Triton)."""
    if backend in ("triton", "cuda"):
        from ..triton.lora import dropout_keep

        return dropout_keep(m, n, p, seed, device)
    return ref.dropout_keep((m, n), p, seed, device)


def _setup(case: Case, dtype, device, compile_baseline: bool) -> _harness.Setup:
    x = torch.randn(case.m, case.d_in, device=device, dtype=dtype)
    layer = _peft_layer(case, dtype, device)
    base = layer.base_layer
    w, b = base.weight, base.bias
    a32, b32 = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    s = layer.scaling["default"]
    # The pure eager composition in the activation dtype (adapters cast once, outside the timing).
    a_h = a32.detach().to(dtype).requires_grad_(True)
    b_h = b32.detach().to(dtype).requires_grad_(True)
    p = case.p if case.train else 0.0

    def check(name, run, leaves, seed=CHECK_SEED):
        """Output and every gradient (x, lora_A, lora_B) of one call against fp64, with the kernel's own mask."""
        keep = None
        if p > 0.0:
            torch.manual_seed(seed)  # check_op runs the provider after the same manual_seed: the op draws this seed
            keep = keep_mask(name.removeprefix("peftkern-"), case.m, case.d_in, p, int(draw_seed(p)), x.device)
        reference = lambda x, w, b, a, lora_b: ref.lora_linear(x, w, b, a, lora_b, s, keep, p)
        return check_op(run, reference, [*leaves, w, b, a32, b32], ["dx", "dW", "db", "dA", "dB"], seed=seed)

    cuda_refused = None
    if case.train or case.m > CUDA_DECODE_MAX_M:
        cuda_refused = f"decode kernel only (M <= {CUDA_DECODE_MAX_M}, inference)"
    return _harness.Setup(
        inputs=[x],
        baselines={
            "base": lambda x: F.linear(x, w, b),
            "peft": lambda x: layer(x),
            "eager": lambda x: F.linear(x, w, b) + F.linear(F.linear(F.dropout(x, p, True), a_h), b_h) * s,
            "peft+compile": _harness.compiled(compile_baseline, layer),
        },
        op=lambda x: lora_linear(x, w, b, a32, b32, s, p),
        check=check,
        params=[w, b, a32, b32, a_h, b_h],
        train=case.train,
        cuda_refused=cuda_refused,
        work={"flops_fwd": 2 * case.m * case.d_in * case.d_out + 2 * case.m * case.r * (case.d_in + case.d_out),
              "bytes_fwd_min": (case.m * (case.d_in + case.d_out) + case.d_in * case.d_out) * x.element_size()},
    )


SPEC = _harness.OpSpec(
    op="lora", presets=PRESETS, quick=QUICK, setup=_setup,
    shape=lambda c: dict(m=c.m, d_in=c.d_in, d_out=c.d_out, r=c.r, dropout=c.p if c.train else 0.0),
)


def run(preset: str, dtype, device, quick: bool, timeit, peak_bytes, progress, compile_baseline: bool):
    return _harness.run(SPEC, preset, dtype, device, quick, timeit, peak_bytes, progress, compile_baseline)
