"""The prefix integration takes the KV cache under both of transformers' names: `past_key_values` (up
to ~5.2x, what peft 0.21 passes) and `cache` (5.24 on; `past_key_values` warns there and goes in 5.40).
Whatever name a caller or peft uses, the base model gets the cache under the name its forward takes, so
no deprecation warning, and a cache without peft's prefix is refused under either name."""

from __future__ import annotations

import copy
import inspect
import warnings

import pytest
import torch
from _util import DEVICE

import peftkern
import peftkern.integrations.prefix as integ

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

V, B, L, P = 97, 2, 7, 4


def _models():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    base = transformers.LlamaForCausalLM(cfg).to(DEVICE).float()
    base.set_attn_implementation("sdpa")
    ref = peft.get_peft_model(base, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    with torch.no_grad():
        for p in ref.prompt_encoder.parameters():
            p.normal_(0, 0.5)
    ours = copy.deepcopy(ref)
    assert peftkern.accelerate(ours).prefix_layers == 2
    return ref.eval(), ours.eval()


@pytest.fixture
def op_calls(monkeypatch):
    calls = []
    real = integ.prefix_attention

    def counting(q, k, v, pk, pv, **kw):
        calls.append(tuple(pk.shape))
        return real(q, k, v, pk, pv, **kw)

    monkeypatch.setattr(integ, "prefix_attention", counting)
    return calls


def _ids(n=L, seed=1):
    return torch.randint(1, V, (B, n), generator=torch.Generator().manual_seed(seed)).to(DEVICE)


@pytest.fixture
def no_cache_name_warnings():
    """Any warning that names `past_key_values` or `cache` as deprecated fails the test."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    bad = [str(w.message) for w in caught if "past_key_values" in str(w.message)]
    assert not bad, bad


def test_cache_kwarg_follows_the_installed_transformers():
    params = inspect.signature(transformers.LlamaForCausalLM.forward).parameters
    name = integ.cache_kwarg(transformers.LlamaForCausalLM)
    assert name in params and name in integ.CACHE_NAMES
    assert name == ("cache" if "cache" in params else "past_key_values")
    assert integ.cache_kwarg(torch.nn.Linear) == "past_key_values"  # no `cache` parameter: the old name


def test_cache_forward_warns_nothing_and_matches_peft(op_calls, no_cache_name_warnings):
    ref, ours = _models()
    ids = _ids()
    mask = torch.ones_like(ids)
    with torch.no_grad():
        got = ours(input_ids=ids, attention_mask=mask, use_cache=True)
        with warnings.catch_warnings():  # peft's own path may warn: that is not ours to judge here
            warnings.simplefilter("ignore")
            want = ref(input_ids=ids, attention_mask=mask, use_cache=True)
    assert op_calls == [(B, 2, P, 16)] * 2
    torch.testing.assert_close(got.logits, want.logits, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_a_cache_passed_under_either_name(name, op_calls, no_cache_name_warnings):
    """A cache handed to the PeftModel under either name is treated as peft treats `past_key_values`
    (its forward replaces it with the prefix cache): the same logits for both names, equal to peft's."""
    ref, ours = _models()
    ids = _ids()
    mask = torch.ones_like(ids)
    with torch.no_grad():
        first = ours(input_ids=ids, attention_mask=mask, use_cache=True)
        cache = first.cache if hasattr(first, "cache") else first.past_key_values
        step = _ids(2, seed=2)
        got = ours(input_ids=step, attention_mask=torch.ones(B, 2, dtype=torch.long, device=DEVICE),
                   **{name: cache})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want = ref(input_ids=step, attention_mask=torch.ones(B, 2, dtype=torch.long, device=DEVICE),
                       past_key_values=copy.deepcopy(cache))
    assert len(op_calls) == 4
    torch.testing.assert_close(got.logits, want.logits, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_base_model_takes_the_prefix_cache_under_either_name(name, op_calls, no_cache_name_warnings):
    """The base model called directly with peft's prefix cache under either name runs the kernel with the
    prefix (the hook renames it to what this transformers takes: under the wrong name transformers would
    drop it and the kernel would read real tokens as the prefix); a cache without it is refused."""
    _, ours = _models()
    ids = _ids()
    mask = torch.ones(B, P + L, dtype=torch.long, device=DEVICE)
    base = ours.get_base_model()
    pos = torch.arange(P, P + L, device=DEVICE).unsqueeze(0)
    with torch.no_grad():
        logits = {}
        for n in integ.CACHE_NAMES:
            cache = ours.get_prompt(B)
            logits[n] = base(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                             **{n: cache}).logits
            assert cache.get_seq_length() == P + L, f"the prefix cache passed as {n} was not the one used"
        assert op_calls == [(B, 2, P, 16)] * 4
        torch.testing.assert_close(logits["cache"], logits["past_key_values"], atol=0, rtol=0)
        with pytest.raises(RuntimeError, match="without peft's prefix"):
            base(input_ids=ids, use_cache=True, **{name: transformers.DynamicCache()})


def test_generate_keeps_the_prefix():
    """generate() on transformers 5.24 passes its own fresh `cache` beside the prefix cache peft adds as
    `past_key_values` (transformers takes the fresh one: peft's own generate loses the prefix there). The
    accelerated model hands the prefix cache on, so its greedy generate equals greedy decoding by full
    forwards (which always see the prefix), on every transformers version."""
    ref, ours = _models()
    ids = _ids(6)
    with torch.no_grad():
        want = ids
        for _ in range(3):
            logits = ref(input_ids=want, attention_mask=torch.ones_like(want)).logits[:, -1]
            want = torch.cat([want, logits.argmax(-1, keepdim=True)], 1)
        got = ours.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                            pad_token_id=0)
    assert torch.equal(got, want)
