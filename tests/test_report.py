"""`peftkern report`: counts equal peft's own, the memory trace equals a real step, the CLI outputs."""

from __future__ import annotations

import argparse
import json
import sys
import warnings

import pytest
import torch

from peftkern import report as R

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _peft_count(config, peft_config) -> int:
    """peft's own count, on a model built here straight from transformers (not the report's builder)."""
    kind = R.model_kind(config)
    auto = {"encoder": transformers.AutoModel, "causal": transformers.AutoModelForCausalLM,
            "seq2seq": transformers.AutoModelForSeq2SeqLM}[kind]
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = auto.from_config(config)
        return peft.get_peft_model(model, peft_config).get_nb_trainable_parameters()[0]


def _count(config, method) -> int:
    return R.method_row(config, method, 1, 8, "float32", memory=False)["trainable"]


def test_lora_roberta_base_is_the_lora_paper_count():
    cfg = R.load_config("roberta-base")
    assert _count(cfg, "lora") == 294_912  # 12 layers x {query, value} x 8 x (768 + 768)
    assert _count(cfg, "prefix") == 20 * 12 * 2 * 768
    assert _count(cfg, "prompt") == 20 * 768


def test_lora_llama_7b_count():
    assert _count(R.load_config("llama-7b"), "lora") == 32 * 2 * 8 * (4096 + 4096)  # 4,194,304


@pytest.mark.parametrize("preset", ["roberta-base", "t5-base", "llama-7b"])
def test_counts_equal_peft(preset):
    cfg = R.load_config(preset)
    task = {"encoder": "FEATURE_EXTRACTION", "causal": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM"}[R.model_kind(cfg)]
    targets = {"roberta": ["query", "value"], "t5": ["q", "v"], "llama": ["q_proj", "v_proj"]}[cfg.model_type]
    expected = {
        "lora": peft.LoraConfig(r=8, target_modules=targets, task_type=task),
        "dora": peft.LoraConfig(r=8, target_modules=targets, task_type=task, use_dora=True),
        "ia3": peft.IA3Config(task_type=task),
        "prefix": peft.PrefixTuningConfig(num_virtual_tokens=20, task_type=task),
        "prompt": peft.PromptTuningConfig(num_virtual_tokens=20, task_type=task),
    }
    for method, pc in expected.items():
        assert _count(cfg, method) == _peft_count(cfg, pc), (preset, method)


@pytest.mark.parametrize("preset", ["roberta-base", "t5-base", "llama-7b"])
def test_meta_counts_equal_a_real_tiny_model(preset):
    """Counting on meta (the report's way) gives what a real model with weights gives."""
    cfg = R.scaled_down(R.load_config(preset))
    for method in R.METHOD_KEYS:
        if R.why_unavailable(method):  # QLoRA without bitsandbytes: test_qlora_* skip, saying why
            continue
        meta = _count(cfg, method)
        model, _ = R.apply_method(R.build_model(cfg, torch.float32, device="cpu", attn="sdpa"), cfg, method,
                                  R.Settings())
        assert R.trainable_parameters(model) == meta, (preset, method)
        assert all(p.device.type == "cpu" for p in model.parameters())


@pytest.mark.parametrize("preset", ["roberta-base", "t5-base"])
def test_adapter_counts_are_the_bottleneck_formula(preset):
    cfg = R.load_config(preset)
    d, r, blocks = cfg.hidden_size, 64, R.n_blocks(cfg)
    for method, sites in (("houlsby", 2), ("pfeiffer", 1), ("parallel", 1)):
        assert _count(cfg, method) == blocks * sites * (2 * d * r + r + d), method


def test_full_and_bitfit():
    cfg = R.load_config("roberta-base")
    base = sum(p.numel() for p in R.build_model(cfg).parameters())
    assert _count(cfg, "full") == base == 124_645_632
    biases = sum(p.numel() for n, p in R.build_model(cfg).named_parameters() if n.endswith(".bias"))
    assert _count(cfg, "bitfit") == biases > 0
    row = R.method_row(R.load_config("llama-7b"), "bitfit", 1, 8, "float32", memory=False)
    assert row["trainable"] == 0 and "has none" in row["setting"]


# A real training step on CPU saves exactly what the meta trace (target cpu) says, through peft / eager and,
# where the row says peftkern serves the model, through peftkern.accelerate / add_adapters.
@pytest.mark.parametrize("preset,methods", [
    ("roberta-base", ("full", "lora", "houlsby", "ia3", "prefix", "bitfit")),
    ("llama-7b", ("lora", "parallel", "ia3", "prefix")),
    ("t5-base", ("lora", "pfeiffer", "prompt")),
])
def test_estimate_equals_measured_on_cpu(preset, methods):
    cfg = R.scaled_down(R.load_config(preset), hidden=64, heads=2, ffn=128, vocab=256)
    settings = R.Settings()
    for method in methods:
        row = R.method_row(cfg, method, 2, 12, torch.float32, settings, target="cpu")
        est = row["memory"]
        got = R.measure_step(cfg, method, 2, 12, torch.float32, "cpu", settings)
        assert est["activations"] == got["activations"] > 0, (preset, method)
        assert est["total"] == got["total"], (preset, method)
        if row.get("served"):  # the real op on CPU saves what its fake kernel said on meta
            got_k = R.measure_step(cfg, method, 2, 12, torch.float32, "cpu", settings, peftkern=True)
            assert est["activations_peftkern"] == got_k["activations"], (preset, method)
            assert est["total_peftkern"] == got_k["total"], (preset, method)
            if method in ("lora", "prefix"):  # fp32: the adapters' and IA3's savings are half-dtype casts
                assert est["activations_peftkern"] < got["activations"], (preset, method)
        else:
            assert est["activations_peftkern"] == est["activations"], (preset, method)


def test_lora_saving_is_the_documented_formula():
    """target cuda, bf16 base, fp32 adapters, dropout 0.1: per adapted layer peft keeps a bool mask
    (M·in) and drop(x) in fp32 (4·M·in); peftkern keeps x once per block (2·M·in, shared by q and v)
    and an 8-byte seed per call; both keep xAᵀ. Block 0's input needs no grad: no mask there."""
    cfg = R.scaled_down(R.load_config("roberta-base"))
    b, s = 2, 16
    mem = R.method_row(cfg, "lora", b, s, "bfloat16", R.Settings(), target="cuda")["memory"]
    m, d, layers = b * s, cfg.hidden_size, cfg.num_hidden_layers
    expected = layers * (2 * (m * d * 1 + m * d * 4) - m * d * 2 - 2 * 8) - 2 * m * d * 1
    assert mem["activations"] - mem["activations_peftkern"] == expected


def test_cuda_target_models_bool_masks_and_flash():
    cfg = R.scaled_down(R.load_config("roberta-base"))
    cpu = R.method_row(cfg, "full", 2, 16, "float32", target="cpu")["memory"]["activations"]
    cuda = R.method_row(cfg, "full", 2, 16, "float32", target="cuda")["memory"]["activations"]
    assert cuda < cpu  # 1-byte masks and no attention matrices


def test_prefix_kernel_keeps_k_v_without_prefix():
    """Llama through peftkern.accelerate: K and V without the prefix and no mask; the prefix is one
    (2·layers, H, P, D) tensor for the whole batch."""
    cfg = R.scaled_down(R.load_config("llama-7b"))
    b, s, p = 2, 16, 20
    row = R.method_row(cfg, "prefix", b, s, "bfloat16", target="cuda")
    assert row["kernel"] == "prefix_attention" and row["served"] == row["sites"] == cfg.num_hidden_layers
    mem = row["memory"]
    h, dh = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    kv = 2 * b * h * dh * 2  # K and V per token, bf16
    mask = b * s * (p + s) * 2  # SDPA's additive mask per call (the kernel needs none)
    shared_prefix = 2 * h * p * dh * 2  # the op keeps the batch-shared prefix K, V
    assert mem["activations"] - mem["activations_peftkern"] == cfg.num_hidden_layers * (kv * p + mask - shared_prefix)


@pytest.mark.parametrize("preset,model_class", [("t5-base", "PeftModelForSeq2SeqLM"),
                                                ("roberta-base", "PeftModelForFeatureExtraction")])
def test_prefix_is_served_on_causal_lms_only(preset, model_class):
    """peftkern.accelerate takes causal-LM prefix models only: elsewhere no kernel, no saving, and why."""
    row = R.method_row(R.scaled_down(R.load_config(preset)), "prefix", 2, 8, "bfloat16", target="cuda")
    assert row["served"] == 0 and model_class in row["note"] and "only causal-LM" in row["note"]
    assert row["memory"]["activations_peftkern"] == row["memory"]["activations"]
    rep = {"model": "x", "config": R.config_summary(R.load_config(preset)), "base_params": 1, "batch": 2, "seq": 8,
           "dtype": "bfloat16", "target": "cuda", "rows": [row]}
    assert R.format_table(rep).splitlines()[3].split()[6] == "-"  # the kernel column


def _tiny_config(tmp_path, name, config):
    path = tmp_path / f"{name}.json"
    config.to_json_file(path)
    return str(path)


@pytest.mark.parametrize("family", ["xlm-roberta", "electra", "deberta-v2"])
def test_adapter_rows_are_what_add_adapters_serves(family, tmp_path):
    """XLM-R, ELECTRA, DeBERTa-v2: the report's adapter rows come from peftkern.add_adapters itself, which
    serves these models (a real tiny model takes the same adapters and trains)."""
    cls, extra = {"xlm-roberta": (transformers.XLMRobertaConfig, {}), "electra": (transformers.ElectraConfig, {}),
                  "deberta-v2": (transformers.DebertaV2Config, dict(relative_attention=True, max_relative_positions=16,
                                                                    pos_att_type=["p2c", "c2p"]))}[family]
    cfg = cls(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, vocab_size=256,
              **extra)
    rep = R.report(_tiny_config(tmp_path, family, cfg), batch=2, seq=8, methods=R.ADAPTERS)
    for row in rep["rows"]:
        assert row["served"] == row["sites"] == {"houlsby": 4, "pfeiffer": 2, "parallel": 2}[row["method"]], row
        assert row["memory"]["activations_peftkern"] < row["memory"]["activations"]
    import peftkern

    model = transformers.AutoModel.from_config(cfg)
    peftkern.add_adapters(model, peftkern.AdapterConfig(bottleneck=8))
    with peftkern.use_backend("torch"):
        model(input_ids=torch.randint(0, 256, (2, 8))).last_hidden_state.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_no_adapter_row_where_add_adapters_finds_no_blocks(tmp_path):
    """Mamba has no attention + feed-forward blocks: add_adapters refuses it, and so does the report."""
    cfg = transformers.MambaConfig(hidden_size=64, num_hidden_layers=2, vocab_size=256)
    rep = R.report(_tiny_config(tmp_path, "mamba", cfg), batch=2, seq=8, methods=("houlsby",), memory=False)
    (row,) = rep["rows"]
    assert "trainable" not in row and "no supported transformer layers" in row["note"]


def test_seq_longer_than_positions_is_a_note():
    row = R.method_row(R.load_config("roberta-base"), "prompt", 1, 500, "bfloat16")
    assert row["note"].startswith("n/a") and row["trainable"] == 15_360


def test_config_json_path_and_errors(tmp_path):
    cfg = R.scaled_down(R.load_config("llama-7b"))
    path = tmp_path / "config.json"
    path.write_text(cfg.to_json_string())
    loaded = R.load_config(str(path))
    assert loaded.model_type == "llama" and loaded.hidden_size == cfg.hidden_size
    with pytest.raises(ValueError, match="preset"):
        R.load_config("no-such-model")


def _cli(argv):
    ap = argparse.ArgumentParser(prog="peftkern")
    R.add_parser(ap.add_subparsers(dest="cmd", required=True))
    args = ap.parse_args(argv)
    return args.fn(args)


def test_cli_table_json_markdown_measure(tmp_path, capsys):
    cfg = R.scaled_down(R.load_config("roberta-base"), hidden=64, heads=2, ffn=128, vocab=256)
    path = tmp_path / "roberta-tiny.json"
    path.write_text(cfg.to_json_string())
    out = tmp_path / "report.json"
    common = ["report", "--model", str(path), "--batch", "2", "--seq", "8", "--methods", "lora", "ia3", "prompt"]
    assert _cli(common) == 0
    text = capsys.readouterr().out
    assert "lora_linear" in text and "ia3_linear" in text and "none needed" in text and "act. peftkern" in text
    assert _cli([*common, "--markdown", "--json", str(out), "--measure", "--device", "cpu", "--dtype",
                 "float32", "--target", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "| LoRA |" in text and "--measure" in text and "LoRA (peftkern)" in text
    rep = json.loads(out.read_text())
    assert [r["method"] for r in rep["rows"]] == ["lora", "ia3", "prompt"]
    lora = rep["rows"][0]
    assert lora["trainable"] == _count(cfg, "lora") and lora["kernel"] == "lora_linear"
    meas = rep["measure"]["rows"][0]
    assert meas["measured"]["activations"] == meas["estimate"]["activations"]  # fp32 on cpu: exact


def test_gpt2_conv1d_lora_ia3_adapters(tmp_path):
    """GPT-2 (Conv1D bases, (in, out) weights): LoRA r=8 on c_attn has peft's count (12 x 8 x (768 + 2304)),
    LoRA, IA3 and the adapters are served at every site. Prefix-tuning: peftkern.accelerate takes the model
    but prefix_attention has no attention dropout (GPT-2's attn_pdrop is 0.1), so the row says it is not
    served and why; with attn_pdrop 0 it is served."""
    from transformers import GPT2Config

    path = tmp_path / "gpt2.json"
    GPT2Config(n_embd=768, n_layer=12, n_head=12).to_json_file(path)
    rep = R.report(str(path), batch=2, seq=16, methods=("lora", "ia3", "houlsby", "prefix"))
    rows = {r["method"]: r for r in rep["rows"]}
    assert rows["lora"]["trainable"] == 294_912
    for m in ("lora", "ia3", "houlsby"):
        assert "note" not in rows[m] and rows[m]["served"] == rows[m]["sites"] > 0, (m, rows[m])
        assert rows[m]["memory"]["activations_peftkern"] < rows[m]["memory"]["activations"], m
    prefix = rows["prefix"]
    assert prefix["served"] == 0 and "attention dropout" in prefix["note"], prefix
    assert prefix["memory"]["activations_peftkern"] == prefix["memory"]["activations"]
    GPT2Config(n_embd=768, n_layer=12, n_head=12, attn_pdrop=0.0).to_json_file(path)
    (prefix,) = R.report(str(path), batch=2, seq=16, methods=("prefix",))["rows"]
    assert prefix["served"] == prefix["sites"] == 12 and "note" not in prefix, prefix


# ------------------------------------------------------------------ DoRA and QLoRA rows


def _bnb():
    return pytest.importorskip("bitsandbytes", reason="the QLoRA row needs bitsandbytes (the report leaves it out)")


def test_dora_count_is_lora_plus_the_magnitude_vectors():
    """DoRA trains LoRA's A and B plus one magnitude per output feature of each adapted layer (peft's count)."""
    for preset in ("roberta-base", "llama-7b"):
        cfg = R.load_config(preset)
        out_features = cfg.hidden_size  # q and v: hidden -> hidden (no GQA in these presets)
        assert _count(cfg, "dora") == _count(cfg, "lora") + R.n_blocks(cfg) * 2 * out_features, preset


def test_qlora_count_equals_peft_and_lora():
    _bnb()
    for preset in ("roberta-base", "t5-base", "llama-7b"):
        cfg = R.load_config(preset)
        assert _count(cfg, "qlora") == _count(cfg, "lora"), preset  # the same adapters, on 4-bit bases


def test_qlora_weights_are_nf4_packed_plus_quant_state():
    """Every linear layer but the output head becomes NF4 with double quantisation, as transformers loads
    load_in_4bit: 4 bits per weight, a uint8 absmax per 64 weights, an fp32 absmax per 256 of those, bitsandbytes'
    16- and 256-entry fp32 codes and one fp32 offset per layer; everything else stays in the model's dtype."""
    _bnb()
    cfg = R.scaled_down(R.load_config("llama-7b"), hidden=256, heads=4, ffn=512, vocab=1024)
    base = R.build_model(cfg, torch.bfloat16)
    linears = {n: m for n, m in base.named_modules() if type(m) is torch.nn.Linear and n != "lm_head"}
    assert len(linears) == 7 * cfg.num_hidden_layers
    per_layer = 0
    for m in linears.values():
        n = m.weight.numel()
        blocks = -(-n // 64)
        per_layer += n // 2 + blocks + 4 * -(-blocks // 256) + 4 * (16 + 256 + 1)
    other = sum(p.numel() * 2 for name, p in base.named_parameters() if name.rpartition(".")[0] not in linears)
    lora = R.method_row(cfg, "lora", 2, 8, "bfloat16", target="cuda")
    qlora = R.method_row(cfg, "qlora", 2, 8, "bfloat16", target="cuda")
    adapters = 4 * lora["trainable"]  # fp32, as peft keeps them
    assert qlora["memory"]["weights"] == other + per_layer + adapters
    assert lora["memory"]["weights"] == sum(p.numel() * 2 for p in base.parameters()) + adapters
    assert "NF4" in qlora["setting"] and "not lm_head" in qlora["setting"]


def test_qlora_keeps_what_lora_keeps():
    """peft's 4-bit layer saves nothing for backward that peft's nn.Linear layer does not (bitsandbytes keeps the
    packed weight), and peftkern's 4-bit op keeps what its LoRA op keeps: the dequantised weight is rebuilt in
    backward, not saved (counted, it would add 2 bytes per base weight of each adapted layer)."""
    _bnb()
    cfg = R.scaled_down(R.load_config("llama-7b"))
    lora = R.method_row(cfg, "lora", 2, 16, "bfloat16", target="cuda")
    qlora = R.method_row(cfg, "qlora", 2, 16, "bfloat16", target="cuda")
    assert qlora["served"] == qlora["sites"] == lora["sites"] == 2 * cfg.num_hidden_layers and "note" not in qlora
    for key in ("activations", "activations_peftkern"):
        assert qlora["memory"][key] == lora["memory"][key], key
    assert qlora["memory"]["activations_peftkern"] < qlora["memory"]["activations"]


# The DoRA and QLoRA rows against a real training step on CPU, as test_estimate_equals_measured_on_cpu does for the
# others: peft's path and, the rows saying peftkern serves every site, peftkern's (fp32, dropout 0.1).
@pytest.mark.parametrize("method", ["dora", "qlora"])
@pytest.mark.parametrize("preset", ["roberta-base", "llama-7b", "t5-base"])
def test_dora_qlora_estimate_equals_measured_on_cpu(preset, method):
    if method == "qlora":
        _bnb()
    cfg = R.scaled_down(R.load_config(preset), hidden=64, heads=2, ffn=128, vocab=256)
    settings = R.Settings()
    row = R.method_row(cfg, method, 2, 12, torch.float32, settings, target="cpu")
    assert row["served"] == row["sites"] > 0 and "note" not in row, row
    est = row["memory"]
    got = R.measure_step(cfg, method, 2, 12, torch.float32, "cpu", settings)
    got_k = R.measure_step(cfg, method, 2, 12, torch.float32, "cpu", settings, peftkern=True)
    for key in ("weights", "grads", "optimizer", "activations", "total"):
        assert est[key] == got[key], key
        assert est.get(f"{key}_peftkern", est[key]) == got_k[key], key
    assert est["activations_peftkern"] < est["activations"]


def test_qlora_row_is_absent_with_the_reason_without_bitsandbytes(monkeypatch, capsys):
    """bitsandbytes not importable (as on the GPU machine): no QLoRA row, a line saying why, and the other rows."""
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
    cfg = R.scaled_down(R.load_config("llama-7b"), hidden=64, heads=2, ffn=128, vocab=256)
    assert "bitsandbytes" in R.why_unavailable("qlora") and R.why_unavailable("dora") is None
    row = R.method_row(cfg, "qlora", 2, 8, "float32")
    assert set(row) == {"method", "name", "kernel", "absent"}
    rep = R.report("llama-7b", batch=2, seq=8, methods=("lora", "qlora"), memory=False)
    assert [r["method"] for r in rep["rows"]] == ["lora"] and "bitsandbytes" in rep["absent"]["qlora"]
    assert "QLoRA: no row: needs bitsandbytes" in R.format_table(rep)
    assert _cli(["report", "--model", "llama-7b", "--batch", "2", "--seq", "8", "--methods", "qlora"]) == 0
    assert "QLoRA: no row: needs bitsandbytes" in capsys.readouterr().out


def test_cli_dora_qlora_rows_and_measure(tmp_path, capsys):
    methods = ["dora"] + (["qlora"] if R.why_unavailable("qlora") is None else [])
    cfg = R.scaled_down(R.load_config("llama-7b"), hidden=64, heads=2, ffn=128, vocab=256)
    path = tmp_path / "llama-tiny.json"
    path.write_text(cfg.to_json_string())
    out = tmp_path / "report.json"
    assert _cli(["report", "--model", str(path), "--batch", "2", "--seq", "8", "--methods", *methods, "--json",
                 str(out), "--measure", "--device", "cpu", "--dtype", "float32", "--target", "cpu"]) == 0
    text = capsys.readouterr().out
    rep = json.loads(out.read_text())
    assert [r["method"] for r in rep["rows"]] == methods
    for r, m in zip(rep["measure"]["rows"], methods):
        assert r["measured"]["total"] == r["estimate"]["total"] and "measured_peftkern" in r, m
    assert "DoRA" in text and "dora_linear" in text and "DoRA (peftkern)" in text
    if "qlora" in methods:
        assert "QLoRA (peftkern)" in text and "dequantize_4bit + lora_linear" in text
