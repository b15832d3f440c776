"""Attention dropout and prefix tuning: the fused prefix kernels have no attention dropout, so
`peftkern.accelerate` leaves a model whose attention dropout is > 0 on peft's path and says why (never
"fused" and then refused at the first training forward). Dropout set on the modules after accelerate
makes the attention fall back to peft's math (SDPA over the concatenated prefix, dropout included) with
the reason: logged once, raised under PEFTKERN_STRICT=1."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from _util import DEVICE

import peftkern
from peftkern import _backend
from peftkern.integrations import checks
from peftkern.integrations import prefix as integ

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

V, B, L, P = 97, 2, 9, 5


def _gpt2(attn_pdrop):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                  attn_pdrop=attn_pdrop, resid_pdrop=0.0, embd_pdrop=0.0)
    base = transformers.GPT2LMHeadModel(cfg).to(DEVICE)
    base.set_attn_implementation("sdpa")
    model = peft.get_peft_model(base, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    with torch.no_grad():
        for p in model.prompt_encoder.parameters():
            p.normal_(0, 0.5)
    return model


def _ids():
    return torch.randint(1, V, (B, L), generator=torch.Generator().manual_seed(1)).to(DEVICE)


def _train_step(model, ids, seed=3, mask=None, **kw):
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    mask = torch.ones_like(ids) if mask is None else mask
    out = model(input_ids=ids, attention_mask=mask, labels=ids, **kw)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture
def op_calls(monkeypatch):
    calls = []
    real = integ.prefix_attention

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(integ, "prefix_attention", counting)
    return calls


def test_dropout_model_stays_on_peft_with_the_reason(op_calls):
    """GPT-2's default attn_pdrop = 0.1: not fused, the summary says why, and `.train()` steps run peft's
    own forward (the same loss and prefix gradient as an untouched peft model, same dropout draws)."""
    ref = _gpt2(0.1)
    model = copy.deepcopy(ref)
    summary = peftkern.accelerate(model)
    assert summary.prefix_layers == 0
    assert any("attention dropout 0.1" in r for r in summary.reasons), summary
    assert "attention dropout 0.1" in str(summary)
    assert "peftkern_prefix" not in model.get_base_model().config._attn_implementation
    ids = _ids()
    got, want = _train_step(model, ids), _train_step(ref, ids)
    assert op_calls == []
    torch.testing.assert_close(got[0], want[0], atol=0, rtol=0)
    g = got[1]["prompt_encoder.default.embedding.weight"]
    assert g.abs().sum() > 0
    torch.testing.assert_close(g, want[1]["prompt_encoder.default.embedding.weight"], atol=0, rtol=0)
    with pytest.raises(ValueError, match="attention dropout 0.1"):
        integ.accelerate(model)


def test_no_dropout_is_fused(op_calls):
    model = _gpt2(0.0)
    summary = peftkern.accelerate(model)
    assert summary.prefix_layers == 2 and not summary.reasons, summary
    _train_step(model, _ids())
    assert len(op_calls) == 2


def test_dropout_in_eval_mode_does_not_matter_for_accelerate():
    """The check reads the modules' training-mode dropout: an eval-mode model with dropout is still
    left to peft (its next .train() would need it)."""
    model = _gpt2(0.1).eval()
    assert peftkern.accelerate(model).prefix_layers == 0


def _set_dropout(model, p):
    for mod in model.get_base_model().modules():
        if isinstance(getattr(mod, "attn_dropout", None), torch.nn.Dropout):
            mod.attn_dropout.p = p


def test_dropout_set_after_accelerate_falls_back_with_the_reason(monkeypatch, caplog, op_calls):
    """Dropout set on the modules after accelerate: the training forward takes peft's math (dropout
    included) with the reason, logged once; the result equals peft's step under the same seed; eval
    forwards (dropout 0) stay fused. Under PEFTKERN_STRICT=1 the fallback raises."""
    ref = _gpt2(0.0)
    model = copy.deepcopy(ref)
    assert peftkern.accelerate(model).prefix_layers == 2
    ids = _ids()
    fused_loss = _train_step(model, ids)[0]
    op_calls.clear()
    _set_dropout(model, 0.3)
    _set_dropout(ref, 0.3)
    with pytest.raises(_backend.BackendUnavailable, match="attention dropout 0.3"):
        _train_step(model, ids)  # tests run with PEFTKERN_STRICT=1
    monkeypatch.setenv("PEFTKERN_STRICT", "0")
    monkeypatch.setattr(checks, "_logged", set())
    with caplog.at_level(logging.WARNING, logger="peftkern"):
        got = _train_step(model, ids)
        again = _train_step(model, ids)
    msgs = [r.getMessage() for r in caplog.records if "attention dropout 0.3" in r.getMessage()]
    assert len(msgs) == 1, msgs  # once
    assert op_calls == []
    want = _train_step(ref, ids)
    torch.testing.assert_close(got[0], again[0], atol=0, rtol=0)
    assert not torch.allclose(got[0], fused_loss)  # the dropout did act
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    for name, g in got[1].items():
        torch.testing.assert_close(g, want[1][name], atol=1e-5, rtol=1e-5)
    model.eval()
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    assert len(op_calls) == 2  # eval: dropout 0, fused again


@pytest.mark.parametrize("use_cache", [False, True])
def test_late_dropout_fallback_padded_and_on_the_cache_path(use_cache, monkeypatch, op_calls):
    """The fallback on a left-padded batch, on the no-concat path (prefix shared by the batch) and on peft's
    cache path (the prefix as views of the cache): peft's step under the same seed."""
    monkeypatch.setenv("PEFTKERN_STRICT", "0")
    ref = _gpt2(0.0)
    model = copy.deepcopy(ref)
    assert peftkern.accelerate(model).prefix_layers == 2
    _set_dropout(model, 0.3)
    _set_dropout(ref, 0.3)
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    got = _train_step(model, ids, mask=mask, use_cache=use_cache)
    want = _train_step(ref, ids, mask=mask, use_cache=use_cache)
    assert op_calls == []
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    for name, g in got[1].items():
        torch.testing.assert_close(g, want[1][name], atol=1e-5, rtol=1e-5)
