"""The `peftkern` command on CPU: bench (every op, quick), --json, --plot, info, bad arguments."""

import json

import pytest

from peftkern import cli


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
