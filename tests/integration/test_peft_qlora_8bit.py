"""LoRA on bitsandbytes 8-bit bases: peftkern.accelerate on peft LoRA layers over bnb.nn.Linear8bitLt
(integrations/qlora.py, ops/lora_8bit.py), on CPU.

A tiny Llama (with attention biases) whose projections are quantised Linear8bitLt layers (has_fp16_weights=False):
in training mode (bitsandbytes' dequantising matmul on CPU) logits, loss and every adapter gradient of the
accelerated model vs an fp64 oracle built from the dequantised weights, under the 2x rule against peft's own bnb
layers in the same dtype; dropout > 0 with our masks; eval mode vs the oracle (peft's eval runs bitsandbytes' int8
matmul, which quantises the activations: there peftkern is compared with torch on the dequantised weights, and
peft's own bits differ); the fallback reasons; no dequantised weight outlives a call."""

from __future__ import annotations

import pytest
import torch
from _lora_models import TARGETS, VOCAB, batch, lora_layers, randomize_lora_B
from _util import DEVICE, assert_close_rule
from test_peft_qlora import _config, _MaskDropout, assert_matches, run, run_no_dropout
from torch import nn

import peftkern
import peftkern.ops.lora as lora_ops
import peftkern.ops.lora_8bit as lora8_ops
from peftkern._backend import BackendUnavailable
from peftkern.bench.lora import keep_mask
from peftkern.integrations import qlora
from peftkern.integrations.accelerate import accelerate, restore

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")


def base_llama(seed=0):
    """The integration tests' tiny Llama, with biases on the attention projections (the 8-bit bias path)."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, attention_bias=True)
    model = tf.LlamaForCausalLM(cfg)
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.2)
    return model.to(DEVICE)


def int8_linear(child: nn.Linear, has_fp16_weights=False):
    """A bnb Linear8bitLt holding `child`'s weight (quantised by Int8Params on .to(DEVICE)) and bias."""
    q = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                            has_fp16_weights=has_fp16_weights)
    q.weight = bnb.nn.Int8Params(child.weight.data.cpu().clone(), requires_grad=has_fp16_weights,
                                 has_fp16_weights=has_fp16_weights)
    if child.bias is not None:
        q.bias = nn.Parameter(child.bias.data.clone(), requires_grad=False)
    return q.to(DEVICE)


def _quantise(model, targets=TARGETS["llama"], **kw):
    for mod in list(model.modules()):
        for cname, child in list(mod.named_children()):
            if type(child) is nn.Linear and cname in targets:
                setattr(mod, cname, int8_linear(child, **kw))
    return model


def dequantised(m) -> torch.Tensor:
    """bitsandbytes' weight of a quantised Linear8bitLt in fp32 (its MatMul8bitFp expression)."""
    cb, scb = qlora.int8_weight(m)
    return cb.to(torch.float32).mul_(scb.unsqueeze(1).mul(1.0 / 127.0))


def int8_model(dtype=torch.float32, lora_dropout=0.0, loaded_in_8bit=True, config=None):
    """(peft model on 8-bit bases, fp64 oracle with the dequantised weights and the same adapters and biases)."""
    base = _quantise(base_llama())
    base.to(dtype)  # embeddings, norms, head and biases in dtype; the int8 weights stay int8
    # by module name before peft wraps them (then they are "<name>.base_layer")
    deq = {n: dequantised(m) for n, m in base.named_modules() if isinstance(m, bnb.nn.Linear8bitLt)}
    if loaded_in_8bit:
        base.is_loaded_in_8bit = True  # peft then wraps the bases with lora.bnb.Linear8bitLt (else lora.Linear)
    model = peft.get_peft_model(base, config or _config(lora_dropout))
    randomize_lora_B(model, 0)
    oracle_base = base_llama()
    with torch.no_grad():
        copied = 0
        for n, m in oracle_base.named_modules():
            if n in deq:
                assert m.weight.shape == deq[n].shape
                m.weight.copy_(deq[n])
                copied += 1
        assert copied == len(deq) == 14
        oracle_params = dict(oracle_base.named_parameters())
        for n, p in base.named_parameters():  # the same non-quantised params (rounded to dtype) as the model
            if "lora_" not in n and p.dtype != torch.int8:
                oracle_params.pop(n.replace(".base_layer.", ".")).copy_(p.float())
        assert all(n.endswith("proj.weight") for n in oracle_params)  # all copied but the dequantised weights
    oracle = peft.get_peft_model(oracle_base, config or _config(lora_dropout))
    with torch.no_grad():
        mine = dict(model.named_parameters())
        for n, p in oracle.named_parameters():
            if "lora_" in n:
                p.copy_(mine[n].float())
    return model, oracle.double()


@pytest.fixture
def fused_calls(monkeypatch):
    calls = []
    real = lora8_ops.lora_linear_8bit

    def counting(x, cb, *args):
        calls.append(cb)
        return real(x, cb, *args)

    monkeypatch.setattr(lora8_ops, "lora_linear_8bit", counting)
    return calls


CASES = [(torch.float32, "torch"), (torch.float32, "triton"), (torch.float16, "triton"),
         (torch.bfloat16, "torch")]  # bf16 tl.dot is wrong under the interpreter: torch for bf16


@pytest.mark.parametrize(("dtype", "backend"), CASES)
def test_parity_with_peft_bnb(dtype, backend, fused_calls, monkeypatch):
    monkeypatch.setenv("PEFTKERN_STRICT", "1")
    model, oracle = int8_model(dtype)
    model.train()
    oracle.train()
    layers = lora_layers(model)
    assert layers and all(type(m) is peft.tuners.lora.bnb.Linear8bitLt for m in layers)
    inputs = batch("llama")
    plain = run(model, inputs)
    want = run(oracle, inputs)
    with peftkern.use_backend(backend):
        s = accelerate(model)
    assert s.fused_now == s.lora_layers == 14, str(s)
    assert dict(s.backends) == {f"{backend} 8-bit dequant + {backend}": 14}, str(s)
    assert all(qlora.is_accelerated(m) for m in layers)
    with peftkern.use_backend(backend):
        ours = run(model, inputs)
    assert len(fused_calls) == 14
    tiny = 1e-5 if dtype == torch.float32 else 1e-3
    assert_matches(ours, plain, want, tiny)
    # restore gives peft's forward back, bit for bit
    assert restore(model) == 14 and not any(qlora.is_accelerated(m) for m in layers)
    again = run(model, inputs)
    assert torch.equal(again[1], plain[1])
    assert len(fused_calls) == 14


def test_plain_lora_linear_on_8bit_base(fused_calls):
    """A model not flagged as loaded in 8 bit: peft wraps the bnb bases with lora.Linear; taken too."""
    model, oracle = int8_model(loaded_in_8bit=False)
    layers = lora_layers(model)
    assert all(type(m) is peft.tuners.lora.Linear for m in layers)
    model.train()
    oracle.train()
    inputs = batch("llama")
    plain, want = run(model, inputs), run(oracle, inputs)
    s = accelerate(model)
    assert s.fused_now == 14, str(s)
    with peftkern.use_backend("triton"):
        ours = run(model, inputs)
    assert len(fused_calls) == 14
    assert_matches(ours, plain, want)
    restore(model)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_dropout_with_our_masks(backend, monkeypatch):
    p = 0.3
    model, oracle = int8_model(lora_dropout=p)
    model.train()
    oracle.train()
    layers = {id(qlora.int8_weight(m.base_layer)[0]): n for n, m in model.named_modules()
              if isinstance(m, peft.tuners.lora.LoraLayer)}
    seen = []  # (layer name, x shape) per fused call, then the seed it drew
    real_seed, real_8bit = lora_ops.draw_seed, lora8_ops.lora_linear_8bit

    def recording_8bit(x, cb, *args):
        seen.append([layers[id(cb)], x.shape])
        return real_8bit(x, cb, *args)

    def recording_seed(q):
        s = real_seed(q)
        seen[-1].append(int(s))
        return s

    monkeypatch.setattr(lora8_ops, "lora_linear_8bit", recording_8bit)
    monkeypatch.setattr(lora_ops, "draw_seed", recording_seed)
    accelerate(model)
    inputs = batch("llama")
    with peftkern.use_backend(backend):
        ours = run(model, inputs, seed=3)
    assert len(seen) == 14 and all(len(c) == 3 for c in seen)
    masks = {}
    for name, shape, seed in seen:
        m = shape[:-1].numel()
        masks.setdefault(name, []).append(keep_mask(backend, m, shape[-1], p, seed, DEVICE))
    restore(model)
    for mdl in (model, oracle):
        for n, mod in mdl.named_modules():
            if n in masks:
                mod.lora_dropout["default"] = _MaskDropout(list(masks[n]), p)
    plain, want = run(model, inputs), run(oracle, inputs)
    assert_matches(ours, plain, want)
    assert not torch.allclose(ours[1], run_no_dropout(oracle, inputs)[1].float())


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_eval_is_the_dequantised_matmul(backend, monkeypatch):
    """Eval mode is fused too (PEFTKERN_STRICT=1): logits vs the fp64 oracle under the 2x rule against torch in fp32
    on the same dequantised weights. peft's own eval runs bitsandbytes' int8 matmul (activations quantised to int8),
    a different result with a larger error: peftkern does not reproduce those bits (module docstring)."""
    monkeypatch.setenv("PEFTKERN_STRICT", "1")
    model, oracle = int8_model()
    model.eval()
    oracle.eval()
    fp32_torch = int8_model()[1].float().eval()  # the oracle's model in fp32: torch on the dequantised weights
    inputs = batch("llama")
    with torch.no_grad():
        peft_int8 = model(**inputs).logits
        want, same_dtype = oracle(**inputs).logits, fp32_torch(**inputs).logits
    s = accelerate(model)
    assert s.fused_now == 14, str(s)
    with torch.no_grad(), peftkern.use_backend(backend):
        ours = model(**inputs).logits
    assert_close_rule("eval logits", ours, want, same_dtype, 1e-5)
    err = lambda y: (y.double() - want).abs().max().item()
    assert err(peft_int8) > 4 * err(ours) and not torch.allclose(peft_int8, ours, rtol=1e-4, atol=1e-4)


def test_autocast_parity(fused_calls):
    """An fp32 model under bf16 autocast: bitsandbytes' training matmul runs F.linear under autocast (x and the fp32
    weight each rounded once to bf16); the fused op gets every operand cast as autocast casts them."""
    model, oracle = int8_model()
    model.train()
    oracle.train()
    inputs = batch("llama")

    def run_ac(mdl):
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            return run(mdl, inputs)

    plain, want = run_ac(model), run(oracle, inputs)
    s = accelerate(model)
    assert s.fused_now == 14, str(s)
    with peftkern.use_backend("torch"):
        ours = run_ac(model)
    assert len(fused_calls) == 14
    assert_matches(ours, plain, want, 1e-3)
    restore(model)


def test_half_input_under_bf16_autocast_falls_back(monkeypatch):
    """bitsandbytes rounds W to an fp16 input's dtype, then autocast rounds it to bf16: two roundings the op does
    not make, so that call keeps peft's forward with the reason (raised under PEFTKERN_STRICT=1)."""
    model, _ = int8_model(torch.float16)
    model.train()
    assert accelerate(model).fused_now == 14
    monkeypatch.setenv("PEFTKERN_STRICT", "1")
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16), \
            pytest.raises(BackendUnavailable, match="float16 input under autocast to torch.bfloat16 on an 8-bit"):
        model(**batch("llama"))


def _summary_reason(model) -> str:
    s = accelerate(model)
    assert s.fused_now == 0, str(s)
    assert len(s.reasons) == 1, str(s)
    return next(iter(s.reasons))


def test_fallback_reasons(monkeypatch):
    """Bases the fused path does not take keep peft's forward with a reason each (logged, not raised, without
    PEFTKERN_STRICT)."""
    monkeypatch.setenv("PEFTKERN_STRICT", "0")
    targets = ["q_proj", "v_proj"]
    cfg = peft.LoraConfig(r=4, target_modules=targets)

    def model_with(**kw):
        base = _quantise(base_llama(), targets, **kw)
        base.is_loaded_in_8bit = True
        return base

    # has_fp16_weights=True: bitsandbytes keeps a float weight and re-quantises it every call
    model = peft.get_peft_model(model_with(has_fp16_weights=True), cfg)
    with torch.no_grad():
        before = model(**batch("llama")).logits
        assert "has_fp16_weights=True" in _summary_reason(model)
        assert torch.equal(model(**batch("llama")).logits, before)
    # not quantised yet: a Linear8bitLt built and never moved to a device has no CB / SCB
    base = base_llama()
    for layer in base.model.layers:
        for name in targets:
            lin = getattr(layer.self_attn, name)
            q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=True, has_fp16_weights=False)
            setattr(layer.self_attn, name, q)
    base.is_loaded_in_8bit = True
    assert "no CB/SCB" in _summary_reason(peft.get_peft_model(base, cfg))
    # a hooked base
    base = model_with()
    base.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *a: None)
    s = accelerate(peft.get_peft_model(base, cfg))
    assert s.fused_now == 3 and any("8-bit base Linear8bitLt (its forward is hooked" in r for r in s.reasons), str(s)
    # DoRA on an 8-bit base
    model = peft.get_peft_model(model_with(), peft.LoraConfig(r=4, target_modules=targets, use_dora=True))
    assert "LoRA variant DoraLinearVariant on an 8-bit base" in _summary_reason(model)


def test_no_persistent_dequantised_weight(monkeypatch):
    """The dequantised weight is a per-call temporary: none outlives the forward (autograd keeps a recipe and the
    backward dequantises again)."""
    import gc
    import weakref

    model, _ = int8_model()
    model.train()
    accelerate(model)
    made, real = [], lora8_ops.dequantize

    def recording(*args):
        w = real(*args)
        made.append(weakref.ref(w))
        return w

    monkeypatch.setattr(lora8_ops, "dequantize", recording)
    out = model(**batch("llama"))
    gc.collect()
    assert len(made) == 14 and all(r() is None for r in made)
    out.loss.backward()
    # the backward dequantised the weights again where it needs dx = dy W (not layer 0's q/k/v: their input
    # needs no gradient, so autograd saved no weight for them)
    assert len(made) == 25
    assert all(r() is None for r in made)
