"""peft prefix-tuning on transformers decoders through peftkern::prefix_attention.

`accelerate(peft_model)` registers the attention function "peftkern_prefix" with transformers'
AttentionInterface (and the 2-D padding mask with AttentionMaskInterface, as flash-attention gets, so no
(B, 1, L, P + S) mask is built) and switches the base model to it. Causal-LM PeftModels on models that
run attention through that interface only (`why_not` says why another is left to peft). Two paths, both
on the fused op:

- No cache (training mode, or `use_cache=False`): the PeftModel's forward is replaced. The prefix is
  computed once per step from peft's prompt encoder at batch size 1 — (2 * layers, Hkv, P, D), no
  batch expand — and handed to every attention layer as a keyword argument through transformers'
  kwargs plumbing. The sequence K/V are never concatenated with it; the kernel reads it in place and
  reduces its gradient over the batch. Positions start at P, as peft's cache implies.
- A cache (eval with the config's `use_cache`, `use_cache=True`, a cache passed in, generate()):
  peft's own path. Its DynamicCache holds [prefix ; sequence] per layer; the attention function
  splits that into views (no copy) for the kernel.

Attention dropout: the fused kernels have none. `why_not` leaves a model whose attention modules carry a
dropout > 0 to peft (the reason goes into accelerate's summary); dropout set on the modules after
`accelerate` makes each training-mode attention call fall back to peft's math (SDPA over the concatenated
prefix, dropout included) with the reason (logged once, raised under PEFTKERN_STRICT=1). So does a
sliding window shorter than the prefix + sequence keys (within the window it changes nothing).

`disable_adapter()` switches the attention back to the model's own for its duration.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import warnings

import torch

from ..ops.prefix import prefix_attention
from ..reference import prefix as ref
from . import _swap, checks

log = logging.getLogger("peftkern")

NAME = "peftkern_prefix"
KWARG = "peftkern_prefix_kv"  # the (2 * layers, Hkv, P, D) prefix, passed down to the attention function
_LEN = "_peftkern_num_virtual_tokens"  # set on attention modules (cache path) and on caches peft made
_STATE = "_peftkern_prefix"  # on the PeftModel: the attention implementation it had before
_FUSED = "FusedPrefixPeftModelForCausalLM"  # the class an accelerated PeftModel gets (integrations/_swap.py)
_QKV = ("q_proj", "c_attn", "qkv_proj", "query_key_value", "Wqkv")  # how attention modules are told apart


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                      **kwargs):
    """transformers attention interface: query (B, H, L, D); key/value (B, Hkv, S, D) with the prefix in
    kwargs[KWARG], or (B, Hkv, P + S, D) with the P prefix positions first (a cache from peft's
    get_prompt); attention_mask the 2-D padding mask (B, ≥ S) or None."""
    if kwargs.get("softcap") is not None:
        raise ValueError(f"{NAME} attention does not support softcap")
    kv = kwargs.get(KWARG)
    if kv is not None:
        pk, pv = kv[2 * module.layer_idx], kv[2 * module.layer_idx + 1]
    else:
        P = getattr(module, _LEN, None)
        if P is None:
            raise RuntimeError(f"{NAME} attention: module {type(module).__name__} got no prefix; use "
                               "peftkern.accelerate(peft_model) and call the PeftModel")
        pk, pv, key, value = key[:, :, :P], value[:, :, :P], key[:, :, P:], value[:, :, P:]
    if dropout:  # set after accelerate (which leaves a model with attention dropout to peft)
        checks.note_fallback(f"attention dropout {dropout} set after peftkern.accelerate (the fused prefix "
                             "kernels have no attention dropout)", "prefix-tuning attention")
        return _concat_attention(module, query, key, value, pk, pv, attention_mask, dropout, scaling, is_causal,
                                 kwargs)
    if (pk.shape[-3], pk.shape[-1]) != (key.shape[1], key.shape[3]):
        raise ValueError(f"{NAME} attention: prefix {tuple(pk.shape)} does not match keys {tuple(key.shape)} "
                         "(PrefixTuningConfig num_attention_heads / token_dim vs the model's KV heads)")
    window = kwargs.get("sliding_window")
    if window is not None and pk.shape[-2] + key.shape[2] > window:  # within the window it changes nothing
        checks.note_fallback(f"a sliding window ({window}) shorter than the prefix + sequence keys (the fused "
                             "prefix kernels have no sliding window)", "prefix-tuning attention")
        return _concat_attention(module, query, key, value, pk, pv, attention_mask, dropout, scaling, is_causal,
                                 kwargs, window=window)
    pad = None
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError(f"{NAME} attention expects a 2-D padding mask, got shape {tuple(attention_mask.shape)}")
        pad = attention_mask[:, -key.shape[2]:].bool()
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    out = prefix_attention(query, key, value, pk.to(key.dtype), pv.to(value.dtype), causal=bool(is_causal),
                           key_padding_mask=pad, softmax_scale=scaling)
    return out.transpose(1, 2), None


def _concat_attention(module, query, key, value, pk, pv, attention_mask, dropout, scaling, is_causal, kwargs,
                      window=None):
    """peft's math: SDPA (transformers' sdpa_attention_forward, dropout included) over the prefix expanded
    to the batch and concatenated before the keys, with the (B, 1, L, P + S) boolean mask. `window`: the
    sliding window as transformers applies it to peft's cache, where the prefix holds positions 0..P-1 and
    query i the position P + S - L + i: key j is seen when j > position - window (so far queries lose the
    prefix too)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    B, L, S, P = query.shape[0], query.shape[2], key.shape[2], pk.shape[-2]
    pk, pv = (t.to(key.dtype).expand(B, *t.shape[-3:]) for t in (pk, pv))
    pad = None if attention_mask is None else attention_mask[:, -S:].bool()
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    mask = ref.full_mask(L, S, P, causal, pad, B, query.device)
    if window is not None:
        pos = torch.arange(P + S - L, P + S, device=query.device)[:, None]
        inside = torch.arange(P + S, device=query.device)[None, :] > pos - window
        mask = inside if mask is None else mask & inside
    if mask is not None:
        mask = mask.expand(B, 1, L, P + S)
    rest = {k: v for k, v in kwargs.items() if k not in (KWARG, "is_causal")}
    return sdpa_attention_forward(module, query, torch.cat([pk, key], 2), torch.cat([pv, value], 2), mask,
                                  dropout=dropout, scaling=scaling, is_causal=False, **rest)


def attention_dropout(module) -> float:
    """The attention dropout probability `module` passes to its attention function in training mode
    (transformers' attention modules keep it as `attention_dropout` / `dropout`, a float, or GPT-2's
    `attn_dropout`, an nn.Dropout)."""
    for name in ("attention_dropout", "attn_dropout", "dropout"):
        p = getattr(module, name, None)
        p = getattr(p, "p", p)
        if isinstance(p, (int, float)) and not isinstance(p, bool) and p > 0:
            return float(p)
    return 0.0


def padding_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                 attention_mask=None, **kwargs):
    """transformers mask interface: the 2-D padding mask of the last kv_length keys, as is (the kernel
    applies causality itself). Unlike flash-attention's, it does not drop an all-ones mask: that check
    reads the tensor's values and would split a torch.compile graph."""
    return None if attention_mask is None else attention_mask[:, -kv_length:]


def register() -> None:
    """Register "peftkern_prefix" with transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, padding_mask)


def is_prefix_model(model) -> bool:
    cfg = getattr(model, "active_peft_config", None)
    return cfg is not None and str(getattr(cfg.peft_type, "value", cfg.peft_type)) == "PREFIX_TUNING"


def prefix_kv(peft_model) -> torch.Tensor:
    """The active prefix as one (2 * num_layers, Hkv, P, D) tensor, layer i's keys at 2i and values at
    2i + 1: what peft's get_prompt builds, at batch size 1 instead of expanded to the batch."""
    cfg = peft_model.active_peft_config
    name = peft_model.active_adapter
    enc = peft_model.prompt_encoder[name]
    P, H = cfg.num_virtual_tokens, cfg.num_attention_heads
    if cfg.inference_mode:
        kv = enc.embedding.weight
    else:
        tokens = peft_model.prompt_tokens[name][:P].unsqueeze(0).to(enc.embedding.weight.device)
        kv = enc(tokens)[0]
    if peft_model.base_model_torch_dtype is not None:
        kv = kv.to(peft_model.base_model_torch_dtype)
    # One small copy to contiguous (the prefix, not the batch's KV) so each layer's slice is dense.
    return kv.view(P, cfg.num_layers * 2, H, cfg.token_dim // H).permute(1, 2, 0, 3).contiguous()


def _attention_modules(base) -> list:
    return [m for m in base.modules() if isinstance(getattr(m, "layer_idx", None), int)
            and any(hasattr(m, n) for n in _QKV)]


def why_not(peft_model) -> str | None:
    """Why `accelerate` leaves this prefix-tuning model to peft (None: it takes it)."""
    from peft import PeftModelForCausalLM

    cfg = peft_model.active_peft_config
    base = peft_model.get_base_model()
    if not isinstance(peft_model, PeftModelForCausalLM):
        return f"prefix-tuning {type(peft_model).__name__} (only causal-LM PeftModels are accelerated)"
    if type(peft_model) is not PeftModelForCausalLM and not _swap.is_swapped(peft_model):
        return f"prefix-tuning {type(peft_model).__name__}, a subclass of PeftModelForCausalLM"
    for k in _PEFT_SWAPS:
        fn = getattr(peft_model.__dict__.get(k), "__func__", None)
        if k in peft_model.__dict__ and fn not in (getattr(PeftModelForCausalLM, k), *_swap.fused_functions()):
            return f"the PeftModel's {k} was replaced on the instance by another library"
    if cfg.num_transformer_submodules != 1:
        return "encoder-decoder prefix-tuning"
    if not getattr(base, "_supports_attention_backend", False):
        return f"prefix-tuning on {type(base).__name__}, whose attention does not use transformers' interface"
    mods = _attention_modules(base)
    drop = max((attention_dropout(m) for m in mods), default=0.0)
    if drop > 0:
        return (f"prefix-tuning on {type(base).__name__} with attention dropout {drop} (the fused prefix kernels "
                "have none; set the model's attention dropout to 0 to fuse)")
    cap = next((c for m in mods if (c := getattr(m, "attn_logit_softcapping", None)) is not None), None)
    if cap is not None:
        return (f"prefix-tuning on {type(base).__name__} with attention logit softcapping {cap} (the fused prefix "
                "kernels have none)")
    idx = sorted(m.layer_idx for m in mods)
    if idx != list(range(cfg.num_layers)):
        return (f"prefix-tuning on {type(base).__name__}: attention layers {idx} do not map one to one onto "
                f"the prefix's {cfg.num_layers} layers")
    return None


def accelerate(peft_model) -> int:
    """Run a peft PrefixTuning causal LM's attention on peftkern::prefix_attention, in place; returns
    the number of attention layers routed. Raises ValueError saying why for a model it cannot take."""
    if not is_prefix_model(peft_model):
        raise ValueError("accelerate() takes a prefix-tuning PeftModel, got peft_type="
                         f"{getattr(getattr(peft_model, 'active_peft_config', None), 'peft_type', None)}")
    why = why_not(peft_model)
    if why is not None:
        raise ValueError(f"peftkern cannot accelerate this model: {why}")
    register()
    base = peft_model.get_base_model()
    mods = _attention_modules(base)
    P = peft_model.active_peft_config.num_virtual_tokens
    if _STATE not in peft_model.__dict__:
        before = base.config._attn_implementation
        base.set_attn_implementation(NAME)
        if base.config._attn_implementation != NAME:  # transformers declined (it warns, it does not raise)
            raise ValueError(f"peftkern cannot accelerate this model: {type(base).__name__} kept attention "
                             f"implementation {base.config._attn_implementation!r}")
        setattr(peft_model, _STATE, before)
        for k in _PEFT_SWAPS:  # peft's own bound methods that its disable_adapter left in the instance dict
            peft_model.__dict__.pop(k, None)
        _swap.swap(peft_model, _FUSED)  # forward, get_prompt and disable_adapter below
        base.register_forward_pre_hook(_check_cache, with_kwargs=True)
        base.register_forward_hook(_drop_unasked_cache, with_kwargs=True)
        base.__dict__[_MASK_POS] = any(type(m).__name__ in _MASK_POSITION_EMBEDDINGS for m in base.modules())
    for mod in mods:
        setattr(mod, _LEN, P)
    return len(mods)


def restore(peft_model) -> bool:
    """Undo `accelerate`: peft's forward and the attention implementation the model had. Returns whether
    there was anything to undo."""
    if _STATE not in peft_model.__dict__:
        return False
    base = peft_model.get_base_model()
    _swap.unswap(peft_model)
    for key, hook in list(base._forward_pre_hooks.items()):
        if hook is _check_cache:
            del base._forward_pre_hooks[key]
            base._forward_pre_hooks_with_kwargs.pop(key, None)
    for key, hook in list(base._forward_hooks.items()):
        if hook is _drop_unasked_cache:
            del base._forward_hooks[key]
            base._forward_hooks_with_kwargs.pop(key, None)
    for mod in _attention_modules(base):
        mod.__dict__.pop(_LEN, None)
    base.__dict__.pop(_MASK_POS, None)
    base.set_attn_implementation(peft_model.__dict__.pop(_STATE))
    return True


def _marked_get_prompt(self, batch_size, *args, **kwargs):
    """peft's get_prompt; the cache it returns is marked, so the attention function knows the first P
    positions are the prefix (and the length follows the active adapter)."""
    cache = _swap.base_class(self).get_prompt(self, batch_size, *args, **kwargs)
    P = self.active_peft_config.num_virtual_tokens
    setattr(cache, _LEN, P)
    for mod in _attention_modules(self.get_base_model()):
        setattr(mod, _LEN, P)
    return cache


_PEFT_SWAPS = ("forward", "prepare_inputs_for_generation")  # what peft's disable_adapter overwrites


@contextlib.contextmanager
def _disable_adapter(self):
    """peft's disable_adapter runs the base model's forward directly: give it its own attention back.
    peft also writes `forward` back into the instance dict on exit, where it would hide this class's
    methods from restore() and pickle: the instance dict is left as it was found."""
    base = self.get_base_model()
    before = {k: self.__dict__[k] for k in _PEFT_SWAPS if k in self.__dict__}
    base.set_attn_implementation(self.__dict__[_STATE])
    try:
        with _swap.base_class(self).disable_adapter(self):
            yield
    finally:
        base.set_attn_implementation(NAME)
        for k in _PEFT_SWAPS:
            self.__dict__.pop(k, None)
        self.__dict__.update(before)


# transformers' keyword for the KV cache: `past_key_values` up to ~5.2x, then `cache` (5.24 warns that
# `past_key_values` is removed in 5.40). peft 0.21 reads and writes `past_key_values` only.
CACHE_NAMES = ("cache", "past_key_values")


@functools.cache
def cache_kwarg(cls) -> str:
    """The name `cls.forward` takes the KV cache under: "cache" where its signature has it, else
    "past_key_values" (older transformers, or a model class not yet renamed)."""
    try:
        params = inspect.signature(cls.forward).parameters  # follows transformers' deprecate_kwarg wrapper
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _pop_cache(kwargs: dict):
    """Remove the cache from kwargs under either name and return the one to run on. generate() on
    transformers 5.24 passes its own `cache` beside the fresh prefix cache peft's
    prepare_inputs_for_generation makes every step as `past_key_values`: with `use_cache` on, its `cache`
    is peft's prefix cache from the first step, grown since (the right one once it holds the prefix); with
    `use_cache=False` it is a stale one from the previous step while the input is the whole sequence again,
    so peft's fresh prefix is the right one. Without a prefix cache: transformers' precedence, `cache`."""
    names = ("past_key_values", "cache") if kwargs.get("use_cache") is False else CACHE_NAMES
    found = [c for c in (kwargs.pop(k, None) for k in names) if c is not None]
    return next((c for c in found if getattr(c, _LEN, None) is not None), found[0] if found else None)


def _check_cache(module, args, kwargs):
    """Forward pre-hook on the base model: it must run with the prefix, either passed down by the
    no-concat forward or in a cache peft's get_prompt made. Some transformers / peft pairs run generate()
    on a fresh cache and drop the prefix: refuse those calls rather than read tokens as the prefix.
    The cache, given under either name, is handed on under the one the base model's forward takes."""
    if kwargs.get(KWARG) is not None:
        return None
    if not any(kwargs.get(k) is not None for k in CACHE_NAMES):
        cache = None
    else:
        cache = _pop_cache(kwargs)
        kwargs[cache_kwarg(type(module))] = cache
    if getattr(cache, _LEN, None) is None:
        raise RuntimeError(f"{NAME} attention: the model runs on a cache without peft's prefix (this "
                           "transformers/peft pair drops it, e.g. in generate()); call the PeftModel itself")
    return args, kwargs


def _drop_unasked_cache(module, args, kwargs, output):
    """Forward hook on the base model: `use_cache=False` returns no cache (transformers' contract). On
    transformers < 5.24 Llama, Gemma2, GPT-NeoX and OPT hand back peft's prefix cache they ran on anyway;
    generate(use_cache=False) then keeps it, feeds one token with the whole sequence's positions, and
    step 2 fails on a key/value shape mismatch (peft's own generate hits the same on that pair)."""
    if kwargs.get("use_cache") is False and isinstance(output, dict):
        cache = output.get("past_key_values")
        if cache is not None and getattr(cache, _LEN, None) is not None:
            # a new output without the field: ModelOutput keeps an item set to None, and beam search then
            # tries to reorder a None cache
            return type(output)(**{k: v for k, v in output.items() if k != "past_key_values"})
    return output


# Position embeddings that number tokens from the attention mask (cumsum), not from the cache length.
_MASK_POSITION_EMBEDDINGS = ("OPTLearnedPositionalEmbedding",)


_MASK_POS = "_peftkern_mask_positions"  # on the base model, set by accelerate


def _mask_positions(base) -> bool:
    return base.__dict__.get(_MASK_POS, False)


def _reentrant_checkpointing(base) -> bool:
    for mod in base.modules():
        if getattr(mod, "gradient_checkpointing", False) is True:
            fn = getattr(mod, "_gradient_checkpointing_func", None)
            if (getattr(fn, "keywords", None) or {}).get("use_reentrant") is True:
                return True
    return False


def _no_concat_forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None,
                       output_attentions=None, output_hidden_states=None, return_dict=None, task_ids=None,
                       **kwargs):
    """PeftModelForCausalLM.forward for prefix tuning without the cache: same outputs, same gradients.
    Takes peft's cache path where a cache is wanted: one passed in, `use_cache=True`, or in eval mode
    the config's `use_cache` (so outputs carry past_key_values as peft's do). Training-mode outputs
    carry no cache."""
    use_cache = kwargs.get("use_cache")
    if use_cache is None:
        use_cache = not self.training and bool(getattr(self.get_base_model().config, "use_cache", False))
    cache_asked = use_cache or any(kwargs.get(k) is not None for k in CACHE_NAMES)
    if cache_asked or not is_prefix_model(self):
        if "cache" in kwargs:  # peft's forward knows `past_key_values` only: one name, one behaviour
            cache = _pop_cache(kwargs)
            kwargs["past_key_values"] = cache
        return _swap.base_class(self).forward(self, input_ids=input_ids, attention_mask=attention_mask,
                                  inputs_embeds=inputs_embeds, labels=labels, output_attentions=output_attentions,
                                  output_hidden_states=output_hidden_states, return_dict=return_dict,
                                  task_ids=task_ids, **kwargs)
    if self.training and _reentrant_checkpointing(self.get_base_model()):
        raise ValueError(f"{NAME}: reentrant gradient checkpointing recomputes each layer in its own backward, "
                         "which cannot share the one prefix tensor; use gradient_checkpointing_kwargs="
                         "{'use_reentrant': False} (transformers' default)")
    P = self.active_peft_config.num_virtual_tokens
    x = input_ids if input_ids is not None else inputs_embeds
    position_ids = kwargs.pop("position_ids", None)
    # peft's cache holds P positions before the sequence, so the model numbers the sequence from P.
    if position_ids is None and attention_mask is not None and _mask_positions(self.get_base_model()):
        # OPT numbers tokens by the running count of its (prefix-extended) mask: pads -1, the rest from P
        position_ids = (P + attention_mask.long().cumsum(1)) * attention_mask.long() - 1
    elif position_ids is None:
        position_ids = torch.arange(P, P + x.shape[1], device=x.device).unsqueeze(0)
    else:
        position_ids = position_ids + P
    kwargs.pop("use_cache", None)
    if kwargs.get("token_type_ids") is not None:  # as peft does for prompt learning
        warnings.warn("Token type ids are not supported for parameter efficient tuning. Ignoring token type ids",
                      stacklevel=2)
        kwargs["token_type_ids"] = None
    kwargs[KWARG] = prefix_kv(self)
    return self.base_model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                           labels=labels, output_attentions=output_attentions,
                           output_hidden_states=output_hidden_states, return_dict=return_dict,
                           position_ids=position_ids, use_cache=False, **kwargs)


def _fused_prefix_class():
    from peft import PeftModelForCausalLM

    register()  # a model unpickled in a fresh process needs the attention function registered

    return PeftModelForCausalLM, {"forward": _no_concat_forward, "get_prompt": _marked_get_prompt,
                                  "disable_adapter": _disable_adapter}


_swap.register(_FUSED, _fused_prefix_class)
