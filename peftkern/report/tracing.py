"""Bytes autograd saves for backward in one forward + loss, traced on the meta device under
`saved_tensors_hooks` (parameters and buffers excluded, each storage once), with CUDA's dropout and flash
attention modelled for `--target cuda`; the peftkern ops that ran are counted."""

from __future__ import annotations

import collections
import contextlib
import contextvars
import warnings
from collections.abc import Iterator
from functools import partial

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .._memory import SavedTensors
from .models import quant_state_tensors
from .presets import model_kind

_TARGET: contextvars.ContextVar[str] = contextvars.ContextVar("peftkern_report_target", default="cuda")


class _Node(torch.autograd.Function):
    """A node of the meta trace for what CUDA runs differently from meta: returns a fresh tensor of
    `shape`/`dtype` and saves exactly what `save(inputs, out)` returns. Never run backward."""

    @staticmethod
    def forward(ctx, spec, *inputs):
        shape, dtype, save = spec
        out = inputs[0].new_empty(shape, dtype=dtype)
        if any(ctx.needs_input_grad[1:]):  # nothing upstream trains: no graph node, nothing kept
            ctx.save_for_backward(*save(inputs, out))
        return out

    @staticmethod
    def backward(ctx, *grads):  # pragma: no cover - never run
        raise RuntimeError("peftkern.report trace node: memory accounting only, no backward")


def _fresh(t: torch.Tensor, shape=None, dtype=None) -> torch.Tensor:
    return t.new_empty(t.shape if shape is None else shape, dtype=dtype or t.dtype)


def _cuda_dropout(mod, x):
    """CUDA native_dropout: a fresh output and a bool mask kept for backward (meta keeps the scaled noise)."""
    if not mod.training or mod.p == 0.0:
        return x
    return _Node.apply((x.shape, x.dtype, lambda i, o: (_fresh(i[0], dtype=torch.bool),)), x)


def _flash_attention(q, k, v, mask):
    """Flash / memory-efficient attention: keeps q, k, v, out, fp32 logsumexp (+ the additive mask)."""
    b, h, sq, _ = q.shape
    shape = (b, sq, h, v.shape[-1])  # the kernels write out as (B, S, H, D): the caller's transpose is free

    def save(i, out):
        kept = [i[0], i[1], i[2], out, _fresh(i[0], (b, h, sq), torch.float32)]
        if len(i) > 3:  # SDPA turns a bool mask into an additive one in q's dtype, per call
            kept.append(_fresh(i[3], dtype=i[0].dtype) if i[3].dtype == torch.bool else i[3])
        return kept

    out = _Node.apply((shape, q.dtype, save), q, k, v, *([mask] if mask is not None else []))
    return out.transpose(1, 2)


def _trace_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                     position_bias=None, **kwargs):
    """transformers attention function of the trace: transformers' sdpa_attention_forward preprocessing
    (GQA, causal crop, T5 position-bias mask), then SDPA's saved set on the target: flash / memory-efficient
    on CUDA; on CPU flash-for-CPU without dropout, else the math path (the real decomposition, on meta)."""
    from transformers.integrations import sdpa_attention as hf

    if _TARGET.get() == "cpu" and dropout > 0.0:
        return hf.sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                         scaling=scaling, is_causal=is_causal, position_bias=position_bias, **kwargs)
    q_len = query.shape[2]
    n_rep = getattr(module, "num_key_value_groups", 1)
    if n_rep > 1 and not hf.use_gqa_in_sdpa(attention_mask, key, value):
        key, value = hf.repeat_kv(key, n_rep), hf.repeat_kv(value, n_rep)
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = q_len > 1 and attention_mask is None and is_causal
    if is_causal and key.shape[2] > q_len:
        key, value = key[:, :, :q_len], value[:, :, :q_len]
        if position_bias is not None:
            position_bias = position_bias[:, :, :, :q_len]
    if position_bias is not None:
        attention_mask = hf.create_position_bias_mask(position_bias, attention_mask, is_causal, query, key)
    out = _flash_attention(query, key, value, attention_mask)
    return out.transpose(1, 2).contiguous(), None


_registered = []


def register_trace_attention() -> None:
    """Register the attention implementation "peftkern_trace" with transformers (once)."""
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register("peftkern_trace", _trace_attention)
        # Masks built as for SDPA (the trace passes no padding mask, so nothing reads mask values on meta).
        AttentionMaskInterface.register("peftkern_trace", sdpa_mask)
        _registered.append(True)


def example_inputs(config, batch: int, seq: int, device="meta") -> dict:
    ids = torch.randint(0, min(config.vocab_size, 1000), (batch, seq), device="cpu").to(device)
    if model_kind(config) == "encoder":
        return {"input_ids": ids}
    return {"input_ids": ids, "labels": ids}


def training_loss(model, config, inputs) -> torch.Tensor:
    """The loss the report trains with: the LM loss, or for an encoder the mean of its outputs
    (last hidden state and pooler, so every parameter gets a gradient; a task head would add a few
    d x labels parameters)."""
    out = model(**inputs)
    if model_kind(config) == "encoder":
        loss = out.last_hidden_state.float().mean()
        pooled = getattr(out, "pooler_output", None)
        return loss if pooled is None else loss + pooled.float().mean()
    return out.loss


@contextlib.contextmanager
def _cuda_dropouts(model: nn.Module) -> Iterator[None]:
    mods = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    for m in mods:
        m.forward = partial(_cuda_dropout, m)
    try:
        yield
    finally:
        for m in mods:
            del m.forward


@contextlib.contextmanager
def _no_value_checks() -> Iterator[None]:
    """transformers reads input values where meta tensors have none: position_ids, to find packed sequences
    (peftkern.accelerate's prefix forward passes them), and input_ids, to warn about padding without a mask
    (DeBERTa). The trace's inputs are neither packed nor padded: answer so on meta."""
    from transformers import PreTrainedModel, masking_utils

    find, warn = masking_utils.find_packed_sequence_indices, PreTrainedModel.warn_if_padding_and_no_attention_mask
    masking_utils.find_packed_sequence_indices = lambda ids: None if ids.device.type == "meta" else find(ids)
    PreTrainedModel.warn_if_padding_and_no_attention_mask = (
        lambda self, ids, mask: None if ids.device.type == "meta" else warn(self, ids, mask))
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = find
        PreTrainedModel.warn_if_padding_and_no_attention_mask = warn


class _OpCount(TorchDispatchMode):
    """Counts calls of peftkern's forward ops (`peftkern::<name>`, backward ops excluded), and on a CPU target the
    bool dropout mask the torch backend's eager LoRA path keeps beside what the op saves (ops/lora.py; the fp32 path
    keeps no seed tensor). Keeps the
    storages `dequantize_4bit` writes: the 4-bit LoRA op's per-call weight, which autograd does not keep (the op saves
    a recipe instead, ops/lora_4bit.py)."""

    def __init__(self, target: str):
        super().__init__()
        self.calls: collections.Counter = collections.Counter()
        self.target = target
        self.extra_bytes = 0
        self.dequantized: dict[int, torch.UntypedStorage] = {}  # held: the keys stay unique during the trace

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        ns, _, name = func._schema.name.partition("::")
        if ns == "peftkern" and not name.endswith("_backward"):
            self.calls[name] += 1
            if name == "lora_linear" and self.target == "cpu" and args[6] > 0.0:
                x, lora_a = args[0], args[3]
                # the bool mask; the fp32 path (x and adapters fp32) keeps no seed tensor where the op keeps one
                self.extra_bytes += x.numel() - (8 if x.dtype == lora_a.dtype == torch.float32 else 0)
        out = func(*args, **(kwargs or {}))
        if ns == "peftkern" and name == "dequantize_4bit":
            st = out.untyped_storage()
            self.dequantized[st._cdata] = st
        return out

    def nested(self, saved: SavedTensors, t: torch.Tensor, packed) -> None:
        """How the trace counts what an op packs under its own saved_tensors_hooks: what the op's hook keeps, except
        that on meta a hook that tells storages apart by data pointer (all 0 there; ops/lora_4bit.py's does) cannot
        be trusted: there a tensor the hook turned into a non-tensor counts as kept unless `dequantize_4bit` wrote
        it (what the hook does on a real device: tests/test_report.py compares the trace with a CPU step)."""
        if isinstance(packed, torch.Tensor) or t.device.type != "meta":
            saved.record(packed)
        elif t.untyped_storage()._cdata not in self.dequantized:
            saved.record(t, pin=True)


def traced_activation_bytes(model: nn.Module, config, batch: int, seq: int, target: str = "cuda",
                            calls: collections.Counter | None = None) -> int:
    """Bytes autograd saves for backward in one forward + loss of `model` (on meta) as it stands and still keeps
    when the loss is computed (peftkern._memory.SavedTensors), parameters, buffers and bitsandbytes quantisation
    states excluded, each storage once. `calls` collects how often each peftkern op ran."""
    if target not in ("cuda", "cpu"):
        raise ValueError(f"target must be 'cuda' or 'cpu', got {target!r}")
    inputs = example_inputs(config, batch, seq, device="meta")
    model.train()
    token = _TARGET.set(target)
    count = _OpCount(target)
    saved = SavedTensors([*model.parameters(), *model.buffers(), *quant_state_tensors(model)],
                         nested=lambda t, packed: count.nested(saved, t, packed))
    try:
        with (_cuda_dropouts(model) if target == "cuda" else contextlib.nullcontext()), _no_value_checks(), \
                count, saved, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss = training_loss(model, config, inputs)
        n = saved.nbytes()
        del loss
    finally:
        _TARGET.reset(token)
    if calls is not None:
        calls.update(count.calls)
    return n + count.extra_bytes
