"""load_adapters on damaged or mismatched files: a clear ValueError naming the problem, and the model
exactly as it was before the call (parameters, requires_grad flags, hooks, adapters or none)."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from _util import DEVICE

from peftkern.integrations.adapters import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    AdapterConfig,
    adapter_state_dict,
    add_adapters,
    has_adapters,
    load_adapters,
    save_adapters,
)

transformers = pytest.importorskip("transformers")
D, R = 48, 8


def _gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=97, n_embd=D, n_inner=80, n_layer=2, n_head=4, n_positions=64,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg).to(DEVICE).eval()


def _llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=D, intermediate_size=80, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).to(DEVICE).eval()


def _snapshot(model):
    hooks = [(n, len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()]
    return ({n: p.detach().clone() for n, p in model.named_parameters()},
            {n: p.requires_grad for n, p in model.named_parameters()}, hooks, has_adapters(model))


def _assert_unchanged(model, snap):
    params, flags, hooks, had = _snapshot(model)
    assert had == snap[3]
    assert flags == snap[1], "requires_grad flags changed"
    assert hooks == snap[2], "hooks added or removed"
    assert params.keys() == snap[0].keys(), "parameters added or removed"
    for n, p in params.items():
        assert torch.equal(p, snap[0][n]), f"{n} changed"


@pytest.fixture
def saved(tmp_path):
    """A GPT-2 with trained-looking (random) adapters saved to tmp_path."""
    model = _gpt2()
    add_adapters(model, AdapterConfig(bottleneck=R))
    with torch.no_grad():
        for p in adapter_state_dict(model).values():
            p.normal_()
    save_adapters(model, tmp_path)
    return tmp_path


def _targets():
    """A model without adapters, and one whose own (different) adapters must survive a failed load."""
    bare = _gpt2()
    withad = _gpt2()
    add_adapters(withad, AdapterConfig(bottleneck=R))
    with torch.no_grad():
        for p in adapter_state_dict(withad).values():
            p.uniform_(-1, 1)
    return [bare, withad]


def _drop_sha(folder):
    meta = json.loads((folder / CONFIG_NAME).read_text())
    del meta["weights_sha256"]
    (folder / CONFIG_NAME).write_text(json.dumps(meta))


def _expect_refused(folder, match):
    for model in _targets():
        snap = _snapshot(model)
        with pytest.raises(ValueError, match=match):
            load_adapters(model, folder)
        _assert_unchanged(model, snap)


def test_roundtrip_records_and_checks_the_weights_sha256(saved):
    meta = json.loads((saved / CONFIG_NAME).read_text())
    assert len(meta["weights_sha256"]) == 64
    model = _gpt2()
    load_adapters(model, saved)
    assert has_adapters(model)


@pytest.mark.parametrize("with_sha", [True, False], ids=["sha256", "no-sha256"])
def test_truncated_weights(saved, with_sha):
    w = saved / WEIGHTS_NAME
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    if not with_sha:  # a config written before checksums were recorded: safetensors itself must refuse it
        _drop_sha(saved)
    _expect_refused(saved, "sha256" if with_sha else "not a readable safetensors file")


def test_tampered_values_fail_the_checksum(saved):
    w = saved / WEIGHTS_NAME
    data = bytearray(w.read_bytes())
    data[-8:] = struct.pack("<2f", float("nan"), 1e30)  # the last tensor's last values: a valid file still
    w.write_bytes(bytes(data))
    _expect_refused(saved, "sha256")


def test_tampered_header(saved):
    """Header edits with the checksum gone: a broken header, and a dtype turned to int, are refused."""
    _drop_sha(saved)
    w = saved / WEIGHTS_NAME
    data = w.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = data[8:8 + n]
    assert b'"F32"' in header
    w.write_bytes(data[:8] + header.replace(b'"F32"', b'"I32"') + data[8 + n:])
    _expect_refused(saved, "not floating point")
    w.write_bytes(data[:8] + header[: n // 2] + b"}" * (n - n // 2) + data[8 + n:])
    _expect_refused(saved, "not a readable safetensors file")


@pytest.mark.parametrize("damage", ["truncated", "not-json", "not-a-dict", "bad-activation", "bad-scaling"])
def test_damaged_config(saved, damage):
    c = saved / CONFIG_NAME
    text = c.read_text()
    meta = json.loads(text)
    if damage == "truncated":
        c.write_text(text[: len(text) // 2])
        match = "not valid JSON"
    elif damage == "not-json":
        c.write_bytes(b"\xff\xfe\x00garbage")
        match = "not valid JSON"
    elif damage == "not-a-dict":
        c.write_text(json.dumps({"peftkern_adapter": [1, 2]}))
        match = "not a peftkern adapter config"
    elif damage == "bad-activation":
        meta["peftkern_adapter"]["activation"] = "nope"
        c.write_text(json.dumps(meta))
        match = "invalid adapter config: activation"
    else:
        meta["peftkern_adapter"]["scaling"] = "big"
        c.write_text(json.dumps(meta))
        match = "invalid adapter config: scaling"
    _expect_refused(saved, match)


def test_config_for_another_model(tmp_path):
    """Adapters saved from a Llama loaded into a GPT-2 of the same width: every name differs."""
    llama = _llama()
    add_adapters(llama, AdapterConfig(bottleneck=R))
    save_adapters(llama, tmp_path)
    _expect_refused(tmp_path, r"do not match the model \(saved from a LlamaForCausalLM, loading into a "
                              r"GPT2LMHeadModel\)")


def test_config_that_disagrees_with_the_tensors(saved):
    meta = json.loads((saved / CONFIG_NAME).read_text())
    meta["peftkern_adapter"]["bottleneck"] = R * 2
    (saved / CONFIG_NAME).write_text(json.dumps(meta))
    model = _gpt2()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"has shape \(8, 48\) in .* but \(16, 48\) in the model"):
        load_adapters(model, saved)
    _assert_unchanged(model, snap)
    # A model that already has adapters of the saved shape but the config now says otherwise: refused first.
    withad = _targets()[1]
    snap = _snapshot(withad)
    with pytest.raises(ValueError, match="were added with"):
        load_adapters(withad, saved)
    _assert_unchanged(withad, snap)
