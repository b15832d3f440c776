"""peft DoRA layers (use_dora=True) through peftkern.accelerate: logits and every trainable gradient equal peft's
(fp64 peft as the oracle, plain peft in the same dtype as the reference, the 2x rule), dropout with the op's own
masks fed to the oracle, merge/unmerge, save/reload, and the reasons for what still falls back."""

from __future__ import annotations

import copy

import pytest
import torch
from _lora_models import base_model, batch, lora_layers, lora_model, randomize_lora_B
from torch import nn

import peftkern
import peftkern.ops.dora as dora_ops
import peftkern.ops.lora as lora_ops
from peftkern.integrations.accelerate import accelerate, restore
from peftkern.integrations.lora import is_accelerated
from peftkern.reference.lora import dropout_keep

peft = pytest.importorskip("peft")
from test_peft_lora import assert_matches_peft, run  # noqa: E402


@pytest.fixture
def dora_calls(monkeypatch):
    """Counts fused DoRA calls made by accelerated layers (and LoRA ones, which must not happen here)."""
    calls = {"dora": 0, "lora": 0}
    real, real_lora = dora_ops.dora_linear, lora_ops.lora_linear_checked

    def counting(*args, **kwargs):
        calls["dora"] += 1
        return real(*args, **kwargs)

    def counting_lora(*args, **kwargs):
        calls["lora"] += 1
        return real_lora(*args, **kwargs)

    monkeypatch.setattr(dora_ops, "dora_linear", counting)
    monkeypatch.setattr(lora_ops, "lora_linear_checked", counting_lora)
    return calls


def dora_model(arch="llama", **kw):
    return lora_model(arch, use_dora=True, **kw)


@pytest.mark.parametrize("mode", ["train-torch", "train-triton", "eval-torch"])
def test_parity_with_peft_llama(mode, dora_calls):
    train, backend = mode.startswith("train"), mode.split("-")[1]
    plain = dora_model(lora_dropout=0.0 if train else 0.1).train(train)
    oracle = copy.deepcopy(plain).double()
    ours = copy.deepcopy(plain)
    summary = accelerate(ours)
    n = len(lora_layers(ours))
    assert summary.lora_layers == summary.patched == summary.fused_now == n == 14, str(summary)
    inputs = batch("llama")
    with peftkern.use_backend(backend):  # PEFTKERN_STRICT=1: the kernel of `backend` runs, or this raises
        got = run(ours, inputs)
    assert dora_calls == {"dora": n, "lora": 0}, "every DoRA layer runs the DoRA op once (never as a LoRA group)"
    assert any("lora_magnitude_vector" in k for k in got[2])
    assert_matches_peft(got, run(plain, inputs), run(oracle, inputs))


def test_parity_with_peft_gpt2_conv1d(dora_calls):
    plain = dora_model("gpt2").train()
    oracle = copy.deepcopy(plain).double()
    ours = copy.deepcopy(plain)
    assert accelerate(ours).fused_now == len(lora_layers(ours)) > 0
    inputs = batch("gpt2")
    assert_matches_peft(run(ours, inputs), run(plain, inputs), run(oracle, inputs))
    assert dora_calls["dora"] == len(lora_layers(ours)) and dora_calls["lora"] == 0


class _KernelMaskDropout(nn.Module):
    """Stands in for peft's nn.Dropout in the oracle: applies the masks peftkern drew, in call order."""

    def __init__(self, p, seeds):
        super().__init__()
        self.p, self.seeds = p, seeds

    def forward(self, x):
        seed = self.seeds.pop(0)
        keep = dropout_keep((x.numel() // x.shape[-1], x.shape[-1]), self.p, seed, x.device).reshape(x.shape)
        return x * keep.to(x.dtype) / (1.0 - self.p)


def _record_seeds(monkeypatch) -> list[int]:
    """The dropout seeds the op draws, in call order (for _use_kernel_masks)."""
    seeds = []
    real = lora_ops.draw_seed

    def recording(dropout_p):
        s = real(dropout_p)
        if s is not None:
            seeds.append(int(s))
        return s

    monkeypatch.setattr(lora_ops, "draw_seed", recording)
    return seeds


def _use_kernel_masks(model, seeds, p) -> None:
    queue = list(seeds)
    for layer in lora_layers(model):
        layer.lora_dropout["default"] = _KernelMaskDropout(p, queue)


def test_dropout_parity_with_kernel_masks(monkeypatch):
    """lora_dropout 0.2, training: peft's dropout branch (x Wᵀ + (g-1)·x_d Wᵀ + g·s·x_d AᵀBᵀ) with the op's masks."""
    p = 0.2
    plain = dora_model(lora_dropout=p).train()
    oracle = copy.deepcopy(plain).double()
    ours = copy.deepcopy(plain)
    accelerate(ours)
    seeds = []
    real = lora_ops.draw_seed

    def recording(dropout_p):
        s = real(dropout_p)
        if s is not None:
            seeds.append(int(s))
        return s

    monkeypatch.setattr(lora_ops, "draw_seed", recording)
    inputs = batch("llama")
    got = run(ours, inputs)
    assert len(seeds) == 14
    for ref_model in (plain, oracle):
        queue = list(seeds)
        for layer in lora_layers(ref_model):
            layer.lora_dropout["default"] = _KernelMaskDropout(p, queue)
        ref_model.train()
    want_plain, want64 = run(plain, inputs), run(oracle, inputs)
    assert_matches_peft(got, want_plain, want64)
    with torch.no_grad():
        assert not torch.allclose(got[1], ours.eval()(**inputs).logits), "dropout took effect"


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_half_base_with_fp32_adapters(p, monkeypatch):
    """peft's default on a bf16 model: the base in bf16, the adapters and magnitude in fp32; with dropout peft's
    DoRA branch computes x_d Wᵀ in fp32 (the op follows it), fed the op's masks."""
    plain = dora_model(lora_dropout=p).train()
    oracle = copy.deepcopy(plain).double()
    plain.base_model.model.to(torch.bfloat16)
    for name, prm in plain.named_parameters():
        if "lora_" in name:
            prm.data = prm.data.float()
    ours = copy.deepcopy(plain)
    assert accelerate(ours).fused_now == 14
    seeds = []
    real = lora_ops.draw_seed

    def recording(dropout_p):
        s = real(dropout_p)
        if s is not None:
            seeds.append(int(s))
        return s

    monkeypatch.setattr(lora_ops, "draw_seed", recording)
    inputs = batch("llama")
    got = run(ours, inputs)
    if p:
        assert len(seeds) == 14
        for ref_model in (plain, oracle):
            queue = list(seeds)
            for layer in lora_layers(ref_model):
                layer.lora_dropout["default"] = _KernelMaskDropout(p, queue)
            ref_model.train()
    assert_matches_peft(got, run(plain, inputs), run(oracle, inputs), tiny=1e-3)


def test_eval_layer_has_no_dropout(dora_calls):
    """peft's DoRA reads the layer's training flag: in eval no dropout at all (equal to peft, bit for bit close)."""
    plain = dora_model(lora_dropout=0.3).eval()
    ours = copy.deepcopy(plain)
    accelerate(ours)
    inputs = batch("llama")
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs).logits, plain(**inputs).logits, rtol=1e-5, atol=1e-5)


def test_merge_unmerge(dora_calls):
    model = dora_model().eval()
    accelerate(model)
    inputs = batch("llama")
    with torch.no_grad():
        on = model(**inputs).logits
        n = dora_calls["dora"]
        assert n == 14
        model.merge_adapter()
        merged = model(**inputs).logits
        assert dora_calls["dora"] == n, "merged: the base layer alone"
        torch.testing.assert_close(merged, on, rtol=1e-4, atol=1e-5)
        model.unmerge_adapter()
        torch.testing.assert_close(model(**inputs).logits, on, rtol=1e-5, atol=1e-6)
        assert dora_calls["dora"] == 2 * n
        with model.disable_adapter():
            off = model(**inputs).logits
        torch.testing.assert_close(off, base_model("llama")(**inputs).logits)
        unloaded = model.merge_and_unload()
        torch.testing.assert_close(unloaded(**inputs).logits, on, rtol=1e-4, atol=1e-5)


def test_peft_saved_adapter_reloads_unchanged(tmp_path, dora_calls):
    plain = dora_model().eval()
    inputs = batch("llama")
    with torch.no_grad():
        want = plain(**inputs).logits
    plain.save_pretrained(tmp_path)
    reloaded = peft.PeftModel.from_pretrained(base_model("llama"), tmp_path).eval()
    assert accelerate(reloaded).fused_now == 14
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, want, rtol=1e-5, atol=1e-6)
    assert dora_calls["dora"] == 14


def test_trained_with_peftkern_reloads_in_plain_peft(tmp_path):
    model = dora_model(lora_dropout=0.1).train()
    accelerate(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    inputs = batch("llama")
    mag0 = model.base_model.model.model.layers[0].self_attn.q_proj.lora_magnitude_vector["default"].weight.clone()
    for _ in range(3):
        opt.zero_grad()
        model(**inputs).loss.backward()
        opt.step()
    mag1 = model.base_model.model.model.layers[0].self_attn.q_proj.lora_magnitude_vector["default"].weight
    assert not torch.equal(mag0, mag1), "the magnitude trains"
    model.eval()
    with torch.no_grad():
        trained = model(**inputs).logits
    model.save_pretrained(tmp_path)
    reloaded = peft.PeftModel.from_pretrained(base_model("llama"), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, trained, rtol=1e-5, atol=1e-5)
    assert restore(model) == 14 and not any(is_accelerated(m) for m in lora_layers(model))


def test_strict_accelerate_succeeds(monkeypatch):
    monkeypatch.setenv("PEFTKERN_STRICT", "1")
    model = dora_model().train()
    summary = peftkern.accelerate(model)
    assert summary.fused_now == 14 and not summary.reasons, str(summary)
    run(model, batch("llama"))


def test_weight_norm_cache_invalidated_by_a_base_weight_change():
    plain = dora_model().eval()
    ours = copy.deepcopy(plain)
    accelerate(ours)
    inputs = batch("llama")
    with torch.no_grad():
        ours(**inputs)
        for m in (plain, ours):
            m.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.mul_(1.5)
        torch.testing.assert_close(ours(**inputs).logits, plain(**inputs).logits, rtol=1e-5, atol=1e-5)


def test_fallbacks_say_why(dora_calls):
    # two active adapters
    model = dora_model()
    model.add_adapter("second", peft.LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj"], use_dora=True))
    randomize_lora_B(model, 5)
    model.base_model.set_adapter(["default", "second"])
    summary = accelerate(model)
    assert summary.reasons["DoRA with several active adapters"] == 2, str(summary)


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_autocast_parity(p, dora_calls, monkeypatch):
    """Under bf16 autocast the DoRA layers run fused (operands cast as autocast casts peft's linears, magnitude and
    norm in fp32): loss, logits and every gradient under the 2x rule against fp64, peft under autocast the
    reference; with dropout the oracle gets the op's masks."""
    plain = dora_model(lora_dropout=p).train()
    randomize_lora_B(plain, 2)
    oracle = copy.deepcopy(plain).double()
    ours = copy.deepcopy(plain)
    n = accelerate(ours).fused_now
    inputs = batch("llama")
    if p:
        seeds = _record_seeds(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16), peftkern.use_backend("torch"):
        got = run(ours, inputs)
    assert dora_calls["dora"] == n == 14
    if p:
        _use_kernel_masks(plain, seeds, p)
        _use_kernel_masks(oracle, seeds, p)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = run(plain, inputs)
    assert got[1].dtype == want[1].dtype
    assert_matches_peft(got, want, run(oracle, inputs), tiny=1e-3)


def test_compile_fullgraph_no_graph_break():
    model = dora_model(lora_dropout=0.1).train()
    accelerate(model)
    inputs = batch("llama")

    def loss_fn(input_ids, labels):
        return model(input_ids=input_ids, labels=labels).loss

    explained = torch._dynamo.explain(loss_fn)(**inputs)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert any("peftkern.dora_linear" in str(n.target) for g in explained.graphs for n in g.graph.nodes)
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(4)
    g_c = torch.autograd.grad(compiled(**inputs), params)
    torch.manual_seed(4)
    g_e = torch.autograd.grad(loss_fn(**inputs), params)
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_redraws_the_same_dropout(reentrant):
    model = dora_model(lora_dropout=0.3).train()
    accelerate(model)
    inputs = batch("llama")
    _, _, want = run(model, inputs, seed=3)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant:
        model.enable_input_require_grads()
    _, _, got = run(model, inputs, seed=3)
    assert got.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6)
