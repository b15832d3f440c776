"""QLoRA linear microbenchmark: peft's LoRA layer on a bitsandbytes 4-bit NF4 base (lora.bnb.Linear4bit, double
quantisation, computing in the activation dtype) beside the same layer after `peftkern.accelerate` (its
lora_linear_4bit path: dequantize_4bit + lora_linear), torch.compile of peft's layer, and the frozen 4-bit base
alone (the floor), on the same inputs in one process. A spec for the shared harness (bench/_harness.py).

Needs bitsandbytes: without it every row of every case is skipped, saying so."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .. import _backend
from ..integrations.accelerate import accelerate
from ..ops.lora import draw_seed
from ..reference import lora as ref
from . import _harness
from ._check import check_op
from .lora import keep_mask


@dataclass
class Case:
    name: str
    m: int
    d_in: int
    d_out: int
    r: int
    p: float


PRESETS = {
    "llama-7b": [Case("train", 8192, 4096, 4096, 16, 0.0), Case("train-drop", 8192, 4096, 4096, 16, 0.1)],
    "llama-1b": [Case("train", 8192, 2048, 2048, 16, 0.0), Case("train-drop", 8192, 2048, 2048, 16, 0.1)],
    "tiny": [Case("train", 512, 512, 512, 16, 0.0), Case("train-drop", 512, 512, 512, 16, 0.1)],
}
QUICK = {"tiny": [Case("train", 256, 256, 256, 16, 0.0), Case("train-drop", 256, 256, 256, 16, 0.1)]}
BASELINES = ("peft", "peft+compile", "base")
CHECK_SEED = 1234
QUANT = dict(quant_type="nf4", compress_statistics=True)  # QLoRA's NF4 with double quantisation


def bnb_why_not() -> str | None:
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # ImportError, or a broken install raising anything else
        return f"needs bitsandbytes, not importable here ({type(e).__name__}: {e})"[:200]
    return None


class _Net(nn.Module):
    def __init__(self, proj: nn.Module):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


def _peft_model(case: Case, dtype, device):
    """peft's QLoRA layer: an nn.Linear's weight quantised by bitsandbytes on `device` into a Linear4bit computing
    in `dtype`, the model marked loaded in 4 bit (as transformers marks it), so peft wraps it in lora.bnb.Linear4bit."""
    import bitsandbytes as bnb
    import peft

    lin = nn.Linear(case.d_in, case.d_out, device=device, dtype=dtype)
    q = bnb.nn.Linear4bit(case.d_in, case.d_out, bias=True, compute_dtype=dtype, **QUANT)
    q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, module=q, **QUANT)
    q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    net = _Net(q.to(device))  # quantises here
    net.is_loaded_in_4bit = True
    cfg = peft.LoraConfig(r=case.r, lora_alpha=2 * case.r, lora_dropout=case.p, target_modules=["proj"])
    model = peft.get_peft_model(net, cfg)
    layer = model.base_model.model.proj
    if type(layer).__module__ != "peft.tuners.lora.bnb":
        raise RuntimeError(f"peft made a {type(layer).__module__}.{type(layer).__name__}, not its lora.bnb.Linear4bit")
    with torch.no_grad():  # peft starts B at zero; a benchmark wants a live adapter
        layer.lora_B["default"].weight.normal_(0, 0.02)
    return model.train(), layer


class _Dequants(TorchDispatchMode):
    """Counts peftkern::dequantize_4bit calls: the fused path ran (peft's path dequantises with bitsandbytes)."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func._schema.name == "peftkern::dequantize_4bit"
        return func(*args, **(kwargs or {}))


def _setup(case: Case, dtype, device, compile_baseline: bool) -> _harness.Setup:
    import bitsandbytes as bnb

    x = torch.randn(case.m, case.d_in, device=device, dtype=dtype)
    model, layer = _peft_model(case, dtype, device)
    fast_model = copy.deepcopy(model)
    summary = accelerate(fast_model)
    fast = fast_model.base_model.model.proj
    base = fast.base_layer
    qs = base.weight.quant_state
    w = bnb.functional.dequantize_4bit(base.weight.data, qs).to(dtype)  # the check's weight, as the op dequantises
    b, a32, b32 = base.bias, fast.lora_A["default"].weight, fast.lora_B["default"].weight
    s, p = fast.scaling["default"], case.p

    def op(x):
        if summary.fused_now != 1:
            raise RuntimeError(f"peftkern.accelerate left the layer on peft's forward: {summary}")
        return fast(x)

    def check(name, run, leaves, seed=CHECK_SEED):
        """Output and every gradient (x, lora_A, lora_B) against fp64 on the dequantised weight, with the op's own
        mask; an error unless the call ran peftkern's dequantize_4bit (the fused path, not peft's forward)."""
        keep = None
        if p > 0.0:
            torch.manual_seed(seed)
            keep = keep_mask(name.removeprefix("peftkern-"), case.m, case.d_in, p, int(draw_seed(p)), x.device)
        seen = _Dequants()

        def counted():
            with seen:
                return run()

        reference = lambda x, w, b, a, lora_b: ref.lora_linear(x, w, b, a, lora_b, s, keep, p)
        res = check_op(counted, reference, [*leaves, w, b, a32, b32], ["dx", "dW", "db", "dA", "dB"], seed=seed)
        if not seen.n:
            res["error"] = "the accelerated layer did not run peftkern's dequantize_4bit (peft's forward ran)"
        return res

    packed = base.weight.untyped_storage().nbytes() + sum(
        t.untyped_storage().nbytes() for st in (qs, qs.state2) if st is not None
        for t in (st.absmax, st.code, getattr(st, "offset", None)) if t is not None)
    return _harness.Setup(
        inputs=[x],
        baselines={
            "base": lambda x: layer.base_layer(x),
            "peft": lambda x: layer(x),
            "peft+compile": _harness.compiled(compile_baseline, layer),
        },
        op=op,
        check=check,
        params=[*model.parameters(), *fast_model.parameters()],
        cuda_refused="no cuda QLoRA kernel (the cuda backend runs Triton's dequantisation and LoRA kernels)",
        work={"flops_fwd": 2 * case.m * case.d_in * case.d_out + 2 * case.m * case.r * (case.d_in + case.d_out),
              "bytes_fwd_min": case.m * (case.d_in + case.d_out) * x.element_size() + packed},
    )


SPEC = _harness.OpSpec(
    op="qlora", presets=PRESETS, quick=QUICK, setup=_setup,
    shape=lambda c: dict(m=c.m, d_in=c.d_in, d_out=c.d_out, r=c.r, dropout=c.p, quant="nf4-dq"),
)


def run(preset: str, dtype, device, quick: bool, timeit, peak_bytes, progress, compile_baseline: bool):
    why = bnb_why_not()
    if why is None:
        return _harness.run(SPEC, preset, dtype, device, quick, timeit, peak_bytes, progress, compile_baseline)
    providers = ("base", "peft", "peft+compile", *(f"peftkern-{b}" for b in _backend.BACKENDS))
    cases = (SPEC.quick.get(preset) if quick else None) or SPEC.presets[preset]
    return [dict(op=SPEC.op, case=c.name, provider=prov) | SPEC.shape(c) | {"dtype": str(dtype).split(".")[-1],
                                                                            "skipped": why}
            for c in cases for prov in providers]
