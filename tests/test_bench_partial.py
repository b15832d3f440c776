"""`peftkern bench e2e --json` saves after each case: a GPU call cut off by its time limit keeps what it measured."""

from __future__ import annotations

import json

import torch

from peftkern import cli
from peftkern.bench import e2e


def test_e2e_hands_rows_over_after_each_case(monkeypatch):
    seen = []
    once = lambda fn, device, quick, **kw: (fn(), {"median_ms": 1.0, "p20_ms": 1.0, "p80_ms": 1.0})[1]
    rows = e2e.run("tiny", torch.float32, torch.device("cpu"), True, once, lambda fn, d: None, lambda m: None, False,
                   partial=lambda part: seen.append(len(part)))
    assert seen == [len(rows)] and rows  # the quick preset has one case


def test_cli_writes_the_json_before_the_op_ends(tmp_path, monkeypatch):
    out = tmp_path / "r.json"
    written = []

    def fake_run(preset, dtype, device, quick, timeit, peak_bytes, progress, compile_baseline, partial=None):
        row = dict(op="e2e", case="c1", provider="peft", full={"median_ms": 1.0, "p20_ms": 1.0, "p80_ms": 1.0})
        partial([row])
        written.append(json.loads(out.read_text())["rows"])  # on disk while the op still runs
        return [row]

    monkeypatch.setattr(e2e, "run", fake_run)
    assert cli.main(["bench", "e2e", "--device", "cpu", "--json", str(out)]) == 0
    assert written and written[0][0]["case"] == "c1"
