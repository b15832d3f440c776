"""The report's models and methods: presets with published hyperparameters (RoBERTa: Liu et al. 2019; T5:
Raffel et al. 2020; LLaMA: Touvron et al. 2023) as transformers config fields, config JSON loading, the PEFT
methods at their paper defaults, and the scaled-down config `--measure` runs."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

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
    kernel: str | None  # the peftkern op serving it ("a + b": every one of these ops per site), None: "none needed"

    @property
    def ops(self) -> tuple[str, ...]:
        return tuple(self.kernel.split(" + ")) if self.kernel else ()


METHODS = (
    Method("full", "full fine-tuning", None),
    Method("lora", "LoRA", "lora_linear"),
    Method("dora", "DoRA", "dora_linear"),  # LoRA's r and targets, use_dora=True (Liu et al. 2024)
    Method("qlora", "QLoRA", "dequantize_4bit + lora_linear"),  # LoRA's r and targets on NF4 bases (Dettmers 2023)
    Method("houlsby", "Houlsby adapter", "bottleneck_adapter"),
    Method("pfeiffer", "Pfeiffer adapter", "bottleneck_adapter"),
    Method("parallel", "parallel adapter", "bottleneck_adapter"),
    Method("ia3", "IA3", "ia3_linear"),
    Method("prefix", "prefix-tuning", "prefix_attention"),
    Method("prompt", "prompt tuning", None),
    Method("bitfit", "BitFit", None),
)
METHOD_KEYS = tuple(m.key for m in METHODS)
BY_KEY = {m.key: m for m in METHODS}
ADAPTERS = ("houlsby", "pfeiffer", "parallel")  # peftkern.add_adapters placements
_ENCODERS = {"bert", "roberta", "xlm-roberta", "electra", "deberta", "deberta-v2", "distilbert", "albert"}
TASK = {"seq2seq": "SEQ_2_SEQ_LM", "encoder": "FEATURE_EXTRACTION", "causal": "CAUSAL_LM"}


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


def n_blocks(config) -> int:
    """Transformer blocks (encoder + decoder for encoder-decoder models)."""
    if getattr(config, "is_encoder_decoder", False):
        return config.num_layers + (config.num_decoder_layers or config.num_layers)
    return config.num_hidden_layers


def max_tokens(config) -> int | None:
    """Longest input a model with learned absolute positions takes (RoBERTa offsets by pad+1)."""
    if model_kind(config) != "encoder" or not hasattr(config, "max_position_embeddings"):
        return None
    off = (config.pad_token_id or 0) + 1 if config.model_type in ("roberta", "xlm-roberta") else 0
    return config.max_position_embeddings - off


def config_summary(config) -> dict:
    return {"model_type": config.model_type, "kind": model_kind(config), "blocks": n_blocks(config),
            "hidden": config.hidden_size, "heads": getattr(config, "num_attention_heads", None),
            "vocab": config.vocab_size}


def to_dtype(name) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    dt = getattr(torch, str(name), None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dt


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
