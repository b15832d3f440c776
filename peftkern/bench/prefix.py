"""Prefix-tuning attention microbenchmark, one process, same inputs for every provider:

  peft-sdpa          what peft + transformers compute: expand the prefix over the batch, cat it
                     before K/V (the cache update), repeat_kv for GQA, SDPA with the boolean 4-D mask
                     (B, 1, L, P + S) transformers builds (built once outside the timing, as per step)
  peft-sdpa+compile  torch.compile of the same function
  sdpa-floor         SDPA over K/V already concatenated outside the timing (no copy, no mask
                     tensor), is_causal=True: PyTorch aligns that mask top-left (query i sees keys
                     0..i of the P + S), so it is a cost floor of the same length, not the same math
  peftkern-*         prefix_attention with a shared (Hkv, P, D) prefix read in place
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import _backend
from ..ops.prefix import prefix_attention
from ..reference import prefix as ref
from ..reference.prefix import full_mask
from ._check import check_op
from ._timing import cuda_why_not, measure_train, provider_rows, triton_why_not


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


def _peft_sdpa(q, k, v, pk, pv, mask4):
    B, groups = q.shape[0], q.shape[1] // k.shape[1]
    keys = torch.cat([pk.expand(B, -1, -1, -1), k], dim=2)
    vals = torch.cat([pv.expand(B, -1, -1, -1), v], dim=2)
    if groups > 1:  # transformers' repeat_kv
        keys, vals = keys.repeat_interleave(groups, 1), vals.repeat_interleave(groups, 1)
    return F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask4)


def _bound(backend, fn):
    def run(*a):
        with _backend.use_backend(backend):
            return fn(*a)

    return run


def _backend_why_not(name: str, device) -> str | None:
    if name == "triton":
        return triton_why_not(device)
    if name == "cuda":
        if device.type != "cuda":
            return cuda_why_not(device)
        return cuda_why_not(device)
    return None


def providers(case: Case, dtype, device, compile_baseline: bool) -> dict:
    """name -> (forward fn, its leaf inputs) or a string saying why it is skipped."""
    rnd = lambda *s: torch.randn(*s, device=device, dtype=dtype).requires_grad_(True)
    q, k, v = rnd(case.B, case.H, case.L, case.D), rnd(case.B, case.Hkv, case.S, case.D), rnd(
        case.B, case.Hkv, case.S, case.D)
    pk, pv = rnd(case.Hkv, case.P, case.D), rnd(case.Hkv, case.P, case.D)
    mask4 = full_mask(case.L, case.S, case.P, case.causal, None, case.B, device)
    mask4 = mask4.expand(case.B, 1, case.L, case.P + case.S).contiguous()
    ins = [q, k, v, pk, pv]
    peft = lambda q, k, v, pk, pv: _peft_sdpa(q, k, v, pk, pv, mask4)
    out: dict = {"peft-sdpa": (peft, ins)}
    if compile_baseline:
        out["peft-sdpa+compile"] = (torch.compile(peft), ins)
    else:
        out["peft-sdpa+compile"] = "skipped on CPU (slow to compile; pass --compile)"
    with torch.no_grad():
        kc = torch.cat([pk.expand(case.B, -1, -1, -1), k], 2).requires_grad_(True)
        vc = torch.cat([pv.expand(case.B, -1, -1, -1), v], 2).requires_grad_(True)
    gqa = case.Hkv != case.H
    out["sdpa-floor"] = (lambda q, kc, vc: F.scaled_dot_product_attention(q, kc, vc, is_causal=case.causal,
                                                                         enable_gqa=gqa), [q, kc, vc])
    ours = lambda q, k, v, pk, pv: prefix_attention(q, k, v, pk, pv, causal=case.causal)
    for name in _backend.BACKENDS:
        why = _backend_why_not(name, device)
        out[f"peftkern-{name}"] = why if why else (_bound(name, ours), ins)
    return out


_NOTES = {
    "sdpa-floor": "is_causal top-left over pre-concatenated P+S keys: cost floor, not the prefix mask",
    "peftkern-cuda": "forward on triton (no CUDA forward); backward sums the prefix grad with CUDA C++",
}


def run(preset: str, dtype, device, quick: bool, timeit, peak_bytes, progress, compile_baseline: bool):
    rows = []
    for case in (QUICK.get(preset) if quick else None) or PRESETS[preset]:
        shape = dict(B=case.B, H=case.H, Hkv=case.Hkv, L=case.L, S=case.S, P=case.P, D=case.D, causal=case.causal,
                     dtype=str(dtype).split(".")[-1])
        measure = functools.partial(_measure_prov, case=case, device=device, quick=quick, timeit=timeit,
                                    peak_bytes=peak_bytes)
        check = functools.partial(_check, case=case)
        case_rows = provider_rows("prefix", case.name, shape, providers(case, dtype, device, compile_baseline),
                                  measure, progress, check=check)
        for row in case_rows:
            if row["provider"] in _NOTES:
                row["note"] = _NOTES[row["provider"]]
        rows += case_rows
    return rows


def _visible_pairs(case: Case) -> int:
    """(query, key) pairs attended: every prefix key, plus the causal / full sequence keys."""
    if not case.causal:
        return case.L * (case.P + case.S)
    shift = case.S - case.L
    return case.L * case.P + sum(min(case.S, max(0, i + shift + 1)) for i in range(case.L))


def _check(name, prov, case):
    """Output and every gradient (q, k, v, prefix_k, prefix_v) of one call against the fp64 concat
    attention (the same attention in the inputs' dtype, scores materialized, bounds the error)."""
    fn, ins = prov
    reference = lambda q, k, v, pk, pv: ref.attention(q, k, v, pk, pv, case.causal)
    return check_op(lambda: fn(*ins), reference, ins, ["dq", "dk", "dv", "dprefix_k", "dprefix_v"])


def _measure_prov(prov, **kw):
    return _measure(*prov, **kw)


def _measure(fn, ins, case, device, quick, timeit, peak_bytes):
    res = measure_train(lambda: fn(*ins), ins, ins, device, quick, timeit, peak_bytes)
    res["flops_fwd"] = 4 * case.B * case.H * case.D * _visible_pairs(case)
    return res


BASELINES = ("peft-sdpa", "peft-sdpa+compile", "sdpa-floor")
