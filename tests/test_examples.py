"""The shipped example runs end to end for each method (a few CPU steps, torch backend), and with
prefix tuning (no dropout) the accelerated run's losses equal peft's to print precision."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("peft")
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "finetune.py"


def _main():
    spec = importlib.util.spec_from_file_location("peftkern_example_finetune", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


@pytest.mark.parametrize("method", ["lora", "prefix"])
def test_finetune_example_runs(method, capsys):
    args = ["--method", method, "--steps", "4", "--log-every", "2", "--hidden", "64", "--seq", "32",
            "--batch", "4", "--backend", "torch"]
    assert _main()(args) == 0
    out = capsys.readouterr().out
    assert "median step" in out and "sample:" in out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["2"], ["4"])]
    assert len(rows) == 2
    if method == "prefix":
        assert all(r[1] == r[2] for r in rows), rows  # loss peft == loss peft+peftkern (4 decimals)
