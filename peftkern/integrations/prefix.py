"""peft prefix-tuning on transformers decoders through peftkern::prefix_attention.

`accelerate(peft_model)` registers the attention function "peftkern_prefix" with transformers'
AttentionInterface (and the 2-D padding mask with AttentionMaskInterface, as flash-attention gets,
so no (B, 1, L, P + S) mask is built) and switches the base model to it. peft still hands the
prefix in through its DynamicCache, so each layer's K/V arrive as [prefix ; sequence]: the
attention function splits them into views (no copy) and the kernel reads the prefix part in place.
Not done here: a cache that never concatenates the prefix (peft's cache update still copies it).
"""

from __future__ import annotations

import weakref

import torch

from ..ops.prefix import prefix_attention

NAME = "peftkern_prefix"
_ATTR = "peftkern_num_virtual_tokens"


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                      **kwargs):
    """transformers attention interface: query (B, H, L, D), key/value (B, Hkv, P + S, D) with the P
    prefix positions first; attention_mask the 2-D (B, P + S) padding mask or None."""
    P = getattr(module, _ATTR, None)
    if P is None:
        raise RuntimeError(f"{NAME} attention: module {type(module).__name__} has no prefix length; "
                           "use peftkern.integrations.prefix.accelerate(peft_model)")
    if dropout:
        raise ValueError(f"{NAME} attention has no attention dropout (got {dropout}): set attention_dropout=0")
    for name in ("softcap", "sliding_window"):
        if kwargs.get(name) is not None:
            raise ValueError(f"{NAME} attention does not support {name}")
    pad = None
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError(f"{NAME} attention expects a 2-D padding mask, got shape {tuple(attention_mask.shape)}")
        pad = attention_mask[:, -key.shape[2]:][:, P:].bool()
    causal = True if is_causal is None else bool(is_causal)
    out = prefix_attention(query, key[:, :, P:], value[:, :, P:], key[:, :, :P], value[:, :, :P], causal=causal,
                           key_padding_mask=pad, softmax_scale=scaling)
    return out.transpose(1, 2), None


def register() -> None:
    """Register "peftkern_prefix" with transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, flash_attention_mask)


def accelerate(peft_model) -> torch.nn.Module:
    """Run a peft PrefixTuning model's attention on peftkern::prefix_attention; returns the model."""
    cfg = peft_model.active_peft_config
    if str(getattr(cfg.peft_type, "value", cfg.peft_type)) != "PREFIX_TUNING":
        raise ValueError(f"accelerate() takes a prefix-tuning PeftModel, got peft_type={cfg.peft_type}")
    register()
    base = peft_model.get_base_model()
    n = 0
    for mod in base.modules():
        if hasattr(mod, "layer_idx") and hasattr(mod, "q_proj"):
            setattr(mod, _ATTR, cfg.num_virtual_tokens)
            n += 1
    if n == 0:
        raise ValueError("found no attention modules (with layer_idx and q_proj) in the base model")
    if not getattr(peft_model, "_peftkern_prefix", False):
        _track_prefix_caches(peft_model, base)
    base.set_attn_implementation(NAME)
    return peft_model


def _track_prefix_caches(peft_model, base) -> None:
    """The attention function takes the first P cached positions for the prefix, so the cache the
    model runs on must be the one peft's get_prompt made. Some transformers / peft pairs run
    generate() on a fresh cache and drop the prefix: refuse those calls instead of mixing up tokens."""
    made = weakref.WeakSet()
    get_prompt = peft_model.get_prompt

    def tracked_get_prompt(*args, **kwargs):
        cache = get_prompt(*args, **kwargs)
        made.add(cache)
        return cache

    def check(module, args, kwargs):
        cache = kwargs.get("cache")
        cache = cache if cache is not None else kwargs.get("past_key_values")
        if cache is None or cache not in made:
            raise RuntimeError(f"{NAME} attention: the model runs on a cache without peft's prefix (this "
                               "transformers/peft pair drops it, e.g. in generate()); call the PeftModel itself")

    peft_model.get_prompt = tracked_get_prompt
    base.register_forward_pre_hook(check, with_kwargs=True)
    peft_model._peftkern_prefix = True
