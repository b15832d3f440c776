"""Bottleneck adapters injected into tiny transformers models (built from configs, no downloads)."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from _util import DEVICE

import peftkern
from peftkern.integrations.adapters import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    AdapterConfig,
    adapter_state_dict,
    add_adapters,
    has_adapters,
    load_adapters,
    remove_adapters,
    save_adapters,
)
from peftkern.reference import adapter as ref

transformers = pytest.importorskip("transformers")
D, FF, R = 48, 80, 8  # d is not a multiple of the interpreter's 32-wide d tiles: ragged edges everywhere


def _build(arch: str):
    """(model, number of adapted layers) with dropout off, on DEVICE, seeded so rebuilding gives the same base."""
    torch.manual_seed(0)
    t = transformers
    common = dict(vocab_size=97)
    if arch == "llama":
        cfg = t.LlamaConfig(hidden_size=D, intermediate_size=FF, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, max_position_embeddings=64, **common)
        model, layers = t.LlamaForCausalLM(cfg), 2
    elif arch in ("bert", "roberta"):
        cls_cfg, cls = ((t.BertConfig, t.BertForMaskedLM) if arch == "bert"
                        else (t.RobertaConfig, t.RobertaForMaskedLM))
        cfg = cls_cfg(hidden_size=D, intermediate_size=FF, num_hidden_layers=2, num_attention_heads=4,
                      max_position_embeddings=66, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **common)
        model, layers = cls(cfg), 2
    elif arch == "gpt2":
        cfg = t.GPT2Config(n_embd=D, n_inner=FF, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                           embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=1,
                           **common)
        model, layers = t.GPT2LMHeadModel(cfg), 2
    else:
        cfg = t.T5Config(d_model=D, d_kv=12, d_ff=FF, num_layers=2, num_decoder_layers=1, num_heads=4,
                         dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, **common)
        model, layers = t.T5ForConditionalGeneration(cfg), 3  # encoder 2 + decoder 1
    return model.to(DEVICE).eval(), layers


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 97, (2, 11), generator=g).to(DEVICE)
    return {"input_ids": ids, "labels": ids}


ARCHS = ["llama", "bert", "roberta", "gpt2", "t5"]
SITES = {"houlsby": 2, "pfeiffer": 1, "parallel": 1}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("placement", list(SITES))
def test_inject_unchanged_count_and_live(arch, placement):
    model, layers = _build(arch)
    batch = _batch()
    with torch.no_grad():
        before = model(**batch).logits
    add_adapters(model, AdapterConfig(bottleneck=R, placement=placement, activation="gelu", scaling=2.0))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("adapter" in n for n in trainable)
    assert set(trainable) == set(adapter_state_dict(model))
    assert sum(p.numel() for p in trainable.values()) == layers * SITES[placement] * (2 * D * R + R + D)
    with torch.no_grad(), peftkern.use_backend("triton"):
        assert torch.equal(model(**batch).logits, before), "a fresh adapter must leave the model unchanged"
        for p in trainable.values():
            p.normal_(0, 0.5)
        live = model(**batch).logits
    assert (live - before).abs().max() > 1e-3, "adapters are not on the forward path"
    with torch.no_grad(), peftkern.use_backend("torch"):
        torch.testing.assert_close(model(**batch).logits, live, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_training_reduces_loss(arch):
    model, _ = _build(arch)
    add_adapters(model, AdapterConfig(bottleneck=R, placement="houlsby" if arch != "t5" else "parallel"))
    model.train()
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-2)
    batch = _batch()
    losses = []
    with peftkern.use_backend("triton"):
        for _ in range(3):
            loss = model(**batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 0.02, losses
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base), "the base must stay frozen"


@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_save_load_roundtrip(arch, tmp_path):
    model, _ = _build(arch)
    add_adapters(model, AdapterConfig(bottleneck=R, placement="parallel", activation="silu", scaling=0.5))
    with torch.no_grad():
        for p in adapter_state_dict(model).values():
            p.normal_()
        want = model(**_batch()).logits
    save_adapters(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted([CONFIG_NAME, WEIGHTS_NAME])  # safetensors + JSON, no pickle

    fresh, _ = _build(arch)
    load_adapters(fresh, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**_batch()).logits, want, rtol=0, atol=0)
    assert [n for n, p in fresh.named_parameters() if p.requires_grad] == list(adapter_state_dict(fresh))
    load_adapters(fresh, tmp_path)  # into a model with the same adapters: fine

    other, _ = _build(arch)
    add_adapters(other, AdapterConfig(bottleneck=R + 1, placement="parallel", activation="silu", scaling=0.5))
    with pytest.raises(ValueError, match="were added with"):
        load_adapters(other, tmp_path)


def test_load_is_strict(tmp_path):
    from safetensors.torch import load_file, save_file

    model, _ = _build("gpt2")
    add_adapters(model, AdapterConfig(bottleneck=R))
    save_adapters(model, tmp_path)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    meta["peftkern_adapter"]["bottleneck"] = R // 2  # config says 4, tensors are r = 8
    (tmp_path / CONFIG_NAME).write_text(json.dumps(meta))
    fresh, _ = _build("gpt2")
    with pytest.raises(ValueError, match=r"has shape \(8, 48\) in .* but \(4, 48\) in the model"):
        load_adapters(fresh, tmp_path)
    assert not has_adapters(fresh), "a failed load must not leave half-loaded adapters behind"

    meta["peftkern_adapter"]["bottleneck"] = R
    (tmp_path / CONFIG_NAME).write_text(json.dumps(meta))
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    tensors.pop(sorted(tensors)[0])
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    with pytest.raises(ValueError, match="missing"):
        load_adapters(fresh, tmp_path)

    meta["peftkern_adapter"]["unknown_key"] = 1
    (tmp_path / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="unknown AdapterConfig keys"):
        load_adapters(fresh, tmp_path)


def test_parallel_is_fed_the_sublayer_input():
    """Llama FFN, parallel: mlp(x) = down_proj(act(gate(x)) * up(x)) + s · f(x)."""
    model, _ = _build("llama")
    add_adapters(model, AdapterConfig(bottleneck=R, placement="parallel", activation="silu", scaling=3.0))
    mlp = model.model.layers[1].mlp
    ad = mlp.down_proj.adapter
    with torch.no_grad():
        for p in ad.parameters():
            p.normal_()
    seen = {}
    mlp.register_forward_hook(lambda m, a, out: seen.update(x=a[0], out=out))
    with torch.no_grad():
        model(**_batch())
        x = seen["x"]
        inner = F.linear(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x), mlp.down_proj.weight)
        want = ref.bottleneck_adapter(x, ad.down_weight, ad.down_bias, ad.up_weight, ad.up_bias, inner, "silu", 3.0)
    torch.testing.assert_close(seen["out"], want)


def test_houlsby_is_before_the_post_layernorm():
    """BERT attention output, Houlsby: LayerNorm(a + s · f(a) + input) with a = dense(h)."""
    model, _ = _build("bert")
    add_adapters(model, AdapterConfig(bottleneck=R, placement="houlsby", activation="relu"))
    so = model.bert.encoder.layer[0].attention.output
    ad = so.dense.adapter
    with torch.no_grad():
        for p in ad.parameters():
            p.normal_()
    seen = {}
    so.register_forward_hook(lambda m, a, out: seen.update(h=a[0], inp=a[1], out=out))
    with torch.no_grad():
        model(**_batch())
        a = F.linear(seen["h"], so.dense.weight, so.dense.bias)
        want = so.LayerNorm(ref.bottleneck_adapter(a, ad.down_weight, ad.down_bias, ad.up_weight, ad.up_bias)
                            + seen["inp"])
    torch.testing.assert_close(seen["out"], want)


def test_remove_and_bad_uses():
    model, _ = _build("llama")
    batch = _batch()
    with torch.no_grad():
        before = model(**batch).logits
    add_adapters(model, AdapterConfig(bottleneck=R, placement="parallel"))
    with pytest.raises(ValueError, match="already has peftkern adapters"):
        add_adapters(model, AdapterConfig(bottleneck=R))
    with torch.no_grad():
        for p in adapter_state_dict(model).values():
            p.normal_()
    remove_adapters(model)
    assert not has_adapters(model) and not adapter_state_dict(model)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, before)
    with pytest.raises(ValueError, match="no supported transformer layers"):
        add_adapters(torch.nn.Sequential(torch.nn.Linear(4, 4)), AdapterConfig())
    with pytest.raises(TypeError, match="AdapterConfig"):
        add_adapters(model, {"bottleneck": 8})
    for bad, match in ((dict(placement="serial"), "placement"), (dict(bottleneck=0), "bottleneck"),
                       (dict(activation="tanh"), "activation"), (dict(sites=("mlp",)), "sites"),
                       (dict(dtype="float64"), "dtype")):
        with pytest.raises(ValueError, match=match):
            AdapterConfig(**bad)
    with pytest.raises(ValueError, match="no peftkern adapters to save"):
        save_adapters(model, "/nonexistent/never-written")


def test_sites_override_and_fp32_adapters_on_half_model():
    """Parallel adapters beside attention and FFN; fp32 adapters on an fp16 model keep its dtype."""
    model, layers = _build("llama")
    model.half()
    add_adapters(model, AdapterConfig(bottleneck=R, placement="parallel", sites=("attn", "ffn"), dtype="float32"))
    params = adapter_state_dict(model)
    assert len(params) == layers * 2 * 4 and all(p.dtype == torch.float32 for p in params.values())
    with torch.no_grad():
        for p in params.values():
            p.normal_(0, 0.1)
    with peftkern.use_backend("triton"):
        out = model(**_batch())
        out.loss.backward()
    assert out.logits.dtype == torch.float16 and torch.isfinite(out.loss)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params.values())


def test_parallel_on_half_t5_with_fp32_output_projection():
    """transformers keeps T5's FFN output projection (wo) in fp32 in a half model: the parallel adapter
    gets an fp16 sublayer input and an fp32 residual, and answers in the residual's dtype."""
    model, _ = _build("t5")
    model.half()
    for block in (*model.encoder.block, *model.decoder.block):
        block.layer[-1].DenseReluDense.wo.float()
    add_adapters(model, AdapterConfig(bottleneck=R, placement="parallel"))
    ids = _batch()["input_ids"]
    with peftkern.use_backend("torch"):
        out = model(input_ids=ids, decoder_input_ids=ids).logits
    assert torch.isfinite(out).all()


def test_saved_names_do_not_depend_on_wrappers(tmp_path):
    """Adapters saved through torch.compile's wrapper, or from a model wrapping the one they were added
    to, load into the bare model (names are relative to the module add_adapters was called on)."""
    model, _ = _build("llama")
    add_adapters(model, AdapterConfig(bottleneck=R))
    with torch.no_grad():
        for p in adapter_state_dict(model).values():
            p.normal_()
    save_adapters(torch.compile(model), tmp_path / "compiled")
    outer = torch.nn.Sequential(model)  # a wrapper around the adapted model
    save_adapters(outer, tmp_path / "outer")
    for sub in ("compiled", "outer"):
        fresh, _ = _build("llama")
        load_adapters(fresh, tmp_path / sub)
        got, want = adapter_state_dict(fresh), adapter_state_dict(model)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_failures_leave_the_model_as_it_was(tmp_path):
    llama, _ = _build("llama")
    add_adapters(llama, AdapterConfig(bottleneck=R, sites=("ffn", "attn")))
    save_adapters(llama, tmp_path)
    gpt2, _ = _build("gpt2")
    with pytest.raises(ValueError, match="do not match"):
        load_adapters(gpt2, tmp_path)
    assert not has_adapters(gpt2) and all(p.requires_grad for p in gpt2.parameters())
    fresh, _ = _build("llama")  # same sites in another order: the same adapters
    add_adapters(fresh, AdapterConfig(bottleneck=R, sites=("attn", "ffn")))
    load_adapters(fresh, tmp_path)
