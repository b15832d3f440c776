"""bitsandbytes 4-bit (NF4 / FP4) and 8-bit (LLM.int8 row-wise) weights dequantized in pure torch: the CPU path
and the test oracle's twin.

A `Params4bit` holds two 4-bit codes per byte (high nibble first: element 2k is byte k >> 4, element 2k+1 is
byte k & 0xF), a 16-entry code table (`quant_state.code`, NF4 or FP4) and one fp32 absmax per `blocksize`
elements of the flattened (out, in) weight. With double quantisation (`quant_state.nested`) the absmax is itself
8-bit: absmax[i] = state2.code[qabsmax[i]] * state2.absmax[i // state2.blocksize] + offset. The weight is
code[q] * absmax in fp32, rounded to the dtype it was quantised from (`quant_state.dtype`), then to the compute
dtype, as bitsandbytes' `dequantize_4bit(...).to(compute_dtype)` does.

A `Linear8bitLt` weight (has_fp16_weights=False) is `CB` int8 (out, in) with one fp32 absmax per row, `SCB` (out,):
W = CB * (SCB * fp32(1/127)), the product in fp32 rounded once to the compute dtype, as bitsandbytes' dequantising
matmul (`MatMul8bitFp`: `CB.to(dtype).mul_(SCB.unsqueeze(1).mul(1.0 / 127.0))`, which computes a mixed-dtype
in-place product in fp32) does.
"""

from __future__ import annotations

import torch
from torch import Tensor


def absmax_fp32(qs) -> Tensor:
    """The per-block fp32 absmax of a bitsandbytes QuantState (undoing double quantisation)."""
    if not qs.nested:
        return qs.absmax.float()
    s2 = qs.state2
    q = qs.absmax.reshape(-1).long()
    blk = torch.arange(q.numel(), device=q.device) // s2.blocksize
    return s2.code.to(q.device)[q] * s2.absmax.float()[blk] + qs.offset.float()


def dequantize_4bit(data: Tensor, qs, dtype: torch.dtype) -> Tensor:
    """The (out, in) weight of packed 4-bit `data` with QuantState `qs`, in `dtype`."""
    a = data.reshape(-1)
    if a.dtype != torch.uint8:
        a = a.view(torch.uint8)
    n = 1
    for d in qs.shape:
        n *= d
    # A 256-entry table byte -> (code[high nibble], code[low nibble]), its two fp32 values read as one int64 so
    # each byte is one 1-D gather (not two per element with int64 indices); then each block of codes times its
    # absmax as a (blocks, blocksize) product. The same fp32 products as element by element.
    code = qs.code.to(a.device, torch.float32)
    byte = torch.arange(256, device=a.device)
    pairs = torch.stack((code[byte >> 4], code[byte & 0xF]), dim=1).view(torch.int64).reshape(256)
    vals = pairs.index_select(0, a.int()).view(torch.float32)
    absmax = absmax_fp32(qs).reshape(-1)
    total = absmax.numel() * qs.blocksize
    if vals.numel() < total:
        vals = torch.cat((vals, vals.new_zeros(total - vals.numel())))
    w = vals[:total].view(absmax.numel(), qs.blocksize).mul_(absmax[:, None]).reshape(-1)[:n]
    return w.to(qs.dtype).to(dtype).reshape(qs.shape)


def dequantize_8bit(CB: Tensor, SCB: Tensor, dtype: torch.dtype) -> Tensor:
    """The (out, in) weight of int8 `CB` with row scales `SCB` (fp32, out), in `dtype`."""
    scale = SCB.unsqueeze(1) * (1.0 / 127.0)  # fp32 tensor x Python float: the product in fp32
    return (CB.to(torch.float32) * scale).to(dtype)
