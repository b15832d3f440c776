"""`peftkern bench` checks every peftkern row elementwise: a kernel that computes the wrong thing is an
error row (no time, no speedup, exit 1), however close its mean |y| is to the baseline's."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn.functional as F

from peftkern import _host_ext, cli
from peftkern.bench import _check, _table, _timing
from peftkern.bench import adapter as bench_adapter
from peftkern.bench import e2e as bench_e2e
from peftkern.bench import ia3 as bench_ia3
from peftkern.bench import lora as bench_lora
from peftkern.bench import prefix as bench_prefix
from peftkern.bench import qlora as bench_qlora
from peftkern.reference import adapter as ref_adapter
from peftkern.reference import ia3 as ref_ia3
from peftkern.reference import lora as ref_lora
from peftkern.reference import prefix as ref_prefix

SMALL_LORA = [bench_lora.Case("train", 24, 32, 16, 4, 0.1, True),
              bench_lora.Case("decode-m2", 2, 32, 16, 4, 0.0, False)]


def _bench(tmp_path, op, monkeypatch, quick_cases=None, module=None):
    monkeypatch.delenv("PEFTKERN_STRICT", raising=False)
    if quick_cases is not None:
        monkeypatch.setitem(module.QUICK, "tiny", quick_cases)
    path = tmp_path / f"{op}.json"
    rc = cli.main(["bench", op, "--quick", "--preset", "tiny", "--device", "cpu", "--json", str(path)])
    rows = json.loads(path.read_text())["rows"]
    return rc, {(r["case"], r["provider"]): r for r in rows}


def test_lora_rows_pass_their_check(tmp_path, monkeypatch):
    """The control: the real kernels pass, with a check entry for y and every gradient, and post speedups."""
    rc, rows = _bench(tmp_path, "lora", monkeypatch, SMALL_LORA, bench_lora)
    assert rc == 0
    train, decode = rows[("train", "peftkern-torch")], rows[("decode-m2", "peftkern-torch")]
    assert set(train["check"]) == {"y", "dx", "dA", "dB"} and set(decode["check"]) == {"y"}
    for r in (train, decode):
        assert "error" not in r and "speedup" in r
        for name, c in r["check"].items():
            assert c["err"] <= c["bound"], name


def _sabotage_fp32_path(monkeypatch):
    """fp32 calls on the torch backend take their own path (the host extension on the CPU, else
    lora_linear_fwd_fp32): make it the Python one and drop its LoRA term from y."""
    real = ref_lora.lora_linear_fwd_fp32

    def no_lora_term(x, weight, bias, *rest):
        _, *saved = real(x, weight, bias, *rest)  # ts and keep, as the backward expects them
        return F.linear(x.reshape(-1, x.shape[-1]), weight, bias), *saved

    monkeypatch.setattr(ref_lora, "lora_linear_fwd_fp32", no_lora_term)
    monkeypatch.setattr(_host_ext, "_state", {"module": None, "why": "off (a test sabotages the Python path)"})


def test_lora_kernel_without_the_lora_term_is_an_error_row(tmp_path, monkeypatch):
    """The torch backend's forward made to return x Wᵀ + b only: every peftkern LoRA row is an error, the
    baselines are not, and the command fails."""
    real = ref_lora.lora_linear_fwd

    def no_lora_term(x2d, weight, bias, lora_A, lora_B, scaling, p, seed, **kw):
        y, *rest = real(x2d, weight, bias, lora_A, lora_B, scaling, p, seed, **kw)  # rest: t (and keep)
        return F.linear(x2d, weight, bias).to(y.dtype), *rest

    monkeypatch.setattr(ref_lora, "lora_linear_fwd", no_lora_term)
    _sabotage_fp32_path(monkeypatch)
    rc, rows = _bench(tmp_path, "lora", monkeypatch, SMALL_LORA, bench_lora)
    assert rc == 1
    for case in ("train", "decode-m2"):
        bad = rows[(case, "peftkern-torch")]
        assert "elementwise check failed" in bad["error"] and "y max error" in bad["error"], bad
        assert bad["check"]["y"]["err"] > bad["check"]["y"]["bound"]
        assert "speedup" not in bad
        for base in ("peft", "eager", "base"):
            assert "error" not in rows[(case, base)]


def test_lora_backward_without_dA_is_an_error_row(tmp_path, monkeypatch):
    """Gradients are checked too: a backward that returns dA = 0 fails on dA alone."""
    real = ref_lora.lora_linear_bwd

    def zero_da(*args, **kw):
        dx, d_a, d_b = real(*args, **kw)
        return dx, (None if d_a is None else torch.zeros_like(d_a)), d_b

    monkeypatch.setattr(ref_lora, "lora_linear_bwd", zero_da)
    real32 = ref_lora.lora_linear_bwd_fp32  # fp32 calls: the Python twin of the host extension, sabotaged alike

    def zero_da32(*args, **kw):
        dx, d_a, d_b = real32(*args, **kw)
        return dx, (None if d_a is None else torch.zeros_like(d_a)), d_b

    monkeypatch.setattr(ref_lora, "lora_linear_bwd_fp32", zero_da32)
    monkeypatch.setattr(_host_ext, "_state", {"module": None, "why": "off (a test sabotages the Python path)"})
    rc, rows = _bench(tmp_path, "lora", monkeypatch, SMALL_LORA, bench_lora)
    bad = rows[("train", "peftkern-torch")]
    assert rc == 1 and "dA max error" in bad["error"]
    assert bad["check"]["y"]["err"] <= bad["check"]["y"]["bound"]
    assert "error" not in rows[("decode-m2", "peftkern-torch")]  # no backward there


def test_lora_check_uses_the_kernels_own_dropout_mask(tmp_path, monkeypatch):
    """The train case has dropout 0.1: it passes only because the reference takes the op's mask. With the
    torch backend's mask drawn from another seed, the same kernel fails."""
    real = bench_lora.keep_mask
    monkeypatch.setattr(bench_lora, "keep_mask", lambda backend, m, n, p, seed, device: real(backend, m, n, p, seed + 1,
                                                                                              device))
    rc, rows = _bench(tmp_path, "lora", monkeypatch, SMALL_LORA, bench_lora)
    assert rc == 1
    assert "elementwise check failed" in rows[("train", "peftkern-torch")]["error"]


def _scaled_first(real, factor=1.001):
    """`real` with its first output scaled by `factor` (0.1%: far inside the old 2% mean-|y| check)."""

    def wrong(*args, **kw):
        out = real(*args, **kw)
        if isinstance(out, tuple):
            return (out[0] * factor, *out[1:])
        return out * factor

    return wrong


@pytest.mark.parametrize("op,module,ref_mod,fn_name", [
    ("ia3", bench_ia3, ref_ia3, "ia3_linear_fwd"),
    ("adapter", bench_adapter, ref_adapter, "bottleneck_adapter_fwd"),
    ("prefix", bench_prefix, ref_prefix, "prefix_attention_fwd"),
])
def test_a_forward_off_by_a_tenth_of_a_percent_is_an_error_row(op, module, ref_mod, fn_name, tmp_path, monkeypatch):
    rc, rows = _bench(tmp_path, op, monkeypatch)
    assert rc == 0 and all("error" not in r for r in rows.values())  # the control
    monkeypatch.setattr(ref_mod, fn_name, _scaled_first(getattr(ref_mod, fn_name)))
    rc, rows = _bench(tmp_path, op, monkeypatch)
    ours = [r for (case, prov), r in rows.items() if prov == "peftkern-torch"]
    assert rc == 1 and ours
    for r in ours:
        assert "y max error" in r["error"] and "speedup" not in r


def test_e2e_row_is_checked_against_peft(tmp_path, monkeypatch):
    """The e2e rows compare logits and every trainable gradient with peft's (fp64 copy as the oracle): a
    LoRA forward without its LoRA term fails there too."""
    monkeypatch.setitem(bench_e2e.QUICK, "tiny", [bench_e2e.Case("tiny-quick", 32, 2, 64, 4, 2, 128, 16, 2)])
    rc, rows = _bench(tmp_path, "e2e", monkeypatch)
    good = rows[("tiny-quick", "peftkern-torch")]
    assert rc == 0 and "logits" in good["check"] and len(good["check"]) > 1
    assert all(c["err"] <= c["bound"] for c in good["check"].values())

    real = ref_lora.lora_linear_fwd
    monkeypatch.setattr(ref_lora, "lora_linear_fwd", lambda x2d, w, b, *a, **kw: (
        F.linear(x2d, w, b), *real(x2d, w, b, *a, **kw)[1:]))
    _sabotage_fp32_path(monkeypatch)
    rc, rows = _bench(tmp_path, "e2e", monkeypatch)
    bad = rows[("tiny-quick", "peftkern-torch")]
    assert rc == 1 and "logits max error" in bad["error"] and "speedup" not in bad


def _need_bnb():
    pytest.importorskip("bitsandbytes", reason="bench qlora needs bitsandbytes (without it its rows are skipped)")


def test_qlora_rows_pass_their_check(tmp_path, monkeypatch):
    """peft's lora.bnb.Linear4bit (NF4, double quantisation) and the same layer after peftkern.accelerate: the
    peftkern row is checked (y and every gradient vs fp64 on the dequantised weight, the op's own dropout mask),
    posts speedups, and keeps what peft's layer keeps at most, and at least its input (the weight is rebuilt in
    backward, not saved: a counter blind to the op's own saved_tensors_hooks would read 0 here)."""
    _need_bnb()
    rc, rows = _bench(tmp_path, "qlora", monkeypatch)
    assert rc == 0
    for case in ("train", "train-drop"):
        ours, peft_row, base = (rows[(case, p)] for p in ("peftkern-torch", "peft", "base"))
        assert set(ours["check"]) == {"y", "dx", "dA", "dB"} and "error" not in ours and "speedup" in ours
        for name, c in ours["check"].items():
            assert c["err"] <= c["bound"], name
        x_bytes = ours["m"] * ours["d_in"] * 4
        assert x_bytes <= ours["saved_bytes"] <= peft_row["saved_bytes"], case
        assert base["saved_bytes"] == 0 and all(m in base for m in ("fwd", "bwd", "full"))
        assert ours["quant"] == "nf4-dq" and "triton" in rows[(case, "peftkern-triton")]["skipped"].lower()
    drop = rows[("train-drop", "peftkern-torch")]
    assert drop["saved_bytes"] < rows[("train-drop", "peft")]["saved_bytes"]  # no fp32 drop(x) copy kept


def test_qlora_wrong_dequantisation_is_an_error_row(tmp_path, monkeypatch):
    """The torch backend's 4-bit dequantisation made 0.1% off: every peftkern QLoRA row fails its check (y), the
    baselines (bitsandbytes' own dequantisation) do not, and the command fails."""
    _need_bnb()
    import peftkern.reference.quant as ref_quant

    monkeypatch.setattr(ref_quant, "dequantize_4bit", _scaled_first(ref_quant.dequantize_4bit))
    rc, rows = _bench(tmp_path, "qlora", monkeypatch)
    assert rc == 1
    for case in ("train", "train-drop"):
        bad = rows[(case, "peftkern-torch")]
        assert "y max error" in bad["error"] and "speedup" not in bad, bad
        for base in ("peft", "base"):
            assert "error" not in rows[(case, base)]


def test_qlora_row_that_ran_peft_is_an_error_row(tmp_path, monkeypatch):
    """An accelerated layer falling back to peft's forward at call time computes the right numbers: the row is
    still an error (it did not time peftkern)."""
    _need_bnb()
    from peftkern.integrations import qlora as qlora_integration

    monkeypatch.setattr(qlora_integration, "_why_not_call", lambda *a: "forced fallback (test)")
    rc, rows = _bench(tmp_path, "qlora", monkeypatch)
    bad = rows[("train", "peftkern-torch")]
    assert rc == 1 and "did not run peftkern's dequantize_4bit" in bad["error"]
    assert all(c["err"] <= c["bound"] for c in bad["check"].values())  # peft's numbers are right


def test_qlora_rows_skipped_without_bitsandbytes(tmp_path, monkeypatch):
    """As on the GPU machine (no bitsandbytes): every row is skipped with the reason and the command passes."""
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
    rc, rows = _bench(tmp_path, "qlora", monkeypatch)
    from peftkern._backend import BACKENDS

    assert rc == 0 and len(rows) == len(bench_qlora.QUICK["tiny"]) * (len(bench_qlora.BASELINES) + len(BACKENDS))
    assert all("needs bitsandbytes" in r["skipped"] for r in rows.values())


# ------------------------------------------------------------------ the pieces


def test_rule_reports_each_tensor_and_fails_on_shape_and_nan():
    ref = {"y": torch.ones(3, dtype=torch.float64)}
    same = {"y": torch.ones(3) + 1e-4}
    ok = _check.rule({"y": torch.ones(3) + 1e-4}, ref, same)
    assert "error" not in ok and ok["check"]["y"]["err"] == pytest.approx(1e-4, rel=1e-3)
    assert "error" in _check.rule({"y": torch.ones(3) + 1e-3}, ref, same)
    assert "shape" in _check.rule({"y": torch.ones(4)}, ref, same)["error"]
    assert "error" in _check.rule({"y": torch.tensor([1.0, float("nan"), 1.0])}, ref, same)
    assert "error" in _check.rule({}, ref, same)


def test_provider_rows_check_peftkern_providers_only():
    seen = []

    def check(name, fn):
        seen.append(name)
        return {"check": {}} if name == "peftkern-good" else {"check": {}, "error": "elementwise check failed: y"}

    provs = {"peft": lambda: None, "peftkern-good": lambda: None, "peftkern-bad": lambda: None, "peftkern-x": "why"}
    rows = _timing.provider_rows("op", "c", {}, provs, lambda fn: {"fwd": {"median_ms": 1.0}}, lambda m: None,
                                 check=check)
    by = {r["provider"]: r for r in rows}
    assert seen == ["peftkern-good", "peftkern-bad"]
    assert "error" not in by["peftkern-good"] and by["peftkern-bad"]["error"].startswith("elementwise")
    assert by["peftkern-x"]["skipped"] == "why"
    with pytest.raises(TypeError):
        _timing.provider_rows("op", "c", {}, provs, lambda fn: {}, lambda m: None)  # check is required


def test_speedups_refuse_unchecked_and_failed_rows():
    t = {"median_ms": 2.0, "p20_ms": 2.0, "p80_ms": 2.0}
    rows = [dict(op="o", case="c", provider="base", fwd=t),
            dict(op="o", case="c", provider="peftkern-a", fwd=dict(t, median_ms=1.0), check={}),
            dict(op="o", case="c", provider="peftkern-b", fwd=dict(t, median_ms=1.0)),
            dict(op="o", case="c", provider="peftkern-c", fwd=dict(t, median_ms=1.0), check={}, error="wrong")]
    by = {r["provider"]: r for r in _table.speedups(rows, ("base",))}
    assert by["peftkern-a"]["speedup"]["fwd"]["base"] == 2.0
    assert "speedup" not in by["peftkern-b"] and "not checked elementwise" in by["peftkern-b"]["error"]
    assert "speedup" not in by["peftkern-c"]


def test_cpu_timing_reports_spread_and_samples():
    t = _timing.timeit(lambda: torch.ones(8).sum(), torch.device("cpu"), quick=True)
    assert t["n"] >= _timing.MIN_BLOCKS
    assert t["min_ms"] <= t["p20_ms"] <= t["median_ms"] <= t["p80_ms"] <= t["max_ms"]
    assert _timing.timeit(lambda: None, torch.device("cpu"), quick=True, min_samples=30)["n"] >= 30
