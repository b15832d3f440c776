"""Prefix-tuning attention microbenchmark, one process, same inputs for every provider:

  peft-sdpa          what peft + transformers compute: expand the prefix over the batch, cat it
                     before K/V (the cache update), repeat_kv for GQA, SDPA with the boolean 4-D mask
                     (B, 1, L, P + S) transformers builds (built once outside the timing, as per step)
  peft-sdpa+compile  torch.compile of the same function
  sdpa-floor         SDPA over K/V already concatenated outside the timing (no copy, no mask
                     tensor), is_causal=True: PyTorch aligns that mask top-left (query i sees keys
                     0..i of the P + S), so it is a cost floor of the same length, not the same math
  peftkern-*         prefix_attention with a shared (Hkv, P, D) prefix read in place

A spec for the shared harness (bench/_harness.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..ops.prefix import prefix_attention
from ..reference import prefix as ref
from ..reference.prefix import full_mask
from . import _harness
from ._check import check_op


@dataclass
class Case:
    name: str
    B: int
    H: int
    Hkv: int
    L: int
    S: int
    P: int
    D: int
    causal: bool = True


PRESETS = {
    # Llama-2-7B: 32 heads of 128, no GQA. Memory (bf16): q/k/v/out 128 MiB each, the 4-D bool mask
    # 33 MiB, peft's concatenated K/V 132 MiB each (+ their repeats under GQA).
    "llama-7b": [Case("train", 8, 32, 32, 2048, 2048, 64, 128)],
    "llama-1b": [Case("train", 8, 32, 8, 2048, 2048, 64, 64)],  # Llama-3.2-1B: GQA 32/8, D=64
    "tiny": [Case("train", 2, 4, 2, 128, 128, 16, 32)],
}
QUICK = {"tiny": [Case("train", 1, 2, 2, 64, 64, 8, 32)]}
BASELINES = ("peft-sdpa", "peft-sdpa+compile", "sdpa-floor")
NOTES = {
    "sdpa-floor": "is_causal top-left over pre-concatenated P+S keys: cost floor, not the prefix mask",
    "peftkern-cuda": "forward on triton (no CUDA forward); backward sums the prefix grad with CUDA C++",
}


def _peft_sdpa(q, k, v, pk, pv, mask4):
    B, groups = q.shape[0], q.shape[1] // k.shape[1]
    keys = torch.cat([pk.expand(B, -1, -1, -1), k], dim=2)
    vals = torch.cat([pv.expand(B, -1, -1, -1), v], dim=2)
    if groups > 1:  # transformers' repeat_kv
        keys, vals = keys.repeat_interleave(groups, 1), vals.repeat_interleave(groups, 1)
    return F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask4)


def _visible_pairs(case: Case) -> int:
    """(query, key) pairs attended: every prefix key, plus the causal / full sequence keys."""
    if not case.causal:
        return case.L * (case.P + case.S)
    shift = case.S - case.L
    return case.L * case.P + sum(min(case.S, max(0, i + shift + 1)) for i in range(case.L))


def _setup(case: Case, dtype, device, compile_baseline: bool) -> _harness.Setup:
    rnd = lambda *s: torch.randn(*s, device=device, dtype=dtype).requires_grad_(True)
    q, k, v = rnd(case.B, case.H, case.L, case.D), rnd(case.B, case.Hkv, case.S, case.D), rnd(
        case.B, case.Hkv, case.S, case.D)
    pk, pv = rnd(case.Hkv, case.P, case.D), rnd(case.Hkv, case.P, case.D)
    mask4 = full_mask(case.L, case.S, case.P, case.causal, None, case.B, device)
    mask4 = mask4.expand(case.B, 1, case.L, case.P + case.S).contiguous()
    peft = lambda q, k, v, pk, pv: _peft_sdpa(q, k, v, pk, pv, mask4)
    compiled = _harness.compiled(compile_baseline, peft)
    with torch.no_grad():
        kc = torch.cat([pk.expand(case.B, -1, -1, -1), k], 2).requires_grad_(True)
        vc = torch.cat([pv.expand(case.B, -1, -1, -1), v], 2).requires_grad_(True)
    gqa = case.Hkv != case.H
    floor = lambda q, kc, vc: F.scaled_dot_product_attention(q, kc, vc, is_causal=case.causal, enable_gqa=gqa)

    def check(name, run, leaves):
        """Output and every gradient (q, k, v, prefix_k, prefix_v) of one call against the fp64 concat
        attention (the same attention in the inputs' dtype, scores materialized, bounds the error)."""
        reference = lambda q, k, v, pk, pv: ref.attention(q, k, v, pk, pv, case.causal)
        return check_op(run, reference, leaves, ["dq", "dk", "dv", "dprefix_k", "dprefix_v"])

    return _harness.Setup(
        inputs=[q, k, v, pk, pv],
        baselines={"peft-sdpa": peft, "peft-sdpa+compile": compiled,
                   "sdpa-floor": _harness.Provider(floor, [q, kc, vc])},
        op=lambda q, k, v, pk, pv: prefix_attention(q, k, v, pk, pv, causal=case.causal),
        check=check,
        count_saved_inputs=False,
        work={"flops_fwd": 4 * case.B * case.H * case.D * _visible_pairs(case)},
    )


SPEC = _harness.OpSpec(
    op="prefix", presets=PRESETS, quick=QUICK, setup=_setup, notes=NOTES,
    shape=lambda c: dict(B=c.B, H=c.H, Hkv=c.Hkv, L=c.L, S=c.S, P=c.P, D=c.D, causal=c.causal),
)


def run(preset: str, dtype, device, quick: bool, timeit, peak_bytes, progress, compile_baseline: bool):
    return _harness.run(SPEC, preset, dtype, device, quick, timeit, peak_bytes, progress, compile_baseline)
