"""peftkern.integrations.accelerate.accelerate on real (tiny) transformers + peft models: results equal peft's,
peft's features keep working, and every call that cannot be fused says so."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from _lora_models import ARCHS, TARGETS, base_model, batch, lora_layers, lora_model, randomize_lora_B
from _util import DEVICE, assert_close_rule
from torch import nn

import peftkern
import peftkern.ops.lora as lora_ops
import peftkern.ops.lora_group as group_ops
from peftkern.integrations.accelerate import accelerate, restore
from peftkern.integrations.lora import is_accelerated

peft = pytest.importorskip("peft")


@pytest.fixture
def op_calls(monkeypatch):
    """Counts calls of the fused op made by accelerated layers."""
    calls = []
    real = lora_ops.lora_linear_checked  # what the integration calls (its plan has checked the arguments)

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    def counting_group(x, members):
        calls.extend(x.shape for _ in members)  # a projection group: one fused call for each member
        return real_group(x, members)

    real_group = group_ops.lora_linear_group_checked
    monkeypatch.setattr(lora_ops, "lora_linear_checked", counting)
    monkeypatch.setattr(group_ops, "lora_linear_group_checked", counting_group)
    return calls


def run(model, inputs, seed=0):
    """Loss, logits and the gradient of every trainable parameter (by name)."""
    for p in model.parameters():
        p.grad = None
    torch.manual_seed(seed)
    out = model(**inputs)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.loss.detach(), out.logits.detach(), grads


def assert_matches_peft(ours, plain, oracle, tiny=1e-5):
    """ours (accelerated) vs plain peft in the same dtype, both against peft in float64."""
    (l_o, y_o, g_o), (l_p, y_p, g_p), (l_64, y_64, g_64) = ours, plain, oracle
    assert_close_rule("loss", l_o, l_64, l_p, tiny)
    assert_close_rule("logits", y_o, y_64, y_p, tiny)
    assert g_o.keys() == g_p.keys() == g_64.keys() and g_o
    for n in g_64:
        assert g_64[n].abs().max() > 0, f"{n} gets no gradient: the comparison would be empty"
        assert_close_rule(f"grad {n}", g_o[n], g_64[n], g_p[n], tiny)


# ------------------------------------------------------------------------------ parity with peft


# Eval runs with lora_dropout=0.1 (ignored in eval, as peft does) and train with 0, so both are exact. The
# kernels see p=0 either way, so eval runs on the torch backend only (the interpreter is slow).
@pytest.mark.parametrize("mode", ["train-torch", "train-triton", "eval-torch"])
@pytest.mark.parametrize("arch", ARCHS)
def test_parity_with_peft(arch, mode, op_calls):
    train, backend = mode.startswith("train"), mode.split("-")[1]
    plain = lora_model(arch, lora_dropout=0.0 if train else 0.1).train(train)
    oracle = copy.deepcopy(plain).double()
    ours = copy.deepcopy(plain)
    summary = accelerate(ours)
    n = len(lora_layers(ours))
    assert summary.lora_layers == summary.patched == summary.fused_now == n and n > 0
    inputs = batch(arch)
    with peftkern.use_backend(backend):  # PEFTKERN_STRICT=1: the kernel of `backend` runs, or this raises
        got = run(ours, inputs)
    assert len(op_calls) == n, "every LoRA layer runs the fused op once per forward"
    assert_matches_peft(got, run(plain, inputs), run(oracle, inputs))


def test_conv1d_weight_is_passed_as_a_view(op_calls, monkeypatch):
    """GPT-2's Conv1D stores (in, out): the op gets the transposed view, no copy per call."""
    seen = []
    real = lora_ops.lora_linear_checked
    monkeypatch.setattr(lora_ops, "lora_linear_checked", lambda x, w, *a: seen.append(w) or real(x, w, *a))
    model = lora_model("gpt2")
    accelerate(model)
    model(**batch("gpt2"))
    base_weights = {m.base_layer.weight.data_ptr() for m in lora_layers(model)}
    assert seen and all(not w.is_contiguous() and w.data_ptr() in base_weights for w in seen)


@pytest.mark.parametrize("backend", ["torch"] + (["triton"] if DEVICE.type == "cuda" else []))
@pytest.mark.parametrize("dtype", [torch.bfloat16] + ([torch.float16] if DEVICE.type == "cuda" else []))
def test_half_base_with_fp32_adapters(dtype, backend):
    """peft's default on a bf16/fp16 model: the base in half precision, the adapters in fp32."""
    plain = lora_model("llama")
    oracle = copy.deepcopy(plain).double()
    plain.base_model.model.to(dtype)
    for name, p in plain.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
    assert plain.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == torch.float32
    ours = copy.deepcopy(plain)
    assert accelerate(ours).fused_now == 14
    inputs = batch("llama")
    with peftkern.use_backend(backend):
        assert_matches_peft(run(ours, inputs), run(plain, inputs), run(oracle, inputs), tiny=1e-3)


def test_autocast(op_calls):
    plain = lora_model("roberta")
    oracle = copy.deepcopy(plain).double()
    ours = copy.deepcopy(plain)
    accelerate(ours)
    inputs = batch("roberta")
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16), peftkern.use_backend("torch"):
        got, want = run(ours, inputs), run(plain, inputs)
    assert got[1].dtype == want[1].dtype and op_calls
    assert_matches_peft(got, want, run(oracle, inputs), tiny=1e-3)


@pytest.mark.parametrize("arch", ["roberta", "llama"])  # base with bias / without
def test_lora_bias(arch):
    plain = lora_model(arch, lora_bias=True)
    randomize_lora_B(plain, 3)
    with torch.no_grad():
        for name, p in plain.named_parameters():
            if "lora_B" in name and name.endswith("bias"):
                assert p.abs().max() > 0
    oracle = copy.deepcopy(plain).double()
    ours = copy.deepcopy(plain)
    assert accelerate(ours).fused_now == len(lora_layers(ours))
    inputs = batch(arch)
    with peftkern.use_backend("torch"):
        assert_matches_peft(run(ours, inputs), run(plain, inputs), run(oracle, inputs))


# ------------------------------------------------------------------------------ dropout


def _identity_layer(p: float):
    """A peft lora.Linear over a zero 64x64 base with A = B = I and scaling 1: its output is drop(x)."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(64, 64, bias=False)

    net = Net()
    nn.init.zeros_(net.proj.weight)
    pm = peft.get_peft_model(net, peft.LoraConfig(r=64, lora_alpha=64, lora_dropout=p, target_modules=["proj"]))
    layer = pm.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(torch.eye(64))
        layer.lora_B["default"].weight.copy_(torch.eye(64))  # (moved to DEVICE with the model below)
    accelerate(pm.to(DEVICE))
    return layer


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_dropout_rate_and_mask_shared_by_backward(backend):
    p = 0.3
    layer = _identity_layer(p).train()
    x = torch.randn(512, 64, device=DEVICE).abs() + 0.5  # no zeros: a zero output means a dropped element
    with peftkern.use_backend(backend):
        y = layer(x)
        keep = y != 0
        # kept elements are scaled by 1 / (1 - p), dropped ones are 0
        torch.testing.assert_close(y[keep], (x / (1 - p))[keep])
        rate = 1 - keep.float().mean().item()
        assert abs(rate - p) < 0.02, rate
        # the backward regenerates the same mask: dA = (s·dY·B)ᵀ · drop(x) with B = I, s = 1
        dy = torch.randn_like(y)
        y.backward(dy)
    want_da = dy.t() @ (x * keep / (1 - p))
    torch.testing.assert_close(layer.lora_A["default"].weight.grad, want_da, rtol=1e-4, atol=1e-4)
    # the dropout module's p is read on every call, and eval turns dropout off as peft does
    layer.lora_dropout["default"].p = 0.6
    with peftkern.use_backend(backend), torch.no_grad():
        assert abs((layer(x) == 0).float().mean().item() - 0.6) < 0.02
        torch.testing.assert_close(layer.eval()(x), x)


def test_dropout_follows_torch_manual_seed():
    model = lora_model("llama", lora_dropout=0.2).train()
    accelerate(model)
    inputs = batch("llama")
    with peftkern.use_backend("torch"):
        run(model, inputs)  # the first forward forms the projection groups (layer by layer: other rounding)
        l1, y1, g1 = run(model, inputs, seed=5)
        l2, y2, g2 = run(model, inputs, seed=5)
        _, y3, _ = run(model, inputs, seed=6)
    assert torch.equal(y1, y2) and all(torch.equal(g1[n], g2[n]) for n in g1)
    assert not torch.allclose(y1, y3)
    model.eval()
    plain = lora_model("llama", lora_dropout=0.2).eval()
    assert not torch.allclose(run(model, inputs)[1], y1)  # train draws masks, eval does not
    torch.testing.assert_close(run(model, inputs)[1], run(plain, inputs)[1])


# ------------------------------------------------------------------------------ peft features


def test_reload_in_plain_peft(tmp_path):
    model = lora_model("llama", lora_dropout=0.1).train()
    accelerate(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    inputs = batch("llama")
    for _ in range(3):
        opt.zero_grad()
        model(**inputs).loss.backward()
        opt.step()
    model.eval()
    trained = model(**inputs).logits.detach()
    model.save_pretrained(tmp_path)
    reloaded = peft.PeftModel.from_pretrained(base_model("llama"), tmp_path).eval()
    assert not any(is_accelerated(m) for m in lora_layers(reloaded))
    torch.testing.assert_close(reloaded(**inputs).logits, trained, rtol=1e-5, atol=1e-5)
    # restore() gives back peft's forward, which agrees too
    assert restore(model) == 14 and not any(is_accelerated(m) for m in lora_layers(model))
    torch.testing.assert_close(model(**inputs).logits, trained, rtol=1e-5, atol=1e-5)


def test_disable_merge_and_unload(op_calls):
    model = lora_model("llama").eval()
    accelerate(model)
    inputs = batch("llama")
    with torch.no_grad():
        on = model(**inputs).logits
        n = len(op_calls)
        with model.disable_adapter():
            off = model(**inputs).logits
        assert len(op_calls) == n, "disabled adapters run the base layer alone"
        torch.testing.assert_close(off, base_model("llama")(**inputs).logits)
        assert not torch.allclose(on, off)
        model.merge_adapter()
        merged = model(**inputs).logits
        assert len(op_calls) == n, "a merged adapter is in the base weight: no LoRA term to add"
        model.unmerge_adapter()
        torch.testing.assert_close(model(**inputs).logits, on)
        assert len(op_calls) == 2 * n
        unloaded = model.merge_and_unload()
        torch.testing.assert_close(merged, on, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(unloaded(**inputs).logits, on, rtol=1e-4, atol=1e-5)


def test_multiple_adapters(op_calls, caplog):
    plain = lora_model("t5")
    plain.add_adapter("second", peft.LoraConfig(r=2, lora_alpha=3, target_modules=["q", "v", "wo"]))
    randomize_lora_B(plain, 9)
    ours = copy.deepcopy(plain)
    accelerate(ours)
    inputs = batch("t5")

    def compare():
        with torch.no_grad():
            torch.testing.assert_close(ours(**inputs).logits, plain(**inputs).logits, rtol=1e-5, atol=1e-5)

    for m in (ours, plain):
        m.set_adapter("second")
    compare()
    assert len(op_calls) == sum("second" in m.lora_A for m in lora_layers(ours)) == 16
    for m in (ours, plain):  # several adapters active at once: their LoRA terms add up
        m.base_model.set_adapter(["default", "second"])
    with caplog.at_level(logging.INFO, logger="peftkern"):
        compare()
    assert any("several active adapters" in r.message for r in caplog.records)


def test_unsupported_calls_fall_back_loudly(monkeypatch, caplog):
    """DoRA with several active adapters (one DoRA adapter is fused: test_peft_dora.py) and mixed-adapter batches
    keep peft's forward: it raises under PEFTKERN_STRICT=1, else logs once."""
    plain = lora_model("llama", use_dora=True)
    plain.add_adapter("second", peft.LoraConfig(r=2, target_modules=TARGETS["llama"], use_dora=True))
    plain.base_model.set_adapter(["default", "second"])
    ours = copy.deepcopy(plain)
    with caplog.at_level(logging.INFO, logger="peftkern"):
        summary = accelerate(ours)
    assert summary.fused_now == 0 and "DoRA with several active adapters" in str(summary)
    assert any("0 of 14 LoRA layers" in r.message and "DoRA" in r.message for r in caplog.records)
    inputs = batch("llama")
    with pytest.raises(peftkern.BackendUnavailable, match="DoRA"):
        ours(**inputs)
    monkeypatch.setenv("PEFTKERN_STRICT", "0")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="peftkern"), torch.no_grad():
        torch.testing.assert_close(ours(**inputs).logits, plain(**inputs).logits)
    assert sum("DoRA" in r.message for r in caplog.records) == 1

    plain = lora_model("llama").eval()  # peft takes adapter_names in eval mode only
    plain.add_adapter("second", peft.LoraConfig(r=2, target_modules=["q_proj"]))
    ours = copy.deepcopy(plain)
    accelerate(ours)
    names = ["default", "second"]
    with caplog.at_level(logging.WARNING, logger="peftkern"), torch.no_grad():
        got = ours(**inputs, adapter_names=names).logits
        torch.testing.assert_close(got, plain(**inputs, adapter_names=names).logits)
    assert any("adapter_names" in r.message for r in caplog.records)


def test_layers_that_are_not_lora_linear_are_reported(caplog):
    model = base_model("llama")
    cfg = peft.LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"])
    pm = peft.get_peft_model(model, cfg)
    with caplog.at_level(logging.INFO, logger="peftkern"):
        summary = accelerate(pm)
    assert (summary.lora_layers, summary.fused_now) == (3, 2)
    assert "Embedding LoRA layer" in str(summary)
    assert accelerate(pm).patched == 2  # idempotent


def test_plain_injection_without_peft_model():
    model = base_model("roberta")
    injected = peft.inject_adapter_in_model(peft.LoraConfig(r=4, target_modules=["query", "value"]), model)
    randomize_lora_B(injected, 1)
    want = copy.deepcopy(injected)
    assert accelerate(injected).fused_now == 4
    inputs = batch("roberta")
    with torch.no_grad():
        torch.testing.assert_close(injected(**inputs).logits, want(**inputs).logits)


# ------------------------------------------------------------------------------ compile, checkpointing, Trainer


def test_compile_fullgraph_no_graph_break():
    model = lora_model("llama", lora_dropout=0.1).train()
    accelerate(model)
    inputs = batch("llama")

    def loss_fn(input_ids, labels):
        return model(input_ids=input_ids, labels=labels).loss

    explained = torch._dynamo.explain(loss_fn)(**inputs)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert any("peftkern.lora_linear" in str(n.target) for g in explained.graphs for n in g.graph.nodes)
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    torch.manual_seed(4)
    loss_c = compiled(**inputs)
    params = [p for p in model.parameters() if p.requires_grad]
    g_c = torch.autograd.grad(loss_c, params)
    torch.manual_seed(4)
    loss_e = loss_fn(**inputs)
    g_e = torch.autograd.grad(loss_e, params)
    torch.testing.assert_close(loss_c, loss_e)
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_redraws_the_same_dropout(reentrant):
    """The op draws its seed from torch's generator in the forward; checkpointing restores the RNG state before
    recomputing, so the recomputed forward uses the same masks: gradients equal the non-checkpointed run."""
    model = lora_model("llama", lora_dropout=0.3).train()
    accelerate(model)
    inputs = batch("llama")
    with peftkern.use_backend("torch"):
        want = run(model, inputs, seed=11)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        assert model.base_model.model.model.gradient_checkpointing
        got = run(model, inputs, seed=11)
        other = run(model, inputs, seed=12)
    torch.testing.assert_close(got[0], want[0])
    for n in want[2]:
        torch.testing.assert_close(got[2][n], want[2][n], rtol=1e-5, atol=1e-7)
    assert not torch.allclose(other[0], want[0])  # dropout is live: a different seed changes the loss


def test_transformers_trainer(tmp_path, op_calls):
    from transformers import Trainer, TrainingArguments

    ids = torch.randint(2, 96, (4, 12), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": r, "labels": r} for r in ids]

    def train(accelerated: bool):
        model = lora_model("llama")
        if accelerated:
            accelerate(model)
        args = TrainingArguments(output_dir=str(tmp_path / str(accelerated)), max_steps=2,
                                 per_device_train_batch_size=2, learning_rate=1e-2, use_cpu=True,
                                 report_to="none", save_strategy="no", logging_steps=1, seed=0,
                                 dataloader_num_workers=0, disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=data)
        out = trainer.train()
        return out.training_loss, {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    with peftkern.use_backend("torch"):
        loss_k, params_k = train(True)
    assert len(op_calls) >= 2 * 14
    loss_p, params_p = train(False)
    assert abs(loss_k - loss_p) < 1e-5
    for n in params_p:
        torch.testing.assert_close(params_k[n], params_p[n], rtol=1e-4, atol=1e-6)


def test_e2e_bench_rows():
    from peftkern.bench import e2e

    def once(fn, device, quick, **kw):  # one real call stands in for the timing loop
        fn()
        return {"median_ms": 1.0, "p20_ms": 1.0, "p80_ms": 1.0}

    rows = e2e.run("tiny", torch.float32, torch.device("cpu"), True, once, lambda fn, d: None, lambda m: None, False)
    by = {r["provider"]: r for r in rows}
    assert "error" not in by["peft"] and "error" not in by["peftkern-torch"], rows
    assert by["peftkern-torch"]["fused_layers"] == "14/14"
    assert by["peft"]["tokens_per_s"] == by["peft"]["tokens"] * 1e3
    # same weights and data; only the dropout masks differ
    assert abs(by["peft"]["loss_first_step"] - by["peftkern-torch"]["loss_first_step"]) < 1e-2
