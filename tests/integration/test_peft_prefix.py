"""peft PrefixTuning on a tiny Llama (GQA) through peftkern.integrations.prefix: loss, prefix gradients
and greedy generation equal peft's own SDPA run."""

from __future__ import annotations

import copy

import pytest
import torch
from _util import DEVICE, assert_close_rule

import peftkern
import peftkern.integrations.prefix as integ

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _models():
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   attn_implementation="sdpa")
    base = transformers.LlamaForCausalLM(cfg).to(DEVICE).float()
    pcfg = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5)
    ref = peft.get_peft_model(base, pcfg)
    ours = integ.accelerate(copy.deepcopy(ref))
    return ref, ours


def _step(model, ids, mask):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return out.loss.detach(), out.logits.detach(), grads


@pytest.fixture
def op_calls(monkeypatch):
    """Shapes of the keys each call of the fused op gets (proves the attention ran through it)."""
    calls = []
    real = integ.prefix_attention

    def counting(q, k, v, pk, pv, **kw):
        calls.append((tuple(k.shape), tuple(pk.shape)))
        return real(q, k, v, pk, pv, **kw)

    monkeypatch.setattr(integ, "prefix_attention", counting)
    return calls


@pytest.mark.parametrize("padded", [False, True])
def test_prefix_tuning_llama_matches_peft(padded, op_calls):
    ref, ours = _models()
    ids = torch.randint(0, 97, (2, 9), device=DEVICE)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :3] = 0  # left padding of the second row
    with peftkern.use_backend("triton"):
        loss, logits, grads = _step(ours, ids, mask)
    assert op_calls == [((2, 2, 9, 16), (2, 2, 5, 16))] * 2  # each layer: S=9 keys, P=5 prefix, GQA 4/2
    loss_r, logits_r, grads_r = _step(ref, ids, mask)
    keep = mask.bool()
    torch.testing.assert_close(logits[keep], logits_r[keep], atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(loss, loss_r, atol=2e-5, rtol=2e-5)
    assert grads.keys() == grads_r.keys() and grads
    for name, g in grads.items():
        assert_close_rule(name, g, grads_r[name].double(), grads_r[name], tiny=1e-4)


def test_generate_uses_the_prefix_or_refuses():
    """Greedy generate equals greedy decoding by full forwards (which always see the prefix), or, where
    this transformers/peft pair drops the prefix cache in generate(), the accelerated model refuses."""
    ref, ours = _models()
    ids = torch.randint(0, 97, (2, 6), device=DEVICE)
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = ids
        for _ in range(3):
            logits = ref(input_ids=want, attention_mask=torch.ones_like(want)).logits[:, -1]
            want = torch.cat([want, logits.argmax(-1, keepdim=True)], 1)
        peft_gen = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
        with peftkern.use_backend("triton"):
            try:
                got = ours.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
            except RuntimeError as e:
                assert "without peft's prefix" in str(e)
                assert not torch.equal(peft_gen, want), "peft's generate keeps the prefix: it must not refuse"
                return
    assert torch.equal(got, want)


def test_rejects_other_peft_types():
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2)
    model = peft.get_peft_model(transformers.LlamaForCausalLM(cfg),
                                peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    with pytest.raises(ValueError, match="prefix-tuning"):
        integ.accelerate(model)
