"""The `peftkern` command on CPU: bench (every op, quick), --json, --plot, info, bad arguments."""

import json

import pytest

from peftkern import cli
from peftkern.bench import qlora as bench_qlora


def test_bench_all_quick_json_and_plot(tmp_path, capsys, monkeypatch):
    # The CLI must not depend on the test suite's strict mode or interpreter: run as a user would.
    monkeypatch.delenv("PEFTKERN_STRICT", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # a CPU user's run: no interpreted Triton rows
    out = tmp_path / "r.json"
    png = tmp_path / "r.png"
    plot = ["--plot", str(png)] if _has_matplotlib() else []
    rc = cli.main(["bench", "all", "--quick", "--device", "cpu", "--json", str(out), *plot])
    text = capsys.readouterr().out
    assert rc == 0, text
    data = json.loads(out.read_text())
    assert {"device", "commit", "torch", "triton", "peftkern"} <= set(data["env"])
    ops = {r["op"] for r in data["rows"]}
    assert ops == set(cli.OPS)
    for op in cli.OPS:  # every op has at least one measured peftkern row beside a measured baseline
        if op == "qlora" and bench_qlora.bnb_why_not():  # no bitsandbytes: every row skipped, saying why
            assert all("needs bitsandbytes" in r["skipped"] for r in data["rows"] if r["op"] == op)
            continue
        measured = [r for r in data["rows"] if r["op"] == op and "skipped" not in r and "error" not in r]
        assert any(r["provider"].startswith("peftkern") for r in measured), op
        assert any(not r["provider"].startswith("peftkern") for r in measured), op
    assert any("speedup" in r for r in data["rows"])
    for r in data["rows"]:
        for mode in ("fwd", "bwd", "full"):
            if mode in r:
                assert 0 < r[mode]["p20_ms"] <= r[mode]["median_ms"] <= r[mode]["p80_ms"]
    if plot:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _has_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_info(capsys):
    assert cli.main(["info"]) == 0
    text = capsys.readouterr().out
    assert "torch" in text and "triton" in text and "CUDA extension" in text


def test_unknown_op_is_an_error(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "lorax"])
    assert "unknown op" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["bench", "--json", "/nonexistent-peftkern-dir/r.json"], "does not exist"),
    (["bench", "--plot", "/nonexistent-peftkern-dir/r.png"], "does not exist"),
    (["bench", "--device", "gpu"], "expected cpu, cuda or cuda:N"),
    (["report", "--model", "llama-7b", "--batch", "0"], "positive integer"),
    (["report", "--model", "llama-7b", "--json", "/nonexistent-peftkern-dir/r.json"], "does not exist"),
])
def test_bad_arguments_fail_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_cuda_device_without_a_gpu_is_an_argument_error(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        cli.main(["bench", "--device", "cuda"])
    assert "no CUDA device here" in capsys.readouterr().err


@pytest.mark.parametrize("content,message", [("{bad", "cannot read a config JSON"),
                                             ('{"model_type": "no-such-model"}', "unknown to transformers")])
def test_report_bad_config_files(tmp_path, content, message, capsys):
    path = tmp_path / "config.json"
    path.write_text(content)
    assert cli.main(["report", "--model", str(tmp_path), "--methods", "lora"]) == 2  # a folder holding config.json
    assert message in capsys.readouterr().err
