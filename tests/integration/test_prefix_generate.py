"""generate() on an accelerated prefix-tuning model keeps the prefix: greedy, sampling (fixed seed), beam
search, use_cache on and off, a left-padded batch, each equal to a reference that runs the full forward of
peft's own model (no cache, so the prefix is in every step) and picks tokens by hand. peft's own generate
on this transformers / peft pair is shown to differ from that reference (skipped, with the reason, once a
peft release fixes it). Greedy generate for every fused family is in test_prefix_families.py."""

from __future__ import annotations

import pytest
import torch
from test_prefix_families import (
    build,
    ids_and_mask,
    last_logits,
    reference_greedy,
)

import peftkern

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

N = 4  # new tokens
GEN = dict(max_new_tokens=N, pad_token_id=0)


def _models(family="llama"):
    ref, _, ours = build(family)
    for m in (ref, ours):
        m.eval()
        m.generation_config.eos_token_id = None  # every run makes N tokens: beams compare by score alone
    return ref, ours


def _logprobs(model, ids, mask):
    return torch.log_softmax(last_logits(model, ids, mask).double(), -1)


def reference_sample(model, ids, mask, seed):
    """Multinomial sampling from the full-forward softmax (no top-k / top-p / temperature), seeded as
    generate() is: one torch.multinomial draw per step."""
    torch.manual_seed(seed)
    for _ in range(N):
        nxt = torch.multinomial(torch.softmax(last_logits(model, ids, mask), -1), 1)
        ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    return ids


def reference_beams(model, ids, mask, beams):
    """Beam search by full forwards, per row: keep the `beams` best sums of log-probabilities, return the
    best at the end (no EOS, so no length penalty matters)."""
    out = []
    for b in range(ids.shape[0]):
        seqs, masks, scores = ids[b:b + 1], mask[b:b + 1], torch.zeros(1, dtype=torch.float64)
        for _ in range(N):
            cand = (scores[:, None] + _logprobs(model, seqs, masks)).flatten()
            top = cand.topk(beams).indices
            V = cand.numel() // seqs.shape[0]
            rows, toks = top // V, top % V
            seqs = torch.cat([seqs[rows], toks[:, None]], 1)
            masks = torch.cat([masks[rows], torch.ones_like(toks[:, None])], 1)
            scores = cand[top]
        out.append(seqs[scores.argmax()])
    return torch.stack(out)


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("padded", [False, True])
def test_greedy(use_cache, padded):
    ref, ours = _models()
    ids, mask = ids_and_mask(6, padded=padded, seed=2)
    want = reference_greedy(ref, ids, mask, N)
    with torch.no_grad(), peftkern.use_backend("triton"):
        got = ours.generate(input_ids=ids, attention_mask=mask, do_sample=False, use_cache=use_cache, **GEN)
    assert torch.equal(got, want)


@pytest.mark.parametrize("use_cache", [True, False])
def test_sampling_with_a_fixed_seed(use_cache):
    ref, ours = _models()
    ids, mask = ids_and_mask(6, padded=True, seed=2)
    want = reference_sample(ref, ids, mask, seed=7)
    torch.manual_seed(7)
    with torch.no_grad(), peftkern.use_backend("triton"):
        got = ours.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                            use_cache=use_cache, **GEN)
    assert torch.equal(got, want)


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("padded", [False, True])
def test_beam_search(padded, use_cache):
    ref, ours = _models()
    ids, mask = ids_and_mask(6, padded=padded, seed=3)
    want = reference_beams(ref, ids, mask, beams=3)
    with torch.no_grad(), peftkern.use_backend("triton"):
        got = ours.generate(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=3, use_cache=use_cache,
                            **GEN)
    assert torch.equal(got, want)


@pytest.mark.parametrize("use_cache", [True, False])
def test_peft_own_generate_loses_the_prefix(use_cache):
    """peft's own generate on the installed pair, against the same reference. On transformers 5.24 +
    peft 0.21 it differs: with the cache transformers runs on its own fresh `cache` and drops the
    prefix peft passes as `past_key_values`; without it, it runs on the previous step's cache (the prefix
    and the old sequence again before the whole new sequence). On transformers 5.17 without the cache it
    raises at step 2 (Llama hands the prefix cache back unasked). The accelerated model equals the reference."""
    ref, ours = _models()
    ids, mask = ids_and_mask(6, padded=False, seed=2)
    want = reference_greedy(ref, ids, mask, N)
    with torch.no_grad():
        try:
            theirs = ref.generate(input_ids=ids, attention_mask=mask, do_sample=False, use_cache=use_cache, **GEN)
        except RuntimeError:  # transformers 5.17: Llama hands the prefix cache back unasked; step 2 mismatches
            theirs = None
        ours_out = ours.generate(input_ids=ids, attention_mask=mask, do_sample=False, use_cache=use_cache, **GEN)
    assert torch.equal(ours_out, want)
    if theirs is not None and torch.equal(theirs, want):
        pytest.skip(f"peft {peft.__version__}'s own generate (use_cache={use_cache}) keeps the prefix with "
                    f"transformers {transformers.__version__}: the upstream bug this test shows is fixed")
    assert theirs is None or not torch.equal(theirs, want)
