"""`peftkern report`: per PEFT method at its paper-default setting, the trainable parameters, a
training-memory estimate with and without peftkern's kernels, and which peftkern kernel serves it.

Models are built from transformers configs on the meta device (no weights, no downloads): the
presets below carry the published hyperparameters, or pass a config JSON path.

Trainable parameters
    Counted on the meta model itself: peft's own ``get_nb_trainable_parameters`` where peft has the
    method (LoRA, IA3, prefix-tuning, prompt tuning), else the parameters that require grad (full
    fine-tuning, BitFit, and the bottleneck adapters this module inserts, whose count is
    ``blocks x sites x (2·d·r + r + d)``). "%" is of the base model's parameters.

Memory estimate (bytes; one training step with AdamW)
    weights      every parameter at its own dtype: the frozen base in --dtype, adapters as peft keeps
                 them (fp32, peft's ``autocast_adapter_dtype``); full fine-tuning trains in --dtype.
    grads        one gradient per trainable parameter, in its dtype.
    AdamW        exp_avg + exp_avg_sq per trainable parameter, in its dtype (torch.optim.AdamW); on
                 target cpu also the 4-byte ``step`` scalar per parameter tensor (on CUDA it stays on
                 the host).
    activations  the bytes autograd saves for backward in one forward of --batch x --seq tokens
                 (plus the loss: causal-LM / seq2seq cross-entropy, or the mean of an encoder's
                 outputs), parameters and buffers excluded, each storage counted once. Not a
                 hand formula per architecture: the real model (transformers + peft) runs forward on
                 the meta device under ``saved_tensors_hooks`` and the saved storages are summed. Two
                 things differ between devices and are modelled for --target:
                   dropout    cuda: ``native_dropout`` keeps a bool mask (1 byte/element);
                              cpu: the scaled noise in the input's dtype (what meta does too).
                   attention  cuda: flash / memory-efficient SDPA keeps q, k, v, out and an fp32
                              logsumexp (B·H·Sq), plus the additive mask when there is one (T5's
                              position bias); dropout is a Philox seed, no mask.
                              cpu: flash-attention-for-cpu when there is no dropout (same saved set),
                              else the math path (the real SDPA decomposition, run on meta).
    total        weights + grads + AdamW + activations (an upper bound of the peak: gradients and
                 activations are not all alive at once; allocator slack and backward temporaries
                 are not included).

With peftkern ("act. peftkern")
    The same trace with each adapted site running peftkern's op: its fake (meta) kernel and its
    registered autograd, so what it saves is what the op's ``setup_context`` saves, and storages
    shared between sites still count once. The saved sets (M = tokens, d/in/out = features, r = rank):
      lora_linear         peft: x cast to fp32 -> dropout keeps its mask (M·in bool on CUDA) ->
                          lora_A keeps drop(x) (M·in fp32) -> lora_B keeps xAᵀ (M·r fp32); the
                          frozen base layer keeps nothing (its weight needs no grad).
                          peftkern: x in its own dtype (one copy shared by q and v, which read the
                          same x), t = drop(x)Aᵀ (M·r fp32) and a seed; the mask is regenerated.
                          Saving per adapted layer ~ M·in·(1 + 4) - M·in·2/(layers sharing x).
      bottleneck_adapter  eager: x cast to fp32 (M·d·4) kept by the down-projection, ReLU's output
                          (M·r fp32) kept by ReLU and the up-projection.
                          peftkern: x (M·d, its dtype) and z = x W_dᵀ + b_d; f(z) is recomputed.
      ia3_linear          peft: keys/values keep the base output (M·out) for dl; feed-forward keeps
                          x cast to fp32 (M·in·4).
                          peftkern: the output y (keys/values) or x (feed-forward), in x's dtype.
      prefix_attention    peft: the prefix is expanded over the batch and concatenated into K and V,
                          so attention keeps B·H·(P+S)·D for each, plus SDPA's additive mask per layer.
                          peftkern: K and V without the prefix (B·H·S·D), the prefix (H·P·D, shared by
                          the batch), q, out and logsumexp; no mask. (T5's position bias is not taken:
                          T5 keeps peft's path.)
    Where this build lacks an op (``peftkern.ops.<module>`` missing or broken) its kernel is marked
    "*" and a stand-in autograd node with the design's saved set (DESIGN.md) takes its place: x and
    z for the adapter, x for IA3, K/V without the prefix for prefix attention.

``--measure`` builds a scaled-down model of the same architecture (2 layers, hidden 128), runs a
real training step on the current device and prints estimate vs measured: on CUDA the peak of
``max_memory_allocated`` over a step (after a warm-up step, grads kept) and the growth of
``memory_allocated`` over the forward; on CPU ``peftkern._memory.saved_bytes`` of the forward plus
the bytes of parameters, gradients and optimizer state after the step. Methods whose op this build
has are also measured through the op ("(peftkern)" rows); prefix-tuning through `peftkern.accelerate`,
on causal LMs only (encoder and seq2seq prefix models are estimated by the trace, not measured).
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import dataclasses
import importlib
import json
import os
import re
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from . import _cli_args

# ----------------------------------------------------------------------------------------------
# Model presets: published hyperparameters (RoBERTa: Liu et al. 2019; T5: Raffel et al. 2020;
# LLaMA: Touvron et al. 2023), as the transformers config fields.
# ----------------------------------------------------------------------------------------------

_ROBERTA = dict(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5,
                pad_token_id=1, bos_token_id=0, eos_token_id=2, hidden_act="gelu",
                hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
_LLAMA = dict(vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-6, hidden_act="silu",
              tie_word_embeddings=False, attention_bias=False, mlp_bias=False, bos_token_id=1, eos_token_id=2)

PRESETS: dict[str, tuple[str, dict]] = {
    "roberta-base": ("roberta", dict(_ROBERTA, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                     intermediate_size=3072)),
    "roberta-large": ("roberta", dict(_ROBERTA, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                      intermediate_size=4096)),
    "t5-base": ("t5", dict(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_decoder_layers=12,
                           num_heads=12, relative_attention_num_buckets=32, relative_attention_max_distance=128,
                           dropout_rate=0.1, feed_forward_proj="relu", tie_word_embeddings=True,
                           is_encoder_decoder=True, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)),
    "llama-7b": ("llama", dict(_LLAMA, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                               num_attention_heads=32, num_key_value_heads=32)),
    "llama-13b": ("llama", dict(_LLAMA, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                num_attention_heads=40, num_key_value_heads=40)),
}

# ----------------------------------------------------------------------------------------------
# Methods and their paper-default settings
# ----------------------------------------------------------------------------------------------


@dataclass
class Settings:
    lora_r: int = 8  # LoRA paper, RoBERTa GLUE: r=8 on W_q and W_v
    lora_alpha: int = 8  # peft's default (scaling does not change counts or memory)
    lora_dropout: float = 0.1
    bottleneck: int = 64  # adapter bottleneck r (Houlsby 2019 / Pfeiffer 2021 / He 2022)
    num_virtual_tokens: int = 20  # prefix-tuning and prompt tuning


@dataclass(frozen=True)
class Method:
    key: str
    name: str
    kernel: str | None  # the peftkern op serving it, None: "none needed"


METHODS = (
    Method("full", "full fine-tuning", None),
    Method("lora", "LoRA", "lora_linear"),
    Method("houlsby", "Houlsby adapter", "bottleneck_adapter"),
    Method("pfeiffer", "Pfeiffer adapter", "bottleneck_adapter"),
    Method("parallel", "parallel adapter", "bottleneck_adapter"),
    Method("ia3", "IA3", "ia3_linear"),
    Method("prefix", "prefix-tuning", "prefix_attention"),
    Method("prompt", "prompt tuning", None),
    Method("bitfit", "BitFit", None),
)
METHOD_KEYS = tuple(m.key for m in METHODS)
_BY_KEY = {m.key: m for m in METHODS}
ADAPTER_SITES = {"houlsby": ("attn_out", "ffn_out"), "pfeiffer": ("ffn_out",), "parallel": ("ffn",)}

# Where bottleneck adapters go, per architecture family: regexes over module names whose `block`
# group names the transformer block. attn_out / ffn_out: the module whose output is the attention /
# feed-forward sublayer's output (before the residual); ffn_in: the module whose input is the
# feed-forward input (a parallel adapter reads it and adds to the ffn_out output).
_SITES = {
    "bert": dict(attn_out=r"(?P<block>.*\.layer\.\d+\.)attention\.output\.dense",
                 ffn_out=r"(?P<block>.*\.layer\.\d+\.)output\.dense",
                 ffn_in=r"(?P<block>.*\.layer\.\d+\.)intermediate\.dense"),
    "llama": dict(attn_out=r"(?P<block>.*\.layers\.\d+\.)self_attn\.o_proj",
                  ffn_out=r"(?P<block>.*\.layers\.\d+\.)mlp", ffn_in=r"(?P<block>.*\.layers\.\d+\.)mlp"),
    "gpt2": dict(attn_out=r"(?P<block>.*\.h\.\d+\.)attn\.c_proj", ffn_out=r"(?P<block>.*\.h\.\d+\.)mlp",
                 ffn_in=r"(?P<block>.*\.h\.\d+\.)mlp"),
    "t5": dict(attn_out=r"(?P<block>.*\.block\.\d+\.)layer\.0\.SelfAttention\.o",
               ffn_out=r"(?P<block>.*\.block\.\d+\.layer\.\d+\.)DenseReluDense",
               ffn_in=r"(?P<block>.*\.block\.\d+\.layer\.\d+\.)DenseReluDense"),
}
_FAMILY = {"bert": "bert", "roberta": "bert", "xlm-roberta": "bert", "electra": "bert", "llama": "llama",
           "mistral": "llama", "qwen2": "llama", "qwen3": "llama", "t5": "t5", "mt5": "t5", "gpt2": "gpt2"}
_ENCODERS = {"bert", "roberta", "xlm-roberta", "electra", "deberta", "deberta-v2", "distilbert", "albert"}


# ----------------------------------------------------------------------------------------------
# Configs and models
# ----------------------------------------------------------------------------------------------


def load_config(name: str):
    """A transformers config from a preset name or a config JSON path (no download)."""
    from transformers import AutoConfig

    if name in PRESETS:
        model_type, kw = PRESETS[name]
        return AutoConfig.for_model(model_type, **kw)
    path = os.path.join(name, "config.json") if os.path.isdir(name) else name  # a checkpoint folder
    try:
        with open(path) as f:
            d = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"unknown model {name!r}: a preset ({', '.join(PRESETS)}) or a config JSON path "
                         "(or a folder holding config.json)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read a config JSON: {e}") from None
    if not isinstance(d, dict) or "model_type" not in d:
        raise ValueError(f"{path}: a transformers config JSON needs a 'model_type' field")
    model_type = d.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **d)
    except ValueError:
        import transformers

        raise ValueError(f"{path}: model_type {model_type!r} is unknown to transformers "
                         f"{transformers.__version__}") from None


def model_kind(config) -> str:
    """'seq2seq', 'encoder' or 'causal': which head the report builds (and peft's task type)."""
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    archs = " ".join(getattr(config, "architectures", None) or [])
    if config.model_type in _ENCODERS and "CausalLM" not in archs:
        return "encoder"
    return "causal"


_TASK = {"seq2seq": "SEQ_2_SEQ_LM", "encoder": "FEATURE_EXTRACTION", "causal": "CAUSAL_LM"}


def n_blocks(config) -> int:
    """Transformer blocks (encoder + decoder for encoder-decoder models)."""
    if getattr(config, "is_encoder_decoder", False):
        return config.num_layers + (config.num_decoder_layers or config.num_layers)
    return config.num_hidden_layers


def build_model(config, dtype: torch.dtype = torch.float32, device="meta", attn="peftkern_trace") -> nn.Module:
    """The report's model for `config` (no weights on meta): AutoModel for an encoder (RoBERTa as
    the LoRA paper adapts it, without a task head), *ForCausalLM, *ForConditionalGeneration."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    if attn == "peftkern_trace":
        _register_trace_attention()
    cls = {"seq2seq": AutoModelForSeq2SeqLM, "encoder": AutoModel, "causal": AutoModelForCausalLM}[model_kind(config)]
    with torch.device(device), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls.from_config(config, dtype=dtype, attn_implementation=attn)


def _n_params(params) -> int:
    return sum(p.numel() for p in params)


class BottleneckAdapter(nn.Module):
    """``residual + up(relu(down(x)))``, x: (..., d), r = bottleneck; in fp32 like peft's adapters.
    `up` starts at zero (near-identity init, Houlsby et al.). 2·d·r + r + d parameters."""

    def __init__(self, d: int, r: int, dtype=torch.float32):
        super().__init__()
        self.down = nn.Linear(d, r, dtype=dtype)
        self.up = nn.Linear(r, d, dtype=dtype)
        if self.up.weight.device.type != "meta":
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)
        self.use_kernel = False  # True: run / account as peftkern's bottleneck_adapter

    def forward(self, x, residual):
        if self.use_kernel:
            return _adapter_kernel(self, x, residual)
        h = F.relu(self.down(x.to(self.down.weight.dtype)))
        return residual + self.up(h).to(x.dtype)


def add_adapters(model: nn.Module, config, variant: str, r: int) -> list[BottleneckAdapter]:
    """Insert bottleneck adapters (variant: houlsby = after attention and after the feed-forward,
    pfeiffer = after the feed-forward, parallel = beside the feed-forward, reading its input) and
    freeze everything else. Returns the adapters."""
    fam = _FAMILY.get(config.model_type)
    if fam is None:
        raise ValueError(f"adapter sites unknown for model_type {config.model_type!r} (known: {sorted(_FAMILY)})")
    pats = _SITES[fam]
    d = config.hidden_size
    model.requires_grad_(False)
    modules = dict(model.named_modules())
    device = next(model.parameters()).device

    def find(kind):
        out = {}
        for name in modules:
            m = re.fullmatch(pats[kind], name)
            if m:
                out[m.group("block")] = modules[name]
        return out

    adapters = []

    def new_adapter(host):
        with torch.device(device):
            a = BottleneckAdapter(d, r)
        host.add_module("peftkern_adapter", a)
        adapters.append(a)
        return a

    def serial(mod, args, out, a):
        return a(out, out)

    for site in ADAPTER_SITES[variant]:
        if site == "ffn":
            ins, outs = find("ffn_in"), find("ffn_out")
            for block, out_mod in outs.items():
                in_mod = ins[block]
                a = new_adapter(out_mod)
                slot = {}
                in_mod.register_forward_pre_hook(lambda mod, args, slot=slot: slot.__setitem__("x", args[0]))
                out_mod.register_forward_hook(lambda mod, args, out, a=a, slot=slot: a(slot.pop("x"), out))
        else:
            for mod in find(site).values():
                a = new_adapter(mod)
                mod.register_forward_hook(partial(serial, a=a))
    if not adapters:
        raise ValueError(f"found no adapter sites in {type(model).__name__}")
    return adapters


def apply_method(model: nn.Module, config, method: str, settings: Settings):
    """Make `model` train with `method` at its default setting. Returns (model, setting text)."""
    import peft

    kind = model_kind(config)
    task = _TASK[kind]
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
    if method in ADAPTER_SITES:
        adapters = add_adapters(model, config, method, settings.bottleneck)
        sites = len(ADAPTER_SITES[method])
        return model, f"bottleneck {settings.bottleneck}, {sites} site{'s' * (sites > 1)}/layer ({len(adapters)})"
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
    return _n_params(p for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------------
# Tracing what a forward saves for backward (on meta)
# ----------------------------------------------------------------------------------------------


@dataclass
class _Trace:
    target: str = "cuda"
    peftkern: bool = False
    prefix_tokens: int = 0
    used: set = dataclasses.field(default_factory=set)  # "op:<kernel>" / "model:<kernel>" / "unserved:<why>"


_MODE: contextvars.ContextVar[_Trace | None] = contextvars.ContextVar("peftkern_report_trace", default=None)


def _mode() -> _Trace:
    return _MODE.get() or _Trace()


_KERNEL_MODULES = {"lora_linear": "lora", "bottleneck_adapter": "adapter", "ia3_linear": "ia3",
                   "prefix_attention": "prefix"}


def kernel_fn(kernel: str | None):
    """peftkern's Python wrapper for `kernel` (``peftkern.ops.<module>.<kernel>``) when this build has
    the op, else None (then the report accounts for the kernel with a stand-in of its design)."""
    if kernel not in _KERNEL_MODULES:
        return None
    try:
        mod = importlib.import_module(f"peftkern.ops.{_KERNEL_MODULES[kernel]}")
    except Exception:  # a missing or broken op module: fall back to the design's saved set
        return None
    fn = getattr(mod, kernel, None)
    return fn if fn is not None and hasattr(torch.ops.peftkern, kernel) else None


def _use(kernel: str):
    """The real op when there is one (recorded "op:"), else None (the caller models it, "model:")."""
    fn = kernel_fn(kernel)
    _mode().used.add(("op:" if fn else "model:") + kernel)
    return fn


class _KernelModel(torch.autograd.Function):
    """A stand-in node for the memory trace: returns a fresh tensor of `shape`/`dtype` and saves
    exactly what `save(inputs, out)` returns. It has no backward: it only ever runs on meta."""

    @staticmethod
    def forward(ctx, spec, *inputs):
        shape, dtype, save = spec
        out = inputs[0].new_empty(shape, dtype=dtype)
        if any(ctx.needs_input_grad[1:]):  # nothing upstream trains: no graph node, nothing kept
            ctx.save_for_backward(*save(inputs, out))
        return out

    @staticmethod
    def backward(ctx, *grads):  # pragma: no cover - never run
        raise RuntimeError("peftkern.report stand-in node: memory accounting only, no backward")


def _fresh(t: torch.Tensor, shape=None, dtype=None) -> torch.Tensor:
    return t.new_empty(t.shape if shape is None else shape, dtype=dtype or t.dtype)


def _adapter_kernel(a: BottleneckAdapter, x, residual):
    """bottleneck_adapter: the op, else its design's saved set: x and z = x W_dᵀ + b_d (x's dtype)."""
    fn = _use("bottleneck_adapter")
    if fn is not None:
        return fn(x, a.down.weight, a.down.bias, a.up.weight, a.up.bias, residual=residual, activation="relu")
    z_shape = (*x.shape[:-1], a.down.weight.shape[0])
    save = lambda i, o: (i[0], _fresh(i[0], z_shape))
    return _KernelModel.apply((x.shape, x.dtype, save), x, residual, a.down.weight, a.down.bias, a.up.weight,
                              a.up.bias)


def _ia3_kernel_forward(layer, x, *args, **kwargs):
    """ia3_linear: the op, else its design's saved set (x only: dl from a recomputed product)."""
    base = layer.get_base_layer()
    (name,) = [a for a in layer.active_adapters if a in layer.ia3_l]
    fn = _use("ia3_linear")
    if fn is not None:
        return fn(x, _out_in(base), base.bias, layer.ia3_l[name].flatten(), feedforward=bool(layer.is_feedforward))
    shape = (*x.shape[:-1], base.out_features)
    return _KernelModel.apply((shape, x.dtype, lambda i, o: (i[0],)), x, layer.ia3_l[name])


def _lora_kernel_forward(layer, x, *args, **kwargs):
    """lora_linear: the real peftkern op (its fake kernel on meta)."""
    lora_linear = _use("lora_linear")
    name = layer.active_adapters[0]
    drop = layer.lora_dropout[name]
    p = drop.p if isinstance(drop, nn.Dropout) and layer.training else 0.0
    base = layer.get_base_layer()
    return lora_linear(x, _out_in(base), base.bias, layer.lora_A[name].weight, layer.lora_B[name].weight,
                       float(layer.scaling[name]), p)


def _out_in(base: nn.Module) -> torch.Tensor:
    """The base layer's weight as (out, in): GPT-2's Conv1D stores (in, out)."""
    from transformers.pytorch_utils import Conv1D

    return base.weight.t() if isinstance(base, Conv1D) else base.weight


def _dropout_model(mod, x):
    """CUDA native_dropout: a fresh output and a bool mask kept for backward."""
    if not mod.training or mod.p == 0.0:
        return x
    return _KernelModel.apply((x.shape, x.dtype, lambda i, o: (_fresh(i[0], dtype=torch.bool),)), x)


def _attention_model(q, k, v, mask, keep_mask=True):
    """Flash / memory-efficient attention: keeps q, k, v, out, fp32 logsumexp (+ the additive mask)."""
    b, h, sq, _ = q.shape
    shape = (b, sq, h, v.shape[-1])  # the kernels write out as (B, S, H, D): the caller's transpose is free

    def save(i, out):
        kept = [i[0], i[1], i[2], out, _fresh(i[0], (b, h, sq), torch.float32)]
        if len(i) > 3 and keep_mask:  # SDPA turns a bool mask into an additive one in q's dtype, per call
            kept.append(_fresh(i[3], dtype=i[0].dtype) if i[3].dtype == torch.bool else i[3])
        return kept

    out = _KernelModel.apply((shape, q.dtype, save), q, k, v, *([mask] if mask is not None else []))
    return out.transpose(1, 2)


def _trace_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                     position_bias=None, **kwargs):
    """transformers attention function used while tracing: the preprocessing of transformers'
    sdpa_attention_forward (GQA, causal crop, T5 position-bias mask), then the kernel model."""
    from transformers.integrations import sdpa_attention as hf

    mode = _mode()
    prefix = mode.prefix_tokens if mode.peftkern else 0
    if prefix and position_bias is not None and key.shape[2] == query.shape[2] + prefix:
        mode.used.add("unserved:prefix_attention takes no additive position bias (T5): peft's path kept")
        prefix = 0
    if mode.target == "cpu" and dropout > 0.0 and not prefix:
        # CPU runs SDPA's math path when there is dropout: run the real decomposition on meta.
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
    keep_mask = True
    if prefix and key.shape[2] == q_len + prefix:
        # prefix_attention: K, V without the prefix, which it reads from its own (batch-shared) tensor.
        s = key.shape[2] - prefix
        k_s = _fresh(key, (*key.shape[:2], s, key.shape[3])).requires_grad_(key.requires_grad)
        v_s = _fresh(value, (*value.shape[:2], s, value.shape[3])).requires_grad_(value.requires_grad)
        fn = _use("prefix_attention")
        if fn is not None:
            pk = _fresh(key, (key.shape[1], prefix, key.shape[3])).requires_grad_(True)
            pv = _fresh(value, (value.shape[1], prefix, value.shape[3])).requires_grad_(True)
            causal = bool(getattr(module, "is_causal", False))
            out = fn(query, k_s, v_s, pk, pv, causal=causal, softmax_scale=scaling)
            return out.transpose(1, 2).contiguous(), None
        key, value, keep_mask = k_s, v_s, False  # causality with a prefix offset is the kernel's own
    out = _attention_model(query, key, value, attention_mask, keep_mask)
    return out.transpose(1, 2).contiguous(), None


_registered = False


def _register_trace_attention():
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register("peftkern_trace", _trace_attention)
        # Masks built as for SDPA (the trace passes no padding mask, so nothing reads mask values on meta).
        AttentionMaskInterface.register("peftkern_trace", sdpa_mask)
        _registered = True


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
def _patched(model: nn.Module, target: str, peftkern: bool) -> Iterator[None]:
    """Per-instance forward overrides for the trace: CUDA dropout, and peftkern's kernels."""
    patched = []

    def patch(mod, fn):
        mod.forward = partial(fn, mod)
        patched.append(mod)

    from peft.tuners.ia3 import Linear as IA3Linear
    from peft.tuners.lora import Linear as LoraLinearLayer

    for mod in model.modules():
        if target == "cuda" and isinstance(mod, nn.Dropout):  # target None: a real run, nothing modelled
            patch(mod, _dropout_model)
        elif peftkern and isinstance(mod, LoraLinearLayer):
            patch(mod, _lora_kernel_forward)
        elif peftkern and isinstance(mod, IA3Linear):
            patch(mod, _ia3_kernel_forward)
        elif isinstance(mod, BottleneckAdapter):
            mod.use_kernel = peftkern
    try:
        yield
    finally:
        for mod in patched:
            del mod.forward
        for mod in model.modules():
            if isinstance(mod, BottleneckAdapter):
                mod.use_kernel = False


def traced_activation_bytes(model: nn.Module, config, batch: int, seq: int, target: str = "cuda",
                            peftkern: bool = False, prefix_tokens: int = 0, used: set | None = None) -> int:
    """Bytes autograd saves for backward in one forward + loss of `model` (on meta), parameters
    and buffers excluded, each storage once. See the module docstring for what `target` and
    `peftkern` change. `used` collects which kernels ran as ops ("op:"), stand-ins ("model:"), or
    could not serve a site ("unserved:")."""
    if target not in ("cuda", "cpu"):
        raise ValueError(f"target must be 'cuda' or 'cpu', got {target!r}")
    skip = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st._cdata not in skip:
            seen[st._cdata] = st.nbytes()
        return t

    inputs = example_inputs(config, batch, seq, device="meta")
    model.train()
    mode = _Trace(target, peftkern, prefix_tokens)
    token = _MODE.set(mode)
    try:
        with _patched(model, target, peftkern), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss = training_loss(model, config, inputs)
            del loss
    finally:
        _MODE.reset(token)
    if used is not None:
        used |= mode.used
    return sum(seen.values())


# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------


def _dtype(name) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    dt = getattr(torch, str(name), None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dt


def max_tokens(config) -> int | None:
    """Longest input a model with learned absolute positions takes (RoBERTa offsets by pad+1)."""
    if model_kind(config) != "encoder" or not hasattr(config, "max_position_embeddings"):
        return None
    off = (config.pad_token_id or 0) + 1 if config.model_type in ("roberta", "xlm-roberta") else 0
    return config.max_position_embeddings - off


def kernel_available(kernel: str | None) -> bool:
    return kernel is None or kernel_fn(kernel) is not None


def memory_parts(model: nn.Module, target: str) -> dict:
    trainable = [p for p in model.parameters() if p.requires_grad]
    tbytes = sum(p.numel() * p.element_size() for p in trainable)
    return {
        "weights": sum(p.numel() * p.element_size() for p in model.parameters()),
        "grads": tbytes,
        "optimizer": 2 * tbytes + (4 * len(trainable) if target == "cpu" else 0),
    }


def method_row(config, method: str, batch: int, seq: int, dtype, settings: Settings | None = None,
               target: str = "cuda", base_params: int | None = None, memory: bool = True) -> dict:
    """One report row: counts, memory estimate (peft/eager and peftkern) and the serving kernel."""
    settings = settings or Settings()
    dtype = _dtype(dtype)
    meth = _BY_KEY[method]
    row = {"method": method, "name": meth.name, "kernel": meth.kernel or "none needed",
           "kernel_available": kernel_available(meth.kernel)}
    if base_params is None:
        base_params = _n_params(build_model(config, dtype).parameters())
    try:
        model, setting = apply_method(build_model(config, dtype), config, method, settings)
    except Exception as e:  # a method the architecture cannot take is a row saying why
        return row | {"setting": "", "note": f"n/a: {type(e).__name__}: {e}"[:200]}
    row["setting"] = setting
    row["trainable"] = trainable_parameters(model)
    row["percent"] = 100.0 * row["trainable"] / base_params
    if not memory:
        return row
    mem = memory_parts(model, target)
    extra = settings.num_virtual_tokens if method == "prompt" else 0
    limit = max_tokens(config)
    if row["trainable"] == 0:
        row["note"] = "nothing to train"
        mem["activations"] = mem["activations_peftkern"] = 0
    elif limit is not None and seq + extra > limit:
        row["note"] = f"n/a: {seq}+{extra} tokens > {limit} positions"
        row["memory"] = mem
        return row
    else:
        prefix = settings.num_virtual_tokens if method == "prefix" else 0
        mem["activations"] = traced_activation_bytes(model, config, batch, seq, target, False, prefix)
        used: set = set()
        mem["activations_peftkern"] = (traced_activation_bytes(model, config, batch, seq, target, True, prefix, used)
                                       if meth.kernel else mem["activations"])
        if meth.kernel:
            row["accounting"] = "op" if f"op:{meth.kernel}" in used and f"model:{meth.kernel}" not in used else (
                "model" if f"model:{meth.kernel}" in used else "none")
            why = sorted(u.split(":", 1)[1] for u in used if u.startswith("unserved:"))
            if why or row["accounting"] == "none":
                row["note"] = "; ".join(why) or f"{meth.kernel} serves no site of this model"
    fixed = mem["weights"] + mem["grads"] + mem["optimizer"]
    mem["total"] = fixed + mem["activations"]
    mem["total_peftkern"] = fixed + mem["activations_peftkern"]
    row["memory"] = mem
    return row


def config_summary(config) -> dict:
    return {"model_type": config.model_type, "kind": model_kind(config), "blocks": n_blocks(config),
            "hidden": config.hidden_size, "heads": config.num_attention_heads, "vocab": config.vocab_size}


def _safe_row(config, method, *args) -> dict:
    """method_row, or a row saying why it failed: one method must not take the whole report down."""
    try:
        return method_row(config, method, *args)
    except Exception as e:  # reported in the row, not hidden
        meth = _BY_KEY[method]
        return {"method": method, "name": meth.name, "kernel": meth.kernel or "none needed",
                "kernel_available": kernel_available(meth.kernel), "setting": "",
                "note": f"n/a: failed: {type(e).__name__}: {e}"[:200]}


def report(model: str, batch: int = 8, seq: int = 256, dtype="bfloat16", target: str = "cuda",
           methods=METHOD_KEYS, settings: Settings | None = None, memory: bool = True) -> dict:
    """The whole report for `model` (preset or config JSON path) as a dict."""
    config = load_config(model)
    settings = settings or Settings()
    dt = _dtype(dtype)
    base_params = _n_params(build_model(config, dt).parameters())
    rows = [_safe_row(config, m, batch, seq, dt, settings, target, base_params, memory) for m in methods]
    return {"model": model, "config": config_summary(config), "base_params": base_params, "batch": batch,
            "seq": seq, "dtype": str(dt).split(".")[-1], "target": target, "settings": dataclasses.asdict(settings),
            "rows": rows}


# ----------------------------------------------------------------------------------------------
# --measure: a real training step on a scaled-down model
# ----------------------------------------------------------------------------------------------


def scaled_down(config, layers: int = 2, hidden: int = 128, heads: int = 4, ffn: int = 512, vocab: int = 1024):
    """The same architecture, small: `layers` blocks (each stack), hidden `hidden`, `heads` heads."""
    from transformers import AutoConfig

    d = config.to_dict()
    mt = d.pop("model_type")
    if getattr(config, "is_encoder_decoder", False) and mt in ("t5", "mt5"):
        d.update(d_model=hidden, d_kv=hidden // heads, d_ff=ffn, num_heads=heads, num_layers=layers,
                 num_decoder_layers=layers)
    else:
        kv = max(1, heads * (getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
                 // config.num_attention_heads)
        d.update(hidden_size=hidden, num_attention_heads=heads, intermediate_size=ffn, num_hidden_layers=layers)
        if "num_key_value_heads" in d:
            d["num_key_value_heads"] = kv
        if "head_dim" in d:
            d["head_dim"] = hidden // heads
    d["vocab_size"] = vocab
    for k in ("architectures", "transformers_version", "_name_or_path", "dtype", "torch_dtype"):
        d.pop(k, None)
    return AutoConfig.for_model(mt, **d)


def _storage_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        if t is not None and torch.is_tensor(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def measurable_with_kernel(method: str, config=None) -> bool:
    """Whether --measure can run `method` through a real peftkern op. Prefix-tuning runs through
    `peftkern.accelerate` (causal LMs: its no-concat forward); the trace covers the other kinds on meta."""
    kernel = _BY_KEY[method].kernel
    if method == "prefix" and (config is None or model_kind(config) != "causal"):
        return False
    return kernel is not None and kernel_fn(kernel) is not None


def measure_step(config, method: str, batch: int, seq: int, dtype, device, settings: Settings,
                 peftkern: bool = False) -> dict:
    """Measured bytes of one AdamW training step of `config` (a small one) on `device`."""
    from ._memory import saved_bytes

    device = torch.device(device)
    dtype = _dtype(dtype)
    torch.manual_seed(0)
    model, _ = apply_method(build_model(config, dtype, device=device, attn="sdpa"), config, method, settings)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    inputs = example_inputs(config, batch, seq, device=device)
    ctx = _patched(model, None, True) if peftkern else contextlib.nullcontext()
    if peftkern and method == "prefix":
        from .integrations.prefix import accelerate

        accelerate(model)
    res = {}
    with ctx, warnings.catch_warnings():
        warnings.simplefilter("ignore")

        def step():
            loss = training_loss(model, config, inputs)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=False)

        if device.type == "cuda":
            step()  # warm-up: optimizer state and grads exist from here on
            torch.cuda.synchronize(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            loss = training_loss(model, config, inputs)
            torch.cuda.synchronize(device)
            res["activations"] = torch.cuda.memory_allocated(device) - before
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=False)
            del loss
            torch.cuda.synchronize(device)
            res["total"] = torch.cuda.max_memory_allocated(device)
            res["how"] = "CUDA max_memory_allocated over a step; activations = memory_allocated growth over forward"
        else:
            exclude = [*model.parameters(), *model.buffers()]
            res["activations"] = saved_bytes(lambda: training_loss(model, config, inputs), exclude)
            step()
            res["weights"] = _storage_bytes(model.parameters())
            res["grads"] = _storage_bytes(p.grad for p in params)
            res["optimizer"] = _storage_bytes(v for s in opt.state.values() for v in s.values())
            res["total"] = res["weights"] + res["grads"] + res["optimizer"] + res["activations"]
            res["how"] = "CPU: peftkern._memory.saved_bytes of the forward + param/grad/optimizer bytes"
    return res


def measure(model: str, batch: int = 8, seq: int = 256, dtype="bfloat16", device=None,
            methods=METHOD_KEYS, settings: Settings | None = None) -> dict:
    """Estimate vs measured on a scaled-down model of `model` on `device` (default: cuda if available)."""
    settings = settings or Settings()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    small = scaled_down(load_config(model))
    rows = []
    for m in methods:
        est = method_row(small, m, batch, seq, dtype, settings, target=device.type)
        if "memory" not in est or est.get("note", "").startswith("n/a") or est["trainable"] == 0:
            rows.append({"method": m, "note": est.get("note", "n/a")})
            continue
        row = {"method": m, "estimate": est["memory"], "measured": measure_step(small, m, batch, seq, dtype,
                                                                                device, settings)}
        if measurable_with_kernel(m, small):
            try:
                row["measured_peftkern"] = measure_step(small, m, batch, seq, dtype, device, settings, peftkern=True)
            except Exception as e:  # a kernel failing here is reported, not hidden
                row["measured_peftkern"] = {"error": f"{type(e).__name__}: {e}"[:200]}
        rows.append(row)
    return {"model": model, "scaled_down": config_summary(small), "device": str(device), "batch": batch, "seq": seq,
            "dtype": str(_dtype(dtype)).split(".")[-1], "rows": rows}


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------


def fmt_bytes(n) -> str:
    if n is None:
        return "-"
    if n == 0:
        return "0"
    if abs(n) >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    if abs(n) >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**10:.1f} KiB"


def _pct(p) -> str:
    return "-" if p is None else (f"{p:.3g}%" if p < 100 else f"{p:.0f}%")


_COLS = ("method", "setting", "trainable", "% model", "kernel", "weights", "grads", "AdamW", "activations",
         "act. peftkern", "total", "total peftkern", "saved")


def _cells(row: dict) -> list[str]:
    kernel = row["kernel"] + ("*" if row.get("accounting") == "model" or not row["kernel_available"] else "")
    mem = row.get("memory") or {}
    act_k = mem.get("activations_peftkern")
    saved = None if act_k is None else mem["activations"] - act_k
    note = row.get("note", "")
    cells = [row["name"], row.get("setting", ""), f"{row['trainable']:,}" if "trainable" in row else "-",
             _pct(row.get("percent")), kernel, fmt_bytes(mem.get("weights")), fmt_bytes(mem.get("grads")),
             fmt_bytes(mem.get("optimizer"))]
    if "activations" in mem:
        cells += [fmt_bytes(mem["activations"]), fmt_bytes(act_k), fmt_bytes(mem["total"]),
                  fmt_bytes(mem["total_peftkern"]),
                  "-" if not saved else f"{fmt_bytes(saved)} ({100 * saved / mem['total']:.1f}%)"]
    else:
        cells += [note or "-", "-", "-", "-", "-"]
    return cells


def _header(rep: dict) -> list[str]:
    c = rep["config"]
    return [f"peftkern report: {rep['model']} ({c['model_type']}, {c['blocks']} blocks, hidden {c['hidden']}, "
            f"{rep['base_params']:,} parameters), batch {rep['batch']} x seq {rep['seq']}, {rep['dtype']}, "
            f"AdamW, kernels modelled for {rep['target']}"]


def _footer(rep: dict) -> list[str]:
    lines = []
    if any(r.get("accounting") == "model" or not r["kernel_available"] for r in rep["rows"]):
        lines.append("* op not in this build: its saved-for-backward set is modelled from DESIGN.md")
    for r in rep["rows"]:
        if r.get("note"):
            lines.append(f"{r['name']}: {r['note']}")
    lines.append("activations: bytes saved for backward (traced on meta); total = weights + grads + AdamW + "
                 "activations; saved = activations peft/eager - peftkern (% of total)")
    return lines


def format_table(rep: dict) -> str:
    rows = [list(_COLS)] + [_cells(r) for r in rep["rows"]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(_COLS))]
    right = {2, 3, 5, 6, 7, 8, 9, 10, 11}
    fmt = lambda r: "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([*_header(rep), fmt(rows[0]), "  ".join("-" * w for w in widths),
                      *(fmt(r) for r in rows[1:]), *_footer(rep)])


def format_markdown(rep: dict) -> str:
    lines = [f"**{_header(rep)[0]}**", "", "| " + " | ".join(_COLS) + " |",
             "|" + "|".join("---:" if i in (2, 3, 5, 6, 7, 8, 9, 10, 11) else "---" for i in range(len(_COLS))) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in _cells(r)) + " |" for r in rep["rows"]]
    return "\n".join(lines + [""] + [f"- {x}" for x in _footer(rep)])


def format_measure(meas: dict, markdown: bool = False) -> str:
    c = meas["scaled_down"]
    head = (f"--measure: {c['model_type']} scaled down to {c['blocks']} blocks, hidden {c['hidden']}, "
            f"on {meas['device']}, batch {meas['batch']} x seq {meas['seq']}, {meas['dtype']}")
    cols = ["method", "act. estimate", "act. measured", "ratio", "total estimate", "total measured", "ratio"]
    rows = []
    ratio = lambda a, b: f"{b / a:.3f}" if a else "-"
    for r in meas["rows"]:
        name = _BY_KEY[r["method"]].name
        if "estimate" not in r:
            rows.append([name, r.get("note", "n/a")] + ["-"] * 5)
            continue
        e, m = r["estimate"], r["measured"]
        rows.append([name, fmt_bytes(e["activations"]), fmt_bytes(m["activations"]),
                     ratio(e["activations"], m["activations"]), fmt_bytes(e["total"]), fmt_bytes(m["total"]),
                     ratio(e["total"], m["total"])])
        if "measured_peftkern" in r and "error" in r["measured_peftkern"]:
            rows.append([name + " (peftkern)", "ERROR: " + r["measured_peftkern"]["error"]] + ["-"] * 5)
        elif "measured_peftkern" in r:
            mk = r["measured_peftkern"]
            rows.append([name + " (peftkern)", fmt_bytes(e["activations_peftkern"]), fmt_bytes(mk["activations"]),
                         ratio(e["activations_peftkern"], mk["activations"]), fmt_bytes(e["total_peftkern"]),
                         fmt_bytes(mk["total"]), ratio(e["total_peftkern"], mk["total"])])
    how = next((r["measured"]["how"] for r in meas["rows"] if "measured" in r), "")
    if markdown:
        out = [f"**{head}**", "", "| " + " | ".join(cols) + " |", "|---|" + "---:|" * (len(cols) - 1)]
        out += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(out + ["", f"- measured: {how}; ratio = measured / estimate"])
    table = [cols] + rows
    widths = [max(len(r[i]) for r in table) for i in range(len(cols))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([head, fmt(cols), "  ".join("-" * w for w in widths), *(fmt(r) for r in rows),
                      f"measured: {how}; ratio = measured / estimate"])


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def _run(args) -> int:
    settings = Settings(lora_dropout=args.lora_dropout)
    methods = tuple(args.methods) if args.methods else METHOD_KEYS
    bad = [m for m in methods if m not in METHOD_KEYS]
    if bad:
        print(f"unknown method(s) {bad}: choose from {', '.join(METHOD_KEYS)}", file=sys.stderr)
        return 2
    try:
        rep = report(args.model, args.batch, args.seq, args.dtype, args.target, methods, settings)
    except ValueError as e:
        print(f"peftkern report: {e}", file=sys.stderr)
        return 2
    print(format_markdown(rep) if args.markdown else format_table(rep), flush=True)
    if args.measure:
        meas = measure(args.model, args.measure_batch or args.batch, args.measure_seq or args.seq, args.dtype,
                       args.device, methods, settings)
        rep["measure"] = meas
        print()
        print(format_measure(meas, markdown=args.markdown))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rep, f, indent=1)
        print(f"wrote {args.json}")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `peftkern report` on the CLI's subparsers."""
    p = subparsers.add_parser("report", help="trainable parameters, training memory and serving kernel per PEFT method",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True,
                   help=f"a preset ({', '.join(PRESETS)}) or a transformers config JSON path (built on meta)")
    p.add_argument("--batch", type=_cli_args.positive_int, default=8, help="sequences per step (default 8)")
    p.add_argument("--seq", type=_cli_args.positive_int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="bfloat16",
                   help="base model / activation dtype (default bfloat16)")
    p.add_argument("--target", choices=["cuda", "cpu"], default="cuda",
                   help="device whose dropout/attention kernels the activation estimate models (default cuda)")
    p.add_argument("--methods", nargs="+", metavar="METHOD", help=f"subset of: {', '.join(METHOD_KEYS)}")
    p.add_argument("--lora-dropout", type=float, default=Settings.lora_dropout, help="LoRA dropout (default 0.1)")
    p.add_argument("--measure", action="store_true",
                   help="also run a real training step on a scaled-down model and print estimate vs measured")
    p.add_argument("--device", type=_cli_args.device, help="device for --measure (default cuda if available)")
    p.add_argument("--measure-batch", type=_cli_args.positive_int, help="batch for --measure (default --batch)")
    p.add_argument("--measure-seq", type=_cli_args.positive_int, help="seq for --measure (default --seq)")
    p.add_argument("--json", metavar="PATH", type=_cli_args.output_path, help="also write the report as JSON")
    p.add_argument("--markdown", action="store_true", help="print markdown tables instead of text")
    p.set_defaults(fn=_run)
    return p


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="peftkern")
    add_parser(ap.add_subparsers(dest="cmd", required=True))
    args = ap.parse_args(["report", *(sys.argv[1:] if argv is None else argv)])
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())

