"""peft PrefixTuning through peftkern.accelerate: loss, logits and every trainable gradient equal peft's own
SDPA run (fp64 oracle, fp32 compared), on Llama (GQA), Qwen2 (MQA, qkv bias) and GPT-2 (absolute positions,
fused Conv1D qkv). The training forward must hand the kernel the sequence K/V alone and one prefix shared by
the batch (no concat, no expand); cache forwards and generate() take peft's cache path."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from _util import DEVICE, assert_close_rule

import peftkern
import peftkern.integrations.prefix as integ

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

V, B, L, P = 97, 2, 9, 5


def _base(family: str):
    if family == "llama":
        cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        return transformers.LlamaForCausalLM(cfg)
    if family == "qwen2":
        cfg = transformers.Qwen2Config(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64)
        return transformers.Qwen2ForCausalLM(cfg)
    cfg = transformers.GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64, attn_pdrop=0.0,
                                  resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def _models(family="llama", **prefix_cfg):
    """(peft fp32, peft fp64 oracle, accelerated fp32), all with the same weights."""
    torch.manual_seed(0)
    base = _base(family).to(DEVICE).float()
    base.set_attn_implementation("sdpa")
    pcfg = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, **prefix_cfg)
    ref = peft.get_peft_model(base, pcfg)
    with torch.no_grad():  # peft initialises the prefix small; make it matter
        for p in ref.prompt_encoder.parameters():
            p.normal_(0, 0.5)
    ref64 = copy.deepcopy(ref).double()
    ours = copy.deepcopy(ref)
    summary = peftkern.accelerate(ours)
    assert summary.prefix_layers == 2
    return ref, ref64, ours


def _inputs(padded=True):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, V, (B, L), generator=g).to(DEVICE)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :3] = 0  # left padding of the second row
    return ids, mask


def _step(model, ids, mask, **kw):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, labels=ids, **kw)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return out.loss.detach(), out.logits.detach(), grads


def _assert_same(ours, ref, ref64, mask):
    (loss, logits, grads), (loss_r, logits_r, grads_r), (loss64, logits64, grads64) = ours, ref, ref64
    keep = mask.bool()
    assert_close_rule("logits", logits[keep], logits64[keep], logits_r[keep])
    assert_close_rule("loss", loss, loss64, loss_r)
    assert grads.keys() == grads_r.keys() == grads64.keys() and grads
    for name, g in grads.items():
        assert_close_rule(name, g, grads64[name], grads_r[name])


@pytest.fixture
def op_calls(monkeypatch):
    """Shapes of the keys and prefix each call of the fused op gets (proves what the kernel reads)."""
    calls = []
    real = integ.prefix_attention

    def counting(q, k, v, pk, pv, **kw):
        calls.append((tuple(k.shape), tuple(pk.shape)))
        return real(q, k, v, pk, pv, **kw)

    monkeypatch.setattr(integ, "prefix_attention", counting)
    return calls


KV_HEADS = {"llama": 2, "qwen2": 1, "gpt2": 4}


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_prefix_tuning_matches_peft(family, padded, op_calls):
    ref, ref64, ours = _models(family)
    ids, mask = _inputs(padded)
    with peftkern.use_backend("triton"):
        got = _step(ours, ids, mask)
    hkv = KV_HEADS[family]
    # every layer: the S = L sequence keys alone, and one (Hkv, P, D) prefix for the whole batch
    assert op_calls == [((B, hkv, L, 16), (hkv, P, 16))] * 2
    _assert_same(got, _step(ref, ids, mask), _step(ref64, ids, mask), mask)


def test_projection_and_explicit_position_ids(op_calls):
    """prefix_projection (peft's MLP encoder) and caller-given position ids (peft offsets them by P)."""
    ref, ref64, ours = _models("llama", prefix_projection=True, encoder_hidden_size=24)
    ids, mask = _inputs()
    pos = torch.arange(L, device=DEVICE).unsqueeze(0).expand(B, -1) + torch.tensor([[0], [2]], device=DEVICE)
    with peftkern.use_backend("triton"):
        got = _step(ours, ids, mask, position_ids=pos)
    assert len(op_calls) == 2 and op_calls[0][1] == (2, P, 16)
    _assert_same(got, _step(ref, ids, mask, position_ids=pos), _step(ref64, ids, mask, position_ids=pos), mask)


def test_gradient_checkpointing_matches_peft(op_calls):
    """Checkpointed layers recompute attention with the prefix passed down again. (peft's own path fails
    under checkpointing with transformers 5: the cache is dropped but its 4-D mask keeps P columns; so
    the references run without checkpointing: same math.)"""
    ref, ref64, ours = _models("llama")
    ours.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ours.train()
    ids, mask = _inputs()
    got = _step(ours, ids, mask)
    assert len(op_calls) == 4  # forward, then recomputed in backward
    _assert_same(got, _step(ref, ids, mask), _step(ref64, ids, mask), mask)


def test_reentrant_checkpointing_is_refused_clearly():
    _, _, ours = _models("llama")
    ours.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    ours.train()
    ids, mask = _inputs()
    with pytest.raises(ValueError, match="use_reentrant"):
        ours(input_ids=ids, attention_mask=mask, labels=ids)


@pytest.mark.parametrize("how", ["use_cache=True", "eval default"])
def test_cache_forward_takes_peft_path_on_the_kernel(how, op_calls):
    """A forward that wants a cache (use_cache=True, or eval mode with the config's use_cache) keeps
    peft's cache, so past_key_values come back as peft's do; the kernel reads its prefix as views."""
    ref, _, ours = _models("llama")
    ids, mask = _inputs()
    kw = {"use_cache": True} if how == "use_cache=True" else {}
    ours.eval()
    ref.eval()
    with torch.no_grad():
        out = ours(input_ids=ids, attention_mask=mask, **kw)
        want = ref(input_ids=ids, attention_mask=mask, **kw)
    assert op_calls == [((B, 2, L, 16), (B, 2, P, 16))] * 2
    assert out.past_key_values.get_seq_length() == P + L
    keep = mask.bool()
    torch.testing.assert_close(out.logits[keep], want.logits[keep], atol=2e-5, rtol=2e-5)
    ours.train()
    with torch.no_grad():
        assert ours(input_ids=ids, attention_mask=mask).past_key_values is None  # training mode: no cache
    assert op_calls[-1] == ((B, 2, L, 16), (2, P, 16))


def test_disable_adapter_runs_the_base_model(op_calls):
    """peft's disable_adapter calls the base model's forward directly (no prefix): the model's own
    attention must run inside it, and the kernel again after it."""
    ref, _, ours = _models("llama")
    ids, mask = _inputs()
    with torch.no_grad():
        with ref.disable_adapter():
            want = ref(input_ids=ids, attention_mask=mask).logits
        with ours.disable_adapter():
            got = ours(input_ids=ids, attention_mask=mask).logits
        assert op_calls == []
        torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=1e-6, rtol=1e-6)
        again = ours(input_ids=ids, attention_mask=mask).logits
        peft_out = ref(input_ids=ids, attention_mask=mask).logits
    assert len(op_calls) == 2
    torch.testing.assert_close(again[mask.bool()], peft_out[mask.bool()], atol=2e-5, rtol=2e-5)


def test_token_type_ids_ignored_as_peft_does(op_calls):
    ref, _, ours = _models("gpt2")
    ids, mask = _inputs()
    tti = torch.ones_like(ids)
    with pytest.warns(UserWarning, match="Token type ids"):
        got = ours(input_ids=ids, attention_mask=mask, token_type_ids=tti).logits
    with pytest.warns(UserWarning, match="Token type ids"):
        want = ref(input_ids=ids, attention_mask=mask, token_type_ids=tti).logits
    assert len(op_calls) == 2
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=2e-5, rtol=2e-5)


def test_sliding_window_wider_than_the_keys_is_full_attention(op_calls):
    """Mistral-style sliding_window changes nothing while P + S fit in it; beyond, the attention falls back
    to peft's math with the reason (test_prefix_sliding_window.py), raising under PEFTKERN_STRICT=1."""
    torch.manual_seed(0)
    cfg = transformers.MistralConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, sliding_window=P + L)
    base = transformers.MistralForCausalLM(cfg).to(DEVICE)
    base.set_attn_implementation("sdpa")
    ref = peft.get_peft_model(base, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    ours = copy.deepcopy(ref)
    peftkern.accelerate(ours)
    ids, mask = _inputs()
    got, want = _step(ours, ids, mask), _step(ref, ids, mask)
    assert len(op_calls) == 2
    torch.testing.assert_close(got[0], want[0], atol=2e-5, rtol=2e-5)
    ours.get_base_model().config.sliding_window = P + L - 1
    with pytest.raises(peftkern.BackendUnavailable, match="no sliding window"):  # PEFTKERN_STRICT=1 in tests
        ours(input_ids=ids, attention_mask=mask)


def _bloom():
    cfg = transformers.BloomConfig(vocab_size=V, hidden_size=64, n_layer=2, n_head=4)
    return transformers.BloomForCausalLM(cfg), "CAUSAL_LM"


def _bart():
    cfg = transformers.BartConfig(vocab_size=V, d_model=64, encoder_layers=1, decoder_layers=1,
                                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                  decoder_ffn_dim=64, max_position_embeddings=64)
    return transformers.BartForConditionalGeneration(cfg), "SEQ_2_SEQ_LM"


def _llama_seq_cls():
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    return transformers.LlamaForSequenceClassification(cfg), "SEQ_CLS"


@pytest.mark.parametrize("build,why", [(_bloom, "does not use transformers' interface"),
                                       (_bart, "only causal-LM"), (_llama_seq_cls, "only causal-LM")])
def test_models_it_cannot_take_keep_peft(build, why, caplog, op_calls):
    """Bloom-style attention (no attention interface), seq2seq and non-LM heads: peftkern.accelerate
    leaves them to peft and says why; the direct integration call refuses."""
    torch.manual_seed(0)
    base, task = build()
    base = base.to(DEVICE).eval()
    model = peft.get_peft_model(base, peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=P))
    before = copy.deepcopy(model)
    with caplog.at_level(logging.INFO, logger="peftkern"):
        summary = peftkern.accelerate(model)
    assert summary.prefix_layers == 0 and any(why in r for r in summary.reasons), summary
    assert model.get_base_model().config._attn_implementation == before.get_base_model().config._attn_implementation
    ids, mask = _inputs(padded=False)
    kw = {"decoder_input_ids": ids} if task == "SEQ_2_SEQ_LM" else {}
    if task != "SEQ_CLS":  # peft 0.21 + transformers 5 cannot run prefix-tuning SEQ_CLS at all
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids, attention_mask=mask, **kw).logits,
                                       before(input_ids=ids, attention_mask=mask, **kw).logits)
    assert op_calls == []
    with pytest.raises(ValueError, match=why):
        integ.accelerate(model)


def test_reloaded_adapter_in_inference_mode(tmp_path, op_calls):
    """A saved prefix reloads in peft's inference mode (the prefix is the embedding table itself)."""
    ref, _, _ = _models("llama", prefix_projection=True, encoder_hidden_size=24)
    ref.save_pretrained(tmp_path)
    base = copy.deepcopy(ref.get_base_model())
    loaded = peft.PeftModel.from_pretrained(base, tmp_path)
    assert loaded.active_peft_config.inference_mode
    ours = copy.deepcopy(loaded)
    peftkern.accelerate(ours)
    ids, mask = _inputs()
    with torch.no_grad():
        got, want = ours(input_ids=ids, attention_mask=mask).logits, loaded(input_ids=ids, attention_mask=mask).logits
    assert len(op_calls) == 2
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=2e-5, rtol=2e-5)


def test_generate_uses_the_prefix_or_refuses():
    """Greedy generate equals greedy decoding by full forwards (which always see the prefix), or, where
    this transformers/peft pair drops the prefix cache in generate(), the accelerated model refuses."""
    ref, _, ours = _models("llama")
    ids = torch.randint(1, V, (B, 6), device=DEVICE)
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


def test_copy_and_restore(op_calls):
    """A deep copy of an accelerated model runs on its own prefix; restore() gives peft's forward back."""
    ref, _, ours = _models("llama")
    twin = copy.deepcopy(ours)
    with torch.no_grad():
        twin.prompt_encoder.default.embedding.weight.zero_()
    ids, mask = _inputs(padded=False)
    with torch.no_grad():
        a, b = ours(input_ids=ids).logits, twin(input_ids=ids).logits
    assert len(op_calls) == 4 and not torch.allclose(a, b)
    assert peftkern.restore(ours) == 1 and peftkern.restore(ours) == 0
    assert ours.get_base_model().config._attn_implementation == "sdpa"
    base = ours.get_base_model()
    assert not base._forward_hooks and not base._forward_pre_hooks  # accelerate's hooks went with it
    with torch.no_grad():
        c, want = ours(input_ids=ids, attention_mask=mask).logits, ref(input_ids=ids, attention_mask=mask).logits
    assert len(op_calls) == 4  # peft's own path now
    torch.testing.assert_close(c, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(a, want, atol=2e-5, rtol=2e-5)


def test_prompt_tuning_keeps_peft_path(caplog):
    torch.manual_seed(0)
    base = _base("llama").to(DEVICE).float()
    model = peft.get_peft_model(base, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    ref = copy.deepcopy(model)
    with caplog.at_level(logging.INFO, logger="peftkern"):
        summary = peftkern.accelerate(model)
    assert summary.prefix_layers == 0 and summary.lora_layers == 0
    ids, mask = _inputs()
    got, want = _step(model, ids, mask), _step(ref, ids, mask)
    torch.testing.assert_close(got[0], want[0])
    for name, g in got[2].items():
        torch.testing.assert_close(g, want[2][name])
    with pytest.raises(ValueError, match="prefix-tuning"):
        integ.accelerate(model)


def test_compiles_to_one_graph(op_calls):
    """No graph break in the accelerated training forward (the padding mask is passed as is, never
    tested for all-ones), and the compiled step equals the eager one."""
    _, _, ours = _models("llama")
    ids, mask = _inputs()
    explain = torch._dynamo.explain(ours)(input_ids=ids, attention_mask=mask, labels=ids)
    assert explain.graph_break_count == 0, explain.break_reasons
    want = _step(ours, ids, mask)
    torch._dynamo.reset()
    got = _step(torch.compile(ours, backend="aot_eager", fullgraph=True), ids, mask)
    torch.testing.assert_close(got[0], want[0])
    for name, g in got[2].items():
        torch.testing.assert_close(g, want[2][name.replace("_orig_mod.", "")])


def test_saves_less_for_backward_than_peft():
    """peft's step keeps each layer's [prefix ; sequence] K/V copies (expanded to the batch) for backward;
    the no-concat step does not. Counted on CPU with the same op math (torch backend)."""
    from peftkern._memory import saved_bytes

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=8)
    base = transformers.LlamaForCausalLM(cfg).to(DEVICE)
    base.set_attn_implementation("sdpa")
    prefix_len, batch, seq = 64, 8, 128
    ref = peft.get_peft_model(base, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=prefix_len))
    ours = copy.deepcopy(ref)
    peftkern.accelerate(ours)
    ids = torch.randint(0, V, (batch, seq), device=DEVICE)
    with peftkern.use_backend("torch"):
        b_peft, b_ours = (saved_bytes(lambda m=m: m(input_ids=ids, attention_mask=torch.ones_like(ids)).logits,
                                      list(m.parameters())) for m in (ref, ours))
    prefix_copies = 2 * cfg.num_hidden_layers * batch * 8 * prefix_len * 32 * 4  # K and V, fp32
    assert b_peft - b_ours >= prefix_copies, (b_peft, b_ours)


def test_autocast_matches_peft(op_calls):
    """Mixed precision as users train: the model in fp32 under bf16 autocast (RoPE leaves q, k in fp32,
    v in bf16; the op casts like autocast casts SDPA). Compared with peft under the same autocast."""
    ref, ref64, ours = _models("llama")
    ids, mask = _inputs()
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16), peftkern.use_backend("torch"):
        got, want = _step(ours, ids, mask), _step(ref, ids, mask)
    assert len(op_calls) == 2
    loss64 = _step(ref64, ids, mask)[0]
    # both bf16 runs land near the fp64 loss, and near each other
    assert abs(got[0] - loss64) < 0.02 * abs(loss64) and abs(want[0] - loss64) < 0.02 * abs(loss64)
    for name, g in got[2].items():
        err = (g - want[2][name]).norm() / want[2][name].norm()
        assert err < 0.05, (name, err)
