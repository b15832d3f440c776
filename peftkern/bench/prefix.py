"""Prefix-tuning attention microbenchmark, one process, same inputs for every provider:

  peft-sdpa          what peft + transformers compute: expand the prefix over the batch, cat it
                     before K/V (the cache update), repeat_kv for GQA, SDPA with the boolean 4-D mask
                     (B, 1, L, P + S) transformers builds (built once outside the timing, as per step)
  peft-sdpa+compile  torch.compile of the same function
  sdpa-floor         SDPA over K/V already concatenated outside the timing (no copy, no mask
                     tensor), is_causal=True: PyTorch aligns that mask top-left (query i sees keys
                     0..i of the P + S), so it is a cost floor of the same length, not the same math
  peftkern-*         prefix_attention with a shared (Hkv, P, D) prefix read in place

Decode cases (`decode`, inference): one generation step, L = 1 query against peft's cache after its
update, (B, Hkv, P + S, D) with the P prefix positions first (peft's get_prompt expands the prefix to the
batch) and S = the sequence so far, the new token included. The cache update itself is the same for
every provider and not timed.
  peft-sdpa          what peft + transformers compute: SDPA over the whole cache (no mask: one query
                     sees every key), GQA in SDPA
  peft-sdpa+compile  torch.compile of the same
  sdpa-floor         plain attention with no prefix: SDPA over an S-key cache (its own tensors)
  peftkern-*         prefix_attention on the cache split into views, as the integration runs it: the
                     first P positions as a per-batch (B, Hkv, P, D) prefix, the rest as the keys

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
    decode: bool = False  # one generation step on peft's cache (L = 1, inference)


PRESETS = {
    # Llama-2-7B: 32 heads of 128, no GQA. Memory (bf16): q/k/v/out 128 MiB each, the 4-D bool mask
    # 33 MiB, peft's concatenated K/V 132 MiB each (+ their repeats under GQA).
    "llama-7b": [Case("train", 8, 32, 32, 2048, 2048, 64, 128),
                 Case("decode", 8, 32, 32, 1, 2048, 64, 128, decode=True)],
    "llama-1b": [Case("train", 8, 32, 8, 2048, 2048, 64, 64),  # Llama-3.2-1B: GQA 32/8, D=64
                 Case("decode", 8, 32, 8, 1, 2048, 64, 64, decode=True)],
    "tiny": [Case("train", 2, 4, 2, 128, 128, 16, 32), Case("decode", 2, 4, 2, 1, 128, 16, 32, decode=True)],
}
QUICK = {"tiny": [Case("train", 1, 2, 2, 64, 64, 8, 32), Case("decode", 1, 2, 2, 1, 64, 8, 32, decode=True)]}
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


def _decode_setup(case: Case, dtype, device, compile_baseline: bool) -> _harness.Setup:
    P, gqa = case.P, case.Hkv != case.H
    rnd = lambda *s: torch.randn(*s, device=device, dtype=dtype)
    q = rnd(case.B, case.H, 1, case.D)
    kc, vc = rnd(case.B, case.Hkv, P + case.S, case.D), rnd(case.B, case.Hkv, P + case.S, case.D)
    kf, vf = kc[:, :, P:].clone(), vc[:, :, P:].clone()  # a cache of the sequence alone
    peft = lambda q, kc, vc: F.scaled_dot_product_attention(q, kc, vc, enable_gqa=gqa)
    floor = lambda q, kf, vf: F.scaled_dot_product_attention(q, kf, vf, enable_gqa=gqa)
    split = lambda kc, vc: (kc[:, :, P:], vc[:, :, P:], kc[:, :, :P], vc[:, :, :P])

    def check(name, run, leaves):
        reference = lambda q, kc, vc: ref.attention(q, *split(kc, vc), True)
        return check_op(run, reference, leaves, ["dq", "dcache_k", "dcache_v"])

    keys = case.B * case.Hkv * (P + case.S) * case.D
    return _harness.Setup(
        inputs=[q, kc, vc],
        baselines={"peft-sdpa": peft, "peft-sdpa+compile": _harness.compiled(compile_baseline, peft),
                   "sdpa-floor": _harness.Provider(floor, [q, kf, vf])},
        op=lambda q, kc, vc: prefix_attention(q, *split(kc, vc), causal=True),
        check=check,
        train=False,
        count_saved_inputs=False,
        work={"flops_fwd": 4 * case.B * case.H * case.D * (P + case.S),
              "bytes_fwd_min": (2 * keys + 2 * q.numel()) * q.element_size()},
    )


def _setup(case: Case, dtype, device, compile_baseline: bool) -> _harness.Setup:
    if case.decode:
        return _decode_setup(case, dtype, device, compile_baseline)
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


DECODE_NOTES = {"sdpa-floor": "plain attention over the S-key cache, no prefix: the floor of a decode step"}


def run(preset: str, dtype, device, quick: bool, timeit, peak_bytes, progress, compile_baseline: bool):
    rows = _harness.run(SPEC, preset, dtype, device, quick, timeit, peak_bytes, progress, compile_baseline)
    for row in rows:  # the harness notes by provider; the decode floor is another floor
        if row["case"].startswith("decode") and row["provider"] in DECODE_NOTES:
            row["note"] = DECODE_NOTES[row["provider"]]
    return rows
