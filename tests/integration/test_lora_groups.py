"""Projection groups (integrations/lora_group.py) on real tiny decoders: which groups form, parity with peft in
fp64 with dropout 0 and > 0 (the oracle gets each layer's own kernel mask, so a shared mask would fail),
members leaving, compile, gradient checkpointing, save/reload."""

from __future__ import annotations

import copy

import pytest
import torch
from _lora_models import VOCAB, batch, lora_layers, randomize_lora_B
from _util import DEVICE, assert_close_rule
from test_peft_lora import assert_matches_peft, run
from torch import nn

import peftkern
import peftkern.ops.lora as lora_ops
import peftkern.ops.lora_group as group_ops
from peftkern.integrations.accelerate import accelerate

peft = pytest.importorskip("peft")
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def base_decoder(family: str, seed=0):
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    cfg = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config}[family](**common)
    model = {"llama": tf.LlamaForCausalLM, "mistral": tf.MistralForCausalLM, "qwen2": tf.Qwen2ForCausalLM}[family](cfg)
    model.config._attn_implementation = "eager"
    return model.to(DEVICE)


def decoder(family: str, r=4, lora_dropout=0.0, seed=0, **kw):
    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=lora_dropout, target_modules=ALL, **kw)
    pm = peft.get_peft_model(base_decoder(family, seed), cfg)
    randomize_lora_B(pm, seed)
    return pm


def group_names(model):
    return [tuple(n.rsplit(".", 1)[-1] for n in g) for g in peftkern.projection_groups(model)]


@pytest.fixture
def group_calls(monkeypatch):
    calls = []
    real = group_ops.lora_linear_group_checked

    def counting(x, members):
        calls.append(len(members))
        return real(x, members)

    monkeypatch.setattr(group_ops, "lora_linear_group_checked", counting)
    return calls


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_groups_form_by_what_the_projections_read(family, group_calls):
    """q/k/v and gate/up read one tensor each; o_proj (same in_features as q) and down_proj do not."""
    model = decoder(family).train()
    summary = accelerate(model)
    assert summary.group_candidates == 4 and "4 candidate projection groups" in str(summary)
    inputs = batch("llama")
    with peftkern.use_backend("torch"):
        run(model, inputs)  # the first forward watches
        assert group_names(model) == [("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")] * 2
        assert group_calls == []
        run(model, inputs)
    assert group_calls == [3, 2, 3, 2]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_group_parity_with_peft_without_dropout(backend, group_calls):
    plain = decoder("llama", r=4, rank_pattern={"k_proj": 2, "v_proj": 8}).train()  # ranks differ per member
    oracle = copy.deepcopy(plain).double()
    ours = copy.deepcopy(plain)
    accelerate(ours)
    inputs = batch("llama")
    with peftkern.use_backend(backend):
        run(ours, inputs)
        got = run(ours, inputs)
    assert group_calls == [3, 2, 3, 2]
    assert_matches_peft(got, run(plain, inputs), run(oracle, inputs))


class _FedDropout(nn.Module):
    """Stands in for a peft lora_dropout in the references: multiplies by the next kernel mask of the feed."""

    def __init__(self, feed, p):
        super().__init__()
        self.feed, self.p = feed, p

    def forward(self, x):
        keep = self.feed.pop(0)
        return x * keep.reshape(x.shape).to(x.dtype) / (1.0 - self.p)


def _feed_masks(model, feed, p):
    for layer in lora_layers(model):
        layer.lora_dropout["default"] = _FedDropout(feed, p)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_group_parity_with_peft_with_dropout(backend, monkeypatch, group_calls):
    """Each layer's kernel mask comes from its own seed; the references get exactly those masks, in call order."""
    p = 0.3
    plain = decoder("llama", lora_dropout=p).train()
    ours = copy.deepcopy(plain)
    accelerate(ours)
    inputs = batch("llama")
    with peftkern.use_backend(backend):
        run(ours, inputs)  # groups form
    seeds = []
    real_draw = lora_ops.draw_seed

    def recording(q):
        s = real_draw(q)
        seeds.append(int(s))
        return s

    monkeypatch.setattr(lora_ops, "draw_seed", recording)
    with peftkern.use_backend(backend):
        got = run(ours, inputs, seed=5)
    assert group_calls == [3, 2, 3, 2] and len(seeds) == 14 and len(set(seeds)) == 14
    from test_lora import keep_mask

    m = inputs["input_ids"].numel()
    in_f = [32, 32, 32, 32, 32, 32, 64] * 2  # call order: q k v o gate up down, per block
    masks = [keep_mask(backend, m, n, p, s).float() for n, s in zip(in_f, seeds)]
    refs = []
    for cast in (lambda mdl: mdl, lambda mdl: mdl.double()):
        ref = cast(copy.deepcopy(plain))
        feed = list(masks)
        _feed_masks(ref, feed, p)
        refs.append(run(ref, inputs, seed=5))
        assert feed == []
    assert_matches_peft(got, refs[0], refs[1])


def test_members_leave_when_they_read_another_tensor():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(16, 8), nn.Linear(16, 8), nn.Linear(16, 12)
            self.split = False

        def forward(self, x):
            y = self.a(x) + self.b(x)
            return y.sum() + self.c(x + 1 if self.split else x).sum()

    torch.manual_seed(0)
    pm = peft.get_peft_model(Block(), peft.LoraConfig(r=2, target_modules=["a", "b", "c"]))
    randomize_lora_B(pm, 0)
    accelerate(pm)
    x = torch.randn(5, 16)
    with peftkern.use_backend("torch"):
        want = pm(x)
        assert group_names(pm) == [("a", "b", "c")]
        torch.testing.assert_close(pm(x), want)
        pm.base_model.model.split = True
        want_split = pm.base_model.model.a(x) + pm.base_model.model.b(x)
        got = pm(x)  # c reads x + 1: it takes the per-layer path and leaves
        assert group_names(pm) == [("a", "b")]
        torch.testing.assert_close(got, want_split.sum() + pm.base_model.model.c(x + 1).sum())
        peftkern.restore(pm)
        assert peftkern.projection_groups(pm) == []


def test_disabled_adapters_and_merge_keep_working():
    model = decoder("llama").eval()
    accelerate(model)
    inputs = {"input_ids": batch("llama")["input_ids"]}
    with peftkern.use_backend("torch"), torch.no_grad():
        model(**inputs)
        want = model(**inputs).logits
        with model.disable_adapter():
            base = model(**inputs).logits
        assert not torch.allclose(base, want)
        torch.testing.assert_close(model(**inputs).logits, want)


def test_compile_fullgraph_on_a_grouped_model():
    model = decoder("llama", lora_dropout=0.1).train()
    accelerate(model)
    inputs = batch("llama")
    with peftkern.use_backend("torch"):
        run(model, inputs)  # groups form in eager; the compiled graph runs each layer's op
    assert group_names(model)

    def loss_fn(input_ids, labels):
        return model(input_ids=input_ids, labels=labels).loss

    explained = torch._dynamo.explain(loss_fn)(**inputs)
    assert explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    torch.manual_seed(4)
    loss_c = compiled(**inputs)
    torch.manual_seed(4)
    loss_e = loss_fn(**inputs)  # eager: grouped, same seeds in the same order
    torch.testing.assert_close(loss_c, loss_e)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_with_groups(reentrant, group_calls):
    model = decoder("llama", lora_dropout=0.3).train()
    accelerate(model)
    inputs = batch("llama")
    with peftkern.use_backend("torch"):
        run(model, inputs)
        want = run(model, inputs, seed=11)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        got = run(model, inputs, seed=11)
        again = run(model, inputs, seed=11)  # the groups survive the recomputation
    assert group_names(model) == [("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")] * 2
    for result in (got, again):
        torch.testing.assert_close(result[0], want[0])
        for n in want[2]:
            torch.testing.assert_close(result[2][n], want[2][n], rtol=1e-5, atol=1e-7)


def test_save_and_reload_unchanged(tmp_path):
    model = decoder("llama").eval()
    accelerate(model)
    inputs = {"input_ids": batch("llama")["input_ids"]}
    with torch.no_grad(), peftkern.use_backend("torch"):
        model(**inputs)
        want = model(**inputs).logits
    model.save_pretrained(tmp_path)
    fresh = peft.PeftModel.from_pretrained(base_decoder("llama"), tmp_path).eval()
    with torch.no_grad():
        got = fresh(**inputs).logits
    assert_close_rule("logits", got, want.double(), want)


def test_opt_out():
    model = decoder("llama")
    summary = accelerate(model, group_projections=False)
    assert summary.group_candidates == 0
    with torch.no_grad(), peftkern.use_backend("torch"):
        model(input_ids=batch("llama")["input_ids"])
    assert peftkern.projection_groups(model) == []


def test_autocast_group_equals_the_layers(group_calls):
    """Under autocast the group casts x once and each member's weights as autocast casts peft's linears."""
    model = decoder("llama").train()
    ungrouped = copy.deepcopy(model)
    accelerate(model)
    accelerate(ungrouped, group_projections=False)
    inputs = batch("llama")
    with peftkern.use_backend("torch"), torch.autocast("cpu", dtype=torch.bfloat16):
        run(model, inputs)
        got = run(model, inputs)
        want = run(ungrouped, inputs)
    assert group_calls == [3, 2, 3, 2, 3, 2, 3, 2][: len(group_calls)] and group_calls
    torch.testing.assert_close(got[1], want[1])
    for n in want[2]:  # bf16 gradients: the group sums x's three contributions in another order than autograd
        torch.testing.assert_close(got[2][n], want[2][n], rtol=1.6e-2, atol=1e-3)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_summary_states_each_fused_layers_backend(backend):
    with peftkern.use_backend(backend):
        summary = accelerate(decoder("llama"))
    assert f"14 of 14 LoRA layers (14 on {backend}) run peftkern's fused ops" in str(summary)


def test_rank_above_min_in_out_is_fused(group_calls):
    """peft takes r > min(in, out) (k_proj/v_proj here are 32 -> 16 with r = 24): so does accelerate."""
    plain = decoder("llama", r=24).train()
    oracle = copy.deepcopy(plain).double()
    ours = copy.deepcopy(plain)
    summary = accelerate(ours)
    assert summary.fused_now == summary.lora_layers == 14, summary
    inputs = batch("llama")
    with peftkern.use_backend("torch"):
        run(ours, inputs)
        got = run(ours, inputs)
    assert group_calls
    assert_matches_peft(got, run(plain, inputs), run(oracle, inputs))
