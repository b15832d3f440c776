"""A sliding window shorter than the prefix + sequence keys: the fused kernels have no sliding window, so the
attention falls back to peft's math with the reason (logged once; raised under PEFTKERN_STRICT=1), rather than
raise at the first long input: training equals peft's step, and greedy generate equals greedy decoding by full
forwards (where the window drops the prefix for far queries, as peft's cache does)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from _util import DEVICE, assert_close_rule
from test_prefix_families import ids_and_mask, reference_greedy

import peftkern
from peftkern.integrations import checks
from peftkern.integrations import prefix as integ

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

V, P, WINDOW = 97, 5, 8  # P + 9 sequence keys > 8


def _models():
    torch.manual_seed(0)
    cfg = transformers.MistralConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=1, sliding_window=WINDOW,
                                     pad_token_id=0, bos_token_id=1, eos_token_id=None)
    base = transformers.MistralForCausalLM(cfg).to(DEVICE)
    base.set_attn_implementation("eager")
    ref = peft.get_peft_model(base, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    with torch.no_grad():
        for p in ref.prompt_encoder.parameters():
            p.normal_(0, 0.5)
    ref64, ours = copy.deepcopy(ref).double(), copy.deepcopy(ref)
    assert peftkern.accelerate(ours).prefix_layers == 2
    return ref, ref64, ours


def _step(model, ids, mask):
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture
def fallback(monkeypatch):
    monkeypatch.setenv("PEFTKERN_STRICT", "0")
    monkeypatch.setattr(checks, "_logged", set())


def test_strict_mode_raises_with_the_reason():
    _, _, ours = _models()
    ids, mask = ids_and_mask()
    with pytest.raises(peftkern.BackendUnavailable, match="sliding window"):
        ours(input_ids=ids, attention_mask=mask)


def test_training_equals_peft(fallback, caplog):
    ref, ref64, ours = _models()
    ids, mask = ids_and_mask()  # left-padded
    with caplog.at_level(logging.WARNING, logger="peftkern"):
        logits, grads = _step(ours, ids, mask)
    assert sum("sliding window (8)" in r.getMessage() for r in caplog.records) == 1  # once, not per layer
    logits_r, grads_r = _step(ref, ids, mask)
    logits64, grads64 = _step(ref64, ids, mask)
    keep = mask.bool()
    assert_close_rule("logits", logits[keep], logits64[keep], logits_r[keep])
    for name, g in grads.items():
        assert_close_rule(name, g, grads64[name], grads_r[name])


def test_short_inputs_stay_fused(fallback, monkeypatch):
    calls = []
    real = integ.prefix_attention
    monkeypatch.setattr(integ, "prefix_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    _, _, ours = _models()
    ids, mask = ids_and_mask(WINDOW - P, padded=False)
    _step(ours, ids, mask)
    assert len(calls) == 2


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_generate_past_the_window(use_cache, fallback):
    ref, _, ours = _models()
    ref.eval()
    ours.eval()
    ids, mask = ids_and_mask(4, padded=True, seed=2)  # P + 4 fit; the 5 new tokens run past the window
    want = reference_greedy(ref, ids, mask, 5)
    with torch.no_grad():
        got = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0,
                            use_cache=use_cache)
    assert torch.equal(got, want)
