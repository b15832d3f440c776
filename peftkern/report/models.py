"""The report's models, built with the real integrations: peft for LoRA / DoRA / IA3 / prefix / prompt tuning,
QLoRA as transformers loads a model in 4 bit (`quantize_4bit`) with peft's LoRA on it, `peftkern.add_adapters` for
the bottleneck adapters; `use_peftkern` routes a model through `peftkern.accelerate`, `eager_adapters` runs the
adapters as plain torch (their baseline)."""

from __future__ import annotations

import collections
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
    if method in ("lora", "dora", "qlora"):
        why = why_unavailable(method)
        if why is not None:
            raise RuntimeError(why)
        if method == "qlora":
            n4, kept = quantize_4bit(model, next(model.parameters()).dtype)
        cfg = peft.LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                              use_dora=method == "dora", task_type=task)
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
    if method in ("lora", "dora", "qlora", "ia3"):
        targets = sorted(pm.peft_config["default"].target_modules)
        setting = (setting + " on " if setting else "") + ",".join(targets)
        if method == "qlora":
            leaves = collections.Counter(name.rpartition(".")[2] for name in kept)
            not_4bit = ",".join(k if c == 1 else f"{k} x{c}" for k, c in leaves.items())
            setting += f"; NF4+DQ bases ({n4} linears{', not ' + not_4bit if kept else ''})"
        if method == "ia3":
            setting += " (ffn: " + ",".join(sorted(pm.peft_config["default"].feedforward_modules)) + ")"
    return pm, setting


def why_unavailable(method: str) -> str | None:
    """Why `method`'s row cannot be built here (a package it needs is missing), or None."""
    if method == "qlora":
        try:
            import bitsandbytes  # noqa: F401
        except Exception as e:  # ImportError, or a broken install raising anything else
            return f"needs bitsandbytes, which is not importable here ({type(e).__name__}: {e})"[:200]
    return None


QLORA_QUANT = dict(quant_type="nf4", compress_statistics=True, blocksize=64)  # QLoRA: NF4, double quantisation


def quantize_4bit(model: nn.Module, dtype: torch.dtype) -> tuple[int, list[str]]:
    """Make `model` what transformers loads for BitsAndBytesConfig(load_in_4bit=True, nf4, double quantisation,
    compute dtype `dtype`): transformers' own 4-bit quantizer picks and replaces the layers (every nn.Linear / Conv1D
    but the output head and the modules the model keeps in fp32, e.g. T5's `wo`) by bnb.nn.Linear4bit, whose weight
    is then quantised from the layer's own weight on its device by bitsandbytes (on meta, its fake kernels give the
    packed weight's and quantisation state's shapes). Returns (layers quantised, the linear layers kept)."""
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers import AutoHfQuantizer

    # bitsandbytes caches the code of double quantisation on the device of its first call; a first call on meta
    # would leave a meta code that every later real quantisation fails to copy. A CPU call first makes it on CPU.
    bnb.functional.quantize_blockwise(torch.linspace(-1.0, 1.0, 256))
    before = dict(model.named_modules())
    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=QLORA_QUANT["quant_type"],
                            bnb_4bit_use_double_quant=QLORA_QUANT["compress_statistics"], bnb_4bit_compute_dtype=dtype)
    quantizer = AutoHfQuantizer.from_config(qc, pre_quantized=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantizer.preprocess_model(model, device_map=None)
    n = 0
    for name, mod in model.named_modules():
        if not isinstance(mod, bnb.nn.Linear4bit) or getattr(mod.weight, "bnb_quantized", False):
            continue
        old = before[name]
        w = old.weight.detach()
        w = (w.t() if isinstance(old, Conv1D) else w).contiguous()  # Conv1D keeps (in, out)
        data, qs = bnb.functional.quantize_4bit(w, **QLORA_QUANT)
        mod.weight = bnb.nn.Params4bit(data, requires_grad=False, quant_state=qs, bnb_quantized=True, module=mod,
                                       **QLORA_QUANT)
        if old.bias is not None:
            mod.bias = nn.Parameter(old.bias.detach(), requires_grad=False)
        n += 1
    quantizer.postprocess_model(model)  # is_loaded_in_4bit: peft then wraps these layers in lora.bnb.Linear4bit
    model.hf_quantizer = quantizer
    kept = [name for name, mod in model.named_modules() if type(mod) is nn.Linear or isinstance(mod, Conv1D)]
    return n, kept


def quant_state_tensors(model: nn.Module) -> list[torch.Tensor]:
    """The tensors of the bitsandbytes quantisation states of `model`'s 4-bit weights (absmax, codes, offset, the
    nested state's): weight memory that is neither a parameter nor a buffer."""
    out = []
    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        for st in (qs, getattr(qs, "state2", None)):
            out += [t for t in (getattr(st, f, None) for f in ("absmax", "code", "offset")) if torch.is_tensor(t)]
    return out


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
    if method in ("lora", "dora", "qlora"):
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
