"""LoRA linear microbenchmark: peftkern beside peft's layer, an eager composition, torch.compile
of peft's layer, and the frozen base linear (the floor), on the same inputs in one process."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import _backend
from ..ops.lora import CUDA_DECODE_MAX_M, draw_seed, lora_linear
from ..reference import lora as ref
from ._check import check_op
from ._timing import cuda_why_not, measure_train, provider_rows, triton_why_not


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


def providers(case: Case, dtype, device, compile_baseline: bool) -> dict[str, Callable | str]:
    """name -> forward closure over shared inputs, or a string saying why it is skipped."""
    layer = _peft_layer(case, dtype, device)
    base = layer.base_layer
    w, b = base.weight, base.bias
    a32, b32 = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    s = layer.scaling["default"]
    # The pure eager composition in the activation dtype (adapters cast once, outside the timing).
    a_h = a32.detach().to(dtype).requires_grad_(True)
    b_h = b32.detach().to(dtype).requires_grad_(True)
    p = case.p if case.train else 0.0

    out: dict[str, Callable | str] = {
        "base": lambda x: F.linear(x, w, b),
        "peft": lambda x: layer(x),
        "eager": lambda x: F.linear(x, w, b) + F.linear(F.linear(F.dropout(x, p, True), a_h), b_h) * s,
    }
    if compile_baseline:
        compiled = torch.compile(layer)
        out["peft+compile"] = lambda x: compiled(x)
    else:
        out["peft+compile"] = "skipped on CPU (slow to compile; pass --compile)"
    for name in _backend.BACKENDS:
        why = _backend_why_not(name, case, device)
        if why:
            out[f"peftkern-{name}"] = why
        else:
            out[f"peftkern-{name}"] = _bound(name, lambda x: lora_linear(x, w, b, a32, b32, s, p))
    out["_params"] = [w, b, a32, b32, a_h, b_h]  # type: ignore[assignment]
    out["_checked"] = (w, b, a32, b32, s)  # type: ignore[assignment]  # what the peftkern providers read
    return out


def _bound(backend: str, fn):
    def run(x):
        with _backend.use_backend(backend):
            return fn(x)

    return run


def _backend_why_not(name: str, case: Case, device) -> str | None:
    if name == "triton":
        return triton_why_not(device)
    if name == "cuda":
        if device.type != "cuda":
            return cuda_why_not(device)
        if case.train or case.m > CUDA_DECODE_MAX_M:
            return f"decode kernel only (M <= {CUDA_DECODE_MAX_M}, inference)"
        return cuda_why_not(device)
    return None


def run(preset: str, dtype, device, quick: bool, timeit, peak_bytes, progress, compile_baseline: bool):
    rows = []
    for case in (QUICK.get(preset) if quick else None) or PRESETS[preset]:
        x = torch.randn(case.m, case.d_in, device=device, dtype=dtype)
        provs = providers(case, dtype, device, compile_baseline)
        params = provs.pop("_params")
        checked = provs.pop("_checked")
        shape = dict(m=case.m, d_in=case.d_in, d_out=case.d_out, r=case.r, dropout=case.p if case.train else 0.0,
                     dtype=str(dtype).split(".")[-1])
        measure = functools.partial(_measure, x0=x, case=case, params=params, device=device, quick=quick, timeit=timeit,
                                    peak_bytes=peak_bytes)
        check = functools.partial(_check, x0=x, case=case, tensors=checked)
        rows += provider_rows("lora", case.name, shape, provs, measure, progress, check=check)
    return rows


def keep_mask(backend: str, m: int, n: int, p: float, seed: int, device) -> torch.Tensor:
    """The dropout keep-mask `backend` draws for `seed` (the torch backend and the kernels each have their
    own generator; the cuda backend's LoRA kernel has no dropout: a p > 0 call runs on Triton)."""
    if backend in ("triton", "cuda"):
        from ..triton.lora import dropout_keep

        return dropout_keep(m, n, p, seed, device)
    return ref.dropout_keep((m, n), p, seed, device)


def _check(name, fn, x0, case, tensors, seed=1234):
    """Output and every gradient (x, lora_A, lora_B) of one call against fp64, with the kernel's own mask."""
    w, b, a32, b32, s = tensors
    p = case.p if case.train else 0.0
    keep = None
    if p > 0.0:
        torch.manual_seed(seed)  # check_op runs the provider after the same manual_seed: the op draws this seed
        keep = keep_mask(name.removeprefix("peftkern-"), case.m, case.d_in, p, int(draw_seed(p)), x0.device)
    x = x0.detach().requires_grad_(case.train)

    def run():
        if case.train:
            return fn(x)
        with torch.no_grad():
            return fn(x)

    reference = lambda x, w, b, a, bb: ref.lora_linear(x, w, b, a, bb, s, keep, p)
    return check_op(run, reference, [x, w, b, a32, b32], ["dx", "dW", "db", "dA", "dB"], seed=seed)


def _measure(fn, x0, case, params, device, quick, timeit, peak_bytes):
    if not case.train:
        with torch.no_grad():
            return {"fwd": timeit(lambda: fn(x0), device, quick)}
    x = x0.detach().requires_grad_(True)
    live = [p for p in params if p is not None]
    res = measure_train(lambda: fn(x), [x, *[p for p in live if p.requires_grad]], live, device, quick, timeit,
                        peak_bytes)
    res["flops_fwd"] = 2 * case.m * case.d_in * case.d_out + 2 * case.m * case.r * (case.d_in + case.d_out)
    res["bytes_fwd_min"] = (case.m * (case.d_in + case.d_out) + case.d_in * case.d_out) * x0.element_size()
    return res


BASELINES = ("peft", "eager", "peft+compile", "base")
