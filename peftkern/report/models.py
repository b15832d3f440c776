"""The report's models, built with the real integrations: peft for LoRA / IA3 / prefix / prompt tuning,
`peftkern.add_adapters` for the bottleneck adapters; `use_peftkern` routes a model through
`peftkern.accelerate`, `eager_adapters` runs the adapters as plain torch (their baseline)."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from functools import partial

import torch
from torch import nn

from ..integrations import accelerate as _accelerate
from ..integrations import adapters as _adapters
from ..nn.adapter import BottleneckAdapter
from ..reference import adapter as _ref
from .presets import ADAPTERS, METHOD_KEYS, TASK, Settings, model_kind


def build_model(config, dtype: torch.dtype = torch.float32, device="meta", attn="peftkern_trace") -> nn.Module:
    """The report's model for `config` (no weights on meta): AutoModel for an encoder (RoBERTa as
    the LoRA paper adapts it, without a task head), *ForCausalLM, *ForConditionalGeneration."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    if attn == "peftkern_trace":
        from .tracing import register_trace_attention

        register_trace_attention()
    cls = {"seq2seq": AutoModelForSeq2SeqLM, "encoder": AutoModel, "causal": AutoModelForCausalLM}[model_kind(config)]
    with torch.device(device), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls.from_config(config, dtype=dtype, attn_implementation=attn)


def apply_method(model: nn.Module, config, method: str, settings: Settings):
    """Make `model` train with `method` at its default setting. Returns (model, setting text)."""
    import peft

    task = TASK[model_kind(config)]
    if method == "full":
        model.requires_grad_(True)
        return model, "all parameters"
    if method == "bitfit":
        model.requires_grad_(False)
        names = []
        for name, p in model.named_parameters():
            if name.split(".")[-1] == "bias":
                p.requires_grad_(True)
                names.append(name)
        return model, "all bias terms" + ("" if names else f" ({config.model_type} has none)")
    if method in ADAPTERS:  # fp32 adapters on the model's dtype, as peft keeps its adapters
        cfg = _adapters.AdapterConfig(bottleneck=settings.bottleneck, placement=method, dtype="float32")
        _adapters.add_adapters(model, cfg)
        n, sites = n_adapters(model), len(cfg.resolved_sites)
        return model, f"bottleneck {settings.bottleneck}, {sites} site{'s' * (sites > 1)}/layer ({n})"
    if method == "lora":
        cfg = peft.LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                              task_type=task)
        setting = f"r={settings.lora_r}"
    elif method == "ia3":
        cfg = peft.IA3Config(task_type=task)
        setting = ""
    elif method == "prefix":
        cfg = peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=settings.num_virtual_tokens)
        setting = f"{settings.num_virtual_tokens} virtual tokens"
    elif method == "prompt":
        cfg = peft.PromptTuningConfig(task_type=task, num_virtual_tokens=settings.num_virtual_tokens)
        setting = f"{settings.num_virtual_tokens} virtual tokens"
    else:
        raise ValueError(f"unknown method {method!r}: choose from {', '.join(METHOD_KEYS)}")
    with warnings.catch_warnings(), torch.device(next(model.parameters()).device):
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(model, cfg)
    if method in ("lora", "ia3"):
        targets = sorted(pm.peft_config["default"].target_modules)
        setting = (setting + " on " if setting else "") + ",".join(targets)
        if method == "ia3":
            setting += " (ffn: " + ",".join(sorted(pm.peft_config["default"].feedforward_modules)) + ")"
    return pm, setting


def trainable_parameters(model: nn.Module) -> int:
    """peft's own count for a PeftModel, else the parameters that require grad."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return int(model.get_nb_trainable_parameters()[0])
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def n_adapters(model: nn.Module) -> int:
    return sum(isinstance(m, BottleneckAdapter) for m in model.modules())


def use_peftkern(model: nn.Module, method: str) -> tuple[int, list[str]]:
    """Route `model` (built by apply_method) through peftkern's ops as a user would: `peftkern.accelerate`
    for peft's methods; adapters added by `add_adapters` already run `bottleneck_adapter`. Returns (sites
    the op should serve per forward, why accelerate leaves sites to peft)."""
    if method in ADAPTERS:
        return n_adapters(model), []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = _accelerate.accelerate(model)
    why = [r if n == 1 else f"{r}: {n} layers" for r, n in summary.reasons.most_common()]
    if method == "lora":
        return summary.lora_layers, why
    if method == "ia3":
        return summary.ia3_layers, why
    if method == "prefix":
        return model.active_peft_config.num_layers, why
    return 0, why


def _eager_adapter(adapter: BottleneckAdapter, x, residual=None):
    """BottleneckAdapter.forward as plain torch ops (peftkern.reference.adapter): what autograd saves
    without peftkern's op."""
    if residual is not None and residual.dtype != x.dtype:
        x = x.to(residual.dtype)
    return _ref.bottleneck_adapter(x, adapter.down_weight, adapter.down_bias, adapter.up_weight, adapter.up_bias,
                                   residual, adapter.activation, adapter.scaling)


@contextlib.contextmanager
def eager_adapters(model: nn.Module) -> Iterator[None]:
    """While inside, every BottleneckAdapter of `model` computes its math in plain torch (the baseline)."""
    mods = [m for m in model.modules() if isinstance(m, BottleneckAdapter)]
    for m in mods:
        m.forward = partial(_eager_adapter, m)
    try:
        yield
    finally:
        for m in mods:
            del m.forward
