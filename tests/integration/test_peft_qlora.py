"""QLoRA: peftkern.accelerate on peft LoRA layers over bitsandbytes 4-bit bases (integrations/qlora.py), on CPU.

A tiny Llama whose projections are quantised bnb.nn.Linear4bit layers (NF4 / FP4, with and without double
quantisation): logits, loss and every adapter gradient of the accelerated model vs an fp64 oracle built from the
dequantised weights, under the 2x rule against peft's own bnb layers in the same dtype; dropout > 0 with our masks
(the oracle and peft get the masks the op drew)."""

from __future__ import annotations

import pytest
import torch
from _lora_models import TARGETS, base_model, batch, lora_layers, randomize_lora_B
from _util import DEVICE, assert_close_rule
from torch import nn

import peftkern
import peftkern.ops.lora as lora_ops
import peftkern.ops.lora_4bit as lora4_ops
from peftkern.bench.lora import keep_mask
from peftkern.integrations import qlora
from peftkern.integrations.accelerate import accelerate, restore

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")


def _quantise(model, quant_type, nested, compute_dtype):
    """Replace every target nn.Linear of `model` by a bnb Linear4bit holding its weight, quantised on DEVICE."""
    for mod in list(model.modules()):
        for cname, child in list(mod.named_children()):
            if type(child) is nn.Linear and cname in TARGETS["llama"]:
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute_dtype, compress_statistics=nested, quant_type=quant_type)
                q.weight = bnb.nn.Params4bit(child.weight.data.clone(), requires_grad=False,
                                             compress_statistics=nested, quant_type=quant_type, module=q)
                if child.bias is not None:
                    q.bias = nn.Parameter(child.bias.data.clone(), requires_grad=False)
                # bitsandbytes >= 0.49 repacks a 4-bit weight for CPU inference on an avx512-bf16 CPU at the first
                # eval forward (a layout peftkern does not read: those layers fall back, test_cpu_repacked_weight);
                # the tests keep one layout on every CPU.
                q.support_avx512bf16_for_cpu = False
                setattr(mod, cname, q.to(DEVICE))
    return model


def _config(lora_dropout):
    return peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=lora_dropout, target_modules=TARGETS["llama"])


def qlora_model(quant_type="nf4", nested=True, dtype=torch.float32, lora_dropout=0.0, loaded_in_4bit=True):
    """(peft model on 4-bit bases, fp64 oracle with the dequantised weights and the same adapters)."""
    base = _quantise(base_model("llama64"), quant_type, nested, dtype)
    base.to(dtype)  # the non-quantised parts (embeddings, norms, head) in the compute dtype, as a QLoRA model
    # by module name before peft wraps them (then they are "<name>.base_layer")
    deq = {n: bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
           for n, m in base.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    if loaded_in_4bit:
        base.is_loaded_in_4bit = True  # peft then wraps the bases with lora.bnb.Linear4bit (else lora.Linear)
    model = peft.get_peft_model(base, _config(lora_dropout))
    randomize_lora_B(model, 0)
    oracle_base = base_model("llama64")
    with torch.no_grad():
        copied = 0
        for n, m in oracle_base.named_modules():
            if n in deq:
                m.weight.copy_(deq[n])
                copied += 1
        assert copied == len(deq) == 14
        oracle_params = dict(oracle_base.named_parameters())
        for n, p in base.named_parameters():  # the same non-quantised params (rounded to dtype) as the model
            if "lora_" not in n and not isinstance(p, bnb.nn.Params4bit):
                oracle_params.pop(n.replace(".base_layer.", ".")).copy_(p.float())
        assert all(n.endswith("proj.weight") for n in oracle_params)  # all copied but the dequantised weights
    oracle = peft.get_peft_model(oracle_base, _config(lora_dropout))
    with torch.no_grad():
        mine = dict(model.named_parameters())
        for n, p in oracle.named_parameters():
            if "lora_" in n:
                p.copy_(mine[n].float())
    return model, oracle.double()


def run(model, inputs, seed=0):
    for p in model.parameters():
        p.grad = None
    torch.manual_seed(seed)
    out = model(**inputs)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.loss.detach(), out.logits.detach(), grads


def assert_matches(ours, plain, oracle, tiny=1e-5):
    (l_o, y_o, g_o), (l_p, y_p, g_p), (l_64, y_64, g_64) = ours, plain, oracle
    assert_close_rule("loss", l_o, l_64, l_p, tiny)
    assert_close_rule("logits", y_o, y_64, y_p, tiny)
    assert g_o.keys() == g_p.keys() == g_64.keys() and g_o
    for n in g_64:
        assert g_64[n].abs().max() > 0, f"{n} gets no gradient"
        assert_close_rule(f"grad {n}", g_o[n], g_64[n], g_p[n], tiny)


@pytest.fixture
def fused_calls(monkeypatch):
    calls = []
    real = lora4_ops.lora_linear_4bit

    def counting(x, weight, *args):
        calls.append(weight)
        return real(x, weight, *args)

    monkeypatch.setattr(lora4_ops, "lora_linear_4bit", counting)
    return calls


CASES = [("nf4", True, torch.float32, "torch"), ("nf4", False, torch.float32, "triton"),
         ("fp4", True, torch.float16, "triton"), ("fp4", False, torch.float32, "torch"),
         ("nf4", True, torch.bfloat16, "torch")]  # bf16 tl.dot is wrong under the interpreter: torch for bf16


@pytest.mark.parametrize(("quant_type", "nested", "dtype", "backend"), CASES)
def test_parity_with_peft_bnb(quant_type, nested, dtype, backend, fused_calls):
    model, oracle = qlora_model(quant_type, nested, dtype)
    model.train()
    oracle.train()
    layers = lora_layers(model)
    assert layers and all(type(m).__name__ == "Linear4bit" for m in layers)  # peft's lora.bnb.Linear4bit
    inputs = batch("llama")
    plain = run(model, inputs)
    want = run(oracle, inputs)
    s = accelerate(model)
    assert s.fused_now == s.lora_layers == 14, str(s)
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


@pytest.mark.parametrize("layer_dtype", [torch.bfloat16, torch.float32])
def test_autocast_parity(layer_dtype, fused_calls):
    """The usual QLoRA training step: an fp32 model (norms, embeddings) under bf16 autocast, the 4-bit layers
    computing in bf16 (or fp32, which autocast overrides): operands cast as autocast casts peft's linears."""
    model, oracle = qlora_model("nf4", True, torch.float32)
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.compute_dtype = layer_dtype
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


def test_plain_lora_linear_on_4bit_base(fused_calls):
    """A model not flagged as loaded in 4 bit: peft wraps the bnb bases with lora.Linear; taken too."""
    model, oracle = qlora_model("nf4", True, loaded_in_4bit=False)
    layers = lora_layers(model)
    assert all(type(m) is peft.tuners.lora.Linear for m in layers)
    model.train()
    oracle.train()
    inputs = batch("llama")
    plain, want = run(model, inputs), run(oracle, inputs)
    s = accelerate(model)
    assert s.fused_now == 14, str(s)
    ours = run(model, inputs)
    assert len(fused_calls) == 14
    assert_matches(ours, plain, want)
    restore(model)


class _MaskDropout(nn.Module):
    def __init__(self, masks, p):
        super().__init__()
        self.masks, self.p = masks, p

    def forward(self, x):
        keep = self.masks.pop(0).reshape(x.shape)
        return x * keep.to(x.dtype) / (1 - self.p)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_dropout_with_our_masks(backend, monkeypatch):
    p = 0.3
    model, oracle = qlora_model("nf4", True, torch.float32, lora_dropout=p)
    model.train()
    oracle.train()
    layers = {id(m.base_layer.weight): n for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    seen = []  # (layer name, x shape) per fused call, then the seed it drew
    real_seed, real_4bit = lora_ops.draw_seed, lora4_ops.lora_linear_4bit

    def recording_4bit(x, weight, *args):
        seen.append([layers[id(weight)], x.shape])
        return real_4bit(x, weight, *args)

    def recording_seed(q):
        s = real_seed(q)
        seen[-1].append(int(s))
        return s

    monkeypatch.setattr(lora4_ops, "lora_linear_4bit", recording_4bit)
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


def run_no_dropout(model, inputs):
    for mod in model.modules():
        if isinstance(mod, peft.tuners.lora.LoraLayer):
            mod.lora_dropout["default"] = nn.Identity()
    return run(model, inputs)


def test_strict_accelerate_and_eval(monkeypatch):
    monkeypatch.setenv("PEFTKERN_STRICT", "1")
    model, _ = qlora_model("fp4", True)
    model.eval()
    inputs = batch("llama")
    with torch.no_grad():
        plain = model(**inputs).logits
    s = accelerate(model)
    assert s.fused_now == 14, str(s)
    with torch.no_grad():
        ours = model(**inputs).logits
    torch.testing.assert_close(ours, plain, rtol=1e-4, atol=1e-4)


def test_eight_bit_is_fused_too(monkeypatch):
    """8-bit bases (Linear8bitLt) are taken as well (tests/integration/test_peft_qlora_8bit.py has their tests):
    accelerate under PEFTKERN_STRICT=1 fuses every layer, and training-mode logits stay peft's."""
    monkeypatch.setenv("PEFTKERN_STRICT", "1")
    base = base_model("llama64")
    for mod in list(base.modules()):
        for cname, child in list(mod.named_children()):
            if type(child) is nn.Linear and cname in ("q_proj", "v_proj"):
                q = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=False, has_fp16_weights=False)
                q.weight = bnb.nn.Int8Params(child.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
                setattr(mod, cname, q.to(DEVICE))
    base.is_loaded_in_8bit = True
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize_lora_B(model, 0)
    model.train()
    with torch.no_grad():
        plain = model(**batch("llama")).logits
    s = accelerate(model)
    assert s.fused_now == s.lora_layers == 4 and not s.reasons, str(s)
    assert all("8-bit dequant" in b for b in s.backends), str(s)
    with torch.no_grad():
        ours = model(**batch("llama")).logits
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-5)


def test_no_persistent_dequantised_weight(monkeypatch):
    """The dequantised weight is a per-call temporary: none outlives the forward (autograd keeps a recipe and the
    backward dequantises again)."""
    import gc
    import weakref

    model, oracle = qlora_model("nf4", True)
    model.train()
    accelerate(model)
    made, real = [], lora4_ops.dequantize

    def recording(*args):
        w = real(*args)
        made.append(weakref.ref(w))
        return w

    monkeypatch.setattr(lora4_ops, "dequantize", recording)
    inputs = batch("llama")
    out = model(**inputs)
    gc.collect()
    assert len(made) == 14 and all(r() is None for r in made)
    out.loss.backward()
    # the backward dequantised the weights again where it needs dx = dy W (not layer 0's q/k/v: their input
    # needs no gradient, so autograd saved no weight for them)
    assert len(made) == 25
    assert all(r() is None for r in made)


def test_peft_features_unchanged(monkeypatch):
    """disable_adapter, deepcopy, pickle and merge/unmerge (peft re-quantises on merge: lossy, and the same lossy
    result with or without accelerate) behave as on plain peft."""
    import copy
    import io

    monkeypatch.setenv("PEFTKERN_STRICT", "1")
    inputs = batch("llama")

    def sequence(acc):
        model, _ = qlora_model("nf4", True)
        model.eval()
        if acc:
            assert accelerate(model).fused_now == 14
        out = {}
        with torch.no_grad():
            out["fused"] = model(**inputs).logits
            with model.disable_adapter():
                out["disabled"] = model(**inputs).logits
            if acc:
                out["deepcopy"] = copy.deepcopy(model)(**inputs).logits
                buf = io.BytesIO()
                torch.save(model, buf)
                buf.seek(0)
                out["pickle"] = torch.load(buf, weights_only=False)(**inputs).logits
            model.merge_adapter()
            out["merged"] = model(**inputs).logits
            model.unmerge_adapter()
            out["unmerged"] = model(**inputs).logits
        return out

    ours, plain = sequence(True), sequence(False)
    for k in ("fused", "disabled", "merged", "unmerged"):
        torch.testing.assert_close(ours[k], plain[k], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours["deepcopy"], ours["fused"], rtol=0, atol=0)
    torch.testing.assert_close(ours["pickle"], ours["fused"], rtol=0, atol=0)


@pytest.mark.parametrize(("dtype", "backend"), [(torch.float32, "triton"), (torch.float16, "triton"),
                                                (torch.float32, "torch")])
def test_greedy_decode_reads_the_4bit_weight_once(dtype, backend, monkeypatch):
    """generate() on an accelerated QLoRA model under PEFTKERN_STRICT=1: every decode step (batch 2: 2 rows) runs
    peftkern::lora_linear_4bit_decode in every LoRA layer (the prompt, 2 x 9 rows, the dequant path), and the tokens
    equal peft's own generate."""
    monkeypatch.setenv("PEFTKERN_STRICT", "1")
    model, _ = qlora_model("nf4", True, dtype)
    model.eval()
    ids = batch("llama")["input_ids"]
    with torch.no_grad():
        want = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    accelerate(model)
    seen = []
    real = torch.ops.peftkern.lora_linear_4bit_decode
    monkeypatch.setattr(lora4_ops.torch.ops.peftkern, "lora_linear_4bit_decode",
                        lambda x, *a: seen.append(x.shape[:-1].numel()) or real(x, *a), raising=False)
    with torch.no_grad(), peftkern.use_backend(backend):
        got = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert seen and set(seen) == {ids.shape[0]} and len(seen) == 14 * 2  # two cached decode steps, 14 layers each
    assert torch.equal(got, want)


def test_cpu_repacked_weight_falls_back_with_its_reason():
    """A weight bitsandbytes repacked for CPU inference (packing_format_for_cpu) is a layout the dequantisation does
    not read: the layer keeps peft's forward and the summary says why."""
    model, _ = qlora_model("nf4", True)
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.weight.quant_state.packing_format_for_cpu = True
            break
    s = accelerate(model)
    assert s.fused_now == 13 and any("packing_format_for_cpu" in r for r in s.reasons), str(s)
    restore(model)
