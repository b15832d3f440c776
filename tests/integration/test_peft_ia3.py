"""peftkern.accelerate on peft IA3 models (k/v and feed-forward layers): logits and gradients equal
peft's, adapters trained after accelerate reload in plain peft, merged inference and restore work."""

from __future__ import annotations

import copy

import pytest
import torch
from _lora_models import base_model, batch
from test_peft_lora import assert_matches_peft, run

import peftkern
import peftkern.ops.ia3 as ia3_ops

peft = pytest.importorskip("peft")

IA3_TARGETS = {
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "t5": (["k", "v", "wo"], ["wo"]),
    "gpt2": (["c_attn", "c_proj"], ["c_proj"]),  # Conv1D bases
}


def ia3_model(arch, seed=0):
    targets, ff = IA3_TARGETS[arch]
    pm = peft.get_peft_model(base_model(arch, seed),
                             peft.IA3Config(target_modules=targets, feedforward_modules=ff,
                                            fan_in_fan_out=(arch == "gpt2")))
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():  # peft starts l at ones: the identity would hide a wrong kernel
        for n, p in pm.named_parameters():
            if "ia3_l" in n:
                p.copy_((torch.rand(p.shape, generator=g) + 0.5).to(p.device))
    return pm


@pytest.fixture
def op_calls(monkeypatch):
    calls = []
    real = ia3_ops.ia3_linear
    monkeypatch.setattr(ia3_ops, "ia3_linear", lambda *a, **k: calls.append(k.get("feedforward")) or real(*a, **k))
    return calls


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("arch", list(IA3_TARGETS))
def test_parity_with_peft(arch, backend, op_calls):
    plain = ia3_model(arch)
    oracle = copy.deepcopy(plain).double()
    ours = copy.deepcopy(plain)
    with peftkern.use_backend(backend):
        summary = peftkern.accelerate(ours)
    n_layers = len([m for m in ours.modules() if isinstance(m, peft.tuners.ia3.Linear)])
    assert summary.ia3_layers == summary.ia3_fused_now == n_layers > 0, str(summary)
    assert f"{n_layers} of {n_layers} IA3 layers ({n_layers} on {backend})" in str(summary)  # the backend stated
    inputs = batch(arch)
    with peftkern.use_backend(backend):
        got = run(ours.train(), inputs)
    assert len(op_calls) == n_layers  # every IA3 layer ran the op, once per forward
    assert True in op_calls and False in op_calls  # both the feed-forward and the k/v form ran
    assert_matches_peft(got, run(plain.train(), inputs), run(oracle.train(), inputs))


def test_save_reload_in_plain_peft_and_merge(tmp_path):
    model = ia3_model("llama")
    peftkern.accelerate(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    inputs = batch("llama")
    for _ in range(2):
        opt.zero_grad()
        model(**inputs).loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        want = model(**inputs).logits
    model.save_pretrained(tmp_path)
    fresh = peft.PeftModel.from_pretrained(base_model("llama"), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs).logits, want, rtol=1e-4, atol=1e-5)
        model.merge_adapter()  # the accelerated layers see merged state and run the base alone
        torch.testing.assert_close(model(**inputs).logits, want, rtol=1e-4, atol=1e-5)
        model.unmerge_adapter()
        with model.disable_adapter():
            base_logits = model(**inputs).logits
        assert not torch.allclose(base_logits, want)
    assert peftkern.restore(model) > 0
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, want, rtol=1e-4, atol=1e-5)


def _bf16_scales(model):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "ia3_l" in n:
                p.data = p.data.bfloat16()
    return model


@pytest.mark.parametrize("convert,why", [(_bf16_scales, "ia3_l is torch.bfloat16"),
                                         (lambda m: m.double(), "dtype torch.float64")])
def test_layers_the_op_cannot_take_keep_peft_and_say_why(convert, why, monkeypatch):
    """A bf16 ia3_l on an fp32 base, or an fp64 model: peft's forward, same outputs, a reason that says so."""
    monkeypatch.delenv("PEFTKERN_STRICT", raising=False)  # a user's run: fall back and log
    model = convert(ia3_model("llama"))
    plain = copy.deepcopy(model)
    summary = peftkern.accelerate(model)
    assert summary.ia3_fused_now == 0 and any(why in r for r in summary.reasons), str(summary)
    inputs = batch("llama")
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, plain(**inputs).logits)
