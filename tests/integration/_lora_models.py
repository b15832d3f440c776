"""Tiny transformers models built from configs (no downloads) with peft LoRA attached, for the integration
tests. Every config sets the model's own dropouts to 0, so train mode is deterministic except LoRA dropout."""

from __future__ import annotations

import torch
from _util import DEVICE

ARCHS = ("llama", "gpt2", "roberta", "t5")
VOCAB = 96


def base_model(arch: str, seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    if arch in ("llama", "llama64"):
        # llama64: rows of 64 for 4-bit bases. bitsandbytes >= 0.49 (de)quantises wrong on the CPU where a 64-block
        # spans two rows (1.5 max error vs the weight where NF4's own is 0.4); peftkern's dequantisation is right there,
        # so on 32-wide rows it would disagree with peft's layer and an oracle built from bitsandbytes' dequantisation.
        width = 64 if arch == "llama64" else 32
        cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        model = tf.LlamaForCausalLM(cfg)
    elif arch == "gpt2":  # attention/MLP are transformers' Conv1D: weight stored (in, out)
        cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0)
        model = tf.GPT2LMHeadModel(cfg)
    elif arch == "roberta":  # linears with bias
        cfg = tf.RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                               max_position_embeddings=80, pad_token_id=1)
        model = tf.RobertaForMaskedLM(cfg)
    elif arch == "t5":  # encoder-decoder, linears without bias
        cfg = tf.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, dropout_rate=0.0,
                          decoder_start_token_id=0, pad_token_id=0)
        model = tf.T5ForConditionalGeneration(cfg)
    else:
        raise ValueError(arch)
    model.config._attn_implementation = "eager"  # one attention path for fp64 and fp32 copies alike
    return model.to(DEVICE)


TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "roberta": ["query", "key", "value", "dense"],
    "t5": ["q", "k", "v", "o", "wi", "wo"],
}


def lora_model(arch: str, seed: int = 0, r: int = 4, lora_dropout: float = 0.0, **kw):
    """A PeftModel whose lora_B is random (peft starts it at zero, which would hide the adapter)."""
    import peft

    model = base_model(arch, seed)
    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=lora_dropout, target_modules=TARGETS[arch],
                          fan_in_fan_out=(arch == "gpt2"), **kw)
    pm = peft.get_peft_model(model, cfg)
    randomize_lora_B(pm, seed)
    return pm


def randomize_lora_B(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_magnitude" in name:
                p.copy_(torch.randn(p.shape, generator=g).to(p.device) * 0.2 + (1.0 if "magnitude" in name else 0.0))


def batch(arch: str, seed: int = 0, b: int = 2, s: int = 10) -> dict:
    g = torch.Generator().manual_seed(seed + 100)
    ids = torch.randint(2, VOCAB, (b, s), generator=g)
    labels = torch.randint(2, VOCAB, (b, s), generator=g)
    if arch == "t5":
        out = {"input_ids": ids, "labels": labels[:, : s // 2 + 1].contiguous()}
    elif arch == "roberta":
        out = {"input_ids": ids, "labels": labels}
    else:
        out = {"input_ids": ids, "labels": ids}
    return {k: v.to(DEVICE) for k, v in out.items()}


def lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]
