"""Prefix tuning on the decoder families peft's decoder tests cover: each either runs fused, with logits
and every trainable gradient equal to peft's (training mode, fp64 oracle, flash-attention's 2x rule, a
left-padded batch) and greedy generate() equal to greedy decoding by full forwards (which always see the
prefix), or is left to peft by `accelerate` with the reason. Tiny configs from transformers' config
classes (hidden 32, 2 layers, eager attention in the references), no downloads. README's prefix-tuning
families table lists the same."""

from __future__ import annotations

import copy

import pytest
import torch
from _util import DEVICE, assert_close_rule

import peftkern
from peftkern.integrations import prefix as integ

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

V, B, L, P = 97, 2, 9, 5
T = transformers


def _common():
    return dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)


FUSED = {  # family -> tiny causal LM
    "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(**_common())),
    "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(**_common())),
    "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**_common())),
    "qwen3": lambda: T.Qwen3ForCausalLM(T.Qwen3Config(**_common(), head_dim=16)),
    "gemma": lambda: T.GemmaForCausalLM(T.GemmaConfig(**_common(), head_dim=16)),
    "gemma2-no-softcap": lambda: T.Gemma2ForCausalLM(T.Gemma2Config(**_common(), head_dim=16,
                                                                    attn_logit_softcapping=None)),
    "phi3": lambda: T.Phi3ForCausalLM(T.Phi3Config(**_common())),
    "gpt_neox": lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(
        vocab_size=V, n_embd=32, n_layer=2, n_head=2, n_positions=64, attn_pdrop=0.0, resid_pdrop=0.0,
        embd_pdrop=0.0, bos_token_id=1, eos_token_id=2)),
    "opt": lambda: T.OPTForCausalLM(T.OPTConfig(  # positions from the attention mask's running count
        vocab_size=V, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2, word_embed_proj_dim=32,
        max_position_embeddings=64, dropout=0.0, attention_dropout=0.0, pad_token_id=0, bos_token_id=1,
        eos_token_id=2)),
}

REFUSED = {  # family -> (tiny causal LM, the reason accelerate gives)
    "gpt2 (attn_pdrop 0.1, its default)": (
        lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=2, n_positions=64)),
        "attention dropout 0.1"),
    "llama (attention_dropout 0.1)": (
        lambda: T.LlamaForCausalLM(T.LlamaConfig(**_common(), attention_dropout=0.1)), "attention dropout 0.1"),
    "opt (attention_dropout 0.1)": (
        lambda: T.OPTForCausalLM(T.OPTConfig(vocab_size=V, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                             num_attention_heads=2, word_embed_proj_dim=32, dropout=0.0,
                                             attention_dropout=0.1)),
        "attention dropout 0.1"),
    "gemma2 (softcapping, its default)": (
        lambda: T.Gemma2ForCausalLM(T.Gemma2Config(**_common(), head_dim=16)), "softcapping 50.0"),
    "falcon": (lambda: T.FalconForCausalLM(T.FalconConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                                          num_attention_heads=2, multi_query=False)),
               "does not use transformers' interface"),
    "bloom": (lambda: T.BloomForCausalLM(T.BloomConfig(vocab_size=V, hidden_size=32, n_layer=2, n_head=2)),
              "does not use transformers' interface"),
}


def build(family: str, **prefix_cfg):
    """(peft fp32, peft fp64 oracle, accelerated fp32) with the same weights, eager attention in peft."""
    torch.manual_seed(0)
    base = FUSED[family]().to(DEVICE).float()
    base.set_attn_implementation("eager")
    ref = peft.get_peft_model(base, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P,
                                                            **prefix_cfg))
    with torch.no_grad():  # peft initialises the prefix small; make it matter
        for p in ref.prompt_encoder.parameters():
            p.normal_(0, 0.5)
    ref64 = copy.deepcopy(ref).double()
    ours = copy.deepcopy(ref)
    summary = peftkern.accelerate(ours)
    assert summary.prefix_layers == 2 and not summary.reasons, summary
    return ref, ref64, ours


def ids_and_mask(n=L, padded=True, seed=1):
    ids = torch.randint(3, V, (B, n), generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :3] = 0
        ids[1, :3] = 0  # the pad token
    return ids, mask


def positions(mask):
    """The position ids generate() gives a left-padded batch: each row's tokens numbered from 0 at its first
    real token (peft offsets them by P). A plain forward numbers every row from its first column instead,
    which matters with a prefix even under RoPE: the prefix keys carry no position, so q . prefix_k depends
    on the query's absolute position."""
    return (mask.long().cumsum(1) - 1).clamp(min=0)


def last_logits(model, ids, mask):
    """The last position's logits of a full forward (no cache, the prefix in it), positions as generate()
    numbers them."""
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False).logits[:, -1]


def reference_greedy(model, ids, mask, steps):
    """Greedy decoding by full forwards (no cache): every step sees the prefix."""
    with torch.no_grad():
        for _ in range(steps):
            logits = last_logits(model, ids, mask)
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return ids


def _step(model, ids, mask):
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture
def op_calls(monkeypatch):
    calls = []
    real = integ.prefix_attention

    def counting(q, k, v, pk, pv, **kw):
        calls.append((tuple(k.shape), tuple(pk.shape)))
        return real(q, k, v, pk, pv, **kw)

    monkeypatch.setattr(integ, "prefix_attention", counting)
    return calls


@pytest.mark.parametrize("family", list(FUSED))
def test_family_trains_like_peft(family, op_calls):
    ref, ref64, ours = build(family)
    ids, mask = ids_and_mask()
    with peftkern.use_backend("triton"):
        logits, grads = _step(ours, ids, mask)
    assert len(op_calls) == 2 and all(len(pk) == 3 for _, pk in op_calls)  # one shared prefix, no expand
    logits_r, grads_r = _step(ref, ids, mask)
    logits64, grads64 = _step(ref64, ids, mask)
    keep = mask.bool()
    assert_close_rule("logits", logits[keep], logits64[keep], logits_r[keep])
    assert grads.keys() == grads_r.keys() and grads
    for name, g in grads.items():
        assert g.abs().sum() > 0, name
        assert_close_rule(name, g, grads64[name], grads_r[name])


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("family", list(FUSED))
def test_family_greedy_generate_keeps_the_prefix(family, padded, use_cache, op_calls):
    ref, _, ours = build(family)
    ours.eval()
    ref.eval()
    ids, mask = ids_and_mask(6, padded=padded, seed=2)
    want = reference_greedy(ref, ids, mask, 4)
    with torch.no_grad(), peftkern.use_backend("triton"):
        got = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                            use_cache=use_cache)
    assert op_calls  # the kernel ran
    assert torch.equal(got, want)


@pytest.mark.parametrize("family", list(REFUSED))
def test_family_left_to_peft_with_the_reason(family, op_calls):
    make, why = REFUSED[family]
    torch.manual_seed(0)
    base = make().to(DEVICE)
    model = peft.get_peft_model(base, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    ref = copy.deepcopy(model)
    summary = peftkern.accelerate(model)
    assert summary.prefix_layers == 0 and any(why in r for r in summary.reasons), summary
    ids, mask = ids_and_mask(padded=False)
    model.train()
    ref.train()
    torch.manual_seed(5)
    got = model(input_ids=ids, attention_mask=mask, labels=ids).loss
    torch.manual_seed(5)
    want = ref(input_ids=ids, attention_mask=mask, labels=ids).loss
    got.backward()
    assert op_calls == []
    torch.testing.assert_close(got, want, atol=0, rtol=0)
