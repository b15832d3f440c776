"""Prefix-tuning attention in plain PyTorch.

Keys are [prefix ; sequence]: every query sees all P prefix keys; sequence key j is seen by query i
when `key_padding_mask[b, j]` (True = attend) and, with `causal`, j <= i + (S - L) (bottom-right
aligned, as flash-attention). Query head h reads key/value head h // (H / Hkv) (GQA / MQA).

`attention` is the readable composition (explicit expand + concat, autograd does the gradients):
the test oracle. `prefix_attention_fwd` / `prefix_attention_bwd` are the torch backend of the op:
the explicit forward (returning the logsumexp) and the backward recomputed from it, in fp32.
"""

from __future__ import annotations

import torch


def seq_mask(L: int, S: int, causal: bool, key_padding_mask, device) -> torch.Tensor | None:
    """(B or 1, 1, L, S) bool, True where query i may attend sequence key j; None = all allowed."""
    mask = None
    if causal:
        i = torch.arange(L, device=device)[:, None]
        j = torch.arange(S, device=device)[None, :]
        mask = (j <= i + (S - L))[None, None]
    if key_padding_mask is not None:
        pad = key_padding_mask[:, None, None, :]
        mask = pad if mask is None else mask & pad
    return mask


def _expand(prefix, B):
    return prefix.expand(B, *prefix.shape) if prefix.dim() == 3 else prefix


def _repeat_kv(x, groups):
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def full_mask(L, S, P, causal, key_padding_mask, B, device):
    """(B or 1, 1, L, P + S) bool over the concatenated keys [prefix ; sequence]."""
    sm = seq_mask(L, S, causal, key_padding_mask, device)
    if sm is None:
        return None
    ones = torch.ones((*sm.shape[:3], P), dtype=torch.bool, device=device)
    return torch.cat([ones, sm], dim=-1)


def attention(q, k, v, prefix_k, prefix_v, causal=True, key_padding_mask=None, softmax_scale=None):
    """Explicit concat attention in the inputs' dtype (the oracle; any dtype, fp64 included)."""
    B, H, L, D = q.shape
    groups = H // k.shape[1]
    scale = D ** -0.5 if softmax_scale is None else softmax_scale
    keys = _repeat_kv(torch.cat([_expand(prefix_k, B), k], dim=2), groups)
    vals = _repeat_kv(torch.cat([_expand(prefix_v, B), v], dim=2), groups)
    scores = (q @ keys.transpose(-1, -2)) * scale
    mask = full_mask(L, k.shape[2], prefix_k.shape[-2], causal, key_padding_mask, B, q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ vals


def _scores(q, k, v, prefix_k, prefix_v, causal, key_padding_mask, scale):
    B, H, L, _ = q.shape
    groups = H // k.shape[1]
    keys = _repeat_kv(torch.cat([_expand(prefix_k, B), k], dim=2), groups).float()
    vals = _repeat_kv(torch.cat([_expand(prefix_v, B), v], dim=2), groups).float()
    s = (q.float() @ keys.transpose(-1, -2)) * scale
    mask = full_mask(L, k.shape[2], prefix_k.shape[-2], causal, key_padding_mask, B, q.device)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return s, keys, vals


def prefix_attention_fwd(q, k, v, prefix_k, prefix_v, causal, key_padding_mask, scale):
    """Returns (out in q's dtype, lse (B, H, L) fp32, natural log)."""
    s, _, vals = _scores(q, k, v, prefix_k, prefix_v, causal, key_padding_mask, scale)
    lse = torch.logsumexp(s, dim=-1)
    out = torch.exp(s - lse[..., None]) @ vals
    return out.to(q.dtype), lse


def _fold(g, B, Hkv, groups, shared):
    """(B, H, N, D) gradient of the repeated/expanded keys -> (B, Hkv, N, D), summed over the batch
    for a shared prefix."""
    g = g.reshape(B, Hkv, groups, *g.shape[2:]).sum(2)
    return g.sum(0) if shared else g


def prefix_attention_bwd(dout, q, k, v, prefix_k, prefix_v, out, lse, causal, key_padding_mask, scale):
    """Returns (dq, dk, dv, dprefix_k, dprefix_v), each in its input's dtype and shape."""
    B, H, L, _ = q.shape
    Hkv, P = k.shape[1], prefix_k.shape[-2]
    groups = H // Hkv
    s, keys, vals = _scores(q, k, v, prefix_k, prefix_v, causal, key_padding_mask, scale)
    p = torch.exp(s - lse[..., None])
    do = dout.float()
    delta = (do * out.float()).sum(-1, keepdim=True)
    dvals = p.transpose(-1, -2) @ do
    ds = p * (do @ vals.transpose(-1, -2) - delta) * scale
    dq = ds @ keys
    dkeys = ds.transpose(-1, -2) @ q.float()
    shared = prefix_k.dim() == 3
    dk_all = _fold(dkeys[:, :, P:], B, Hkv, groups, False)
    dv_all = _fold(dvals[:, :, P:], B, Hkv, groups, False)
    dpk = _fold(dkeys[:, :, :P], B, Hkv, groups, shared)
    dpv = _fold(dvals[:, :, :P], B, Hkv, groups, shared)
    return (dq.to(q.dtype), dk_all.to(k.dtype), dv_all.to(v.dtype), dpk.to(prefix_k.dtype),
            dpv.to(prefix_v.dtype))
