"""benchmarks/render_table.py on a results JSON that `peftkern bench --json` writes in the test."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from peftkern import cli
from peftkern.bench import lora as bench_lora

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("render_table", os.path.join(ROOT, "benchmarks", "render_table.py"))
rt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rt)


@pytest.fixture(scope="module")
def bench_json(tmp_path_factory):
    """A real `peftkern bench lora --quick --json` run, on shapes small enough for a test."""
    path = tmp_path_factory.mktemp("bench") / "bench_cpu.json"
    mp = pytest.MonkeyPatch()
    mp.setitem(bench_lora.QUICK, "tiny", [bench_lora.Case("train", 24, 32, 16, 4, 0.1, True),
                                          bench_lora.Case("decode-m2", 2, 32, 16, 4, 0.0, False)])
    try:
        cli.main(["bench", "lora", "--quick", "--preset", "tiny", "--device", "cpu", "--json", str(path)])
    finally:
        mp.undo()
    return path


def test_render_has_env_and_ratios_from_the_json(bench_json):
    data = json.loads(bench_json.read_text())
    out = rt.render(rt.load([str(bench_json)]))
    env = data["env"]
    assert env["commit"] in out and env["time"][:10] in out and env["device"] in out and env["torch"] in out
    by = {(r["case"], r["provider"]): r for r in data["rows"]}
    lines = [ln for ln in out.splitlines() if ln.startswith("| lora | train |")]
    assert lines, out
    for ln in lines:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        prov = "peftkern-" + cells[5]
        t = by[("train", prov)]["full"]["median_ms"]
        peft_t = by[("train", "peft")]["full"]["median_ms"]
        assert cells[4] == "full" and cells[6] == rt._ms(t)
        assert f"{rt._ms(peft_t)} ({peft_t / t:.2f}x)" in cells  # the ratio comes from the medians
    assert any(ln.startswith("| lora | decode-m2 |") and "| fwd |" in ln for ln in out.splitlines())
    assert "skipped" in out  # peft+compile is skipped on CPU and says so


def test_write_and_check_readme(bench_json, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n{rt.START}\nold hand-typed 99.9x\n{rt.END}\nafter\n")
    assert rt.main(["--write", str(readme), str(bench_json)]) == 0
    text = readme.read_text()
    assert "99.9x" not in text and text.startswith("# title\n\nbefore\n") and text.endswith(f"{rt.END}\nafter\n")
    assert "| lora | train |" in text
    assert rt.main(["--write", str(readme), str(bench_json)]) == 0 and readme.read_text() == text  # idempotent
    assert rt.main(["--check", str(readme), str(bench_json)]) == 0
    readme.write_text(text.replace("| lora | train |", "| lora | train (edited) |"))
    assert rt.main(["--check", str(readme), str(bench_json)]) == 1


def test_missing_markers_and_bad_json(bench_json, tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    assert rt.main(["--write", str(readme), str(bench_json)]) == 2
    assert "markers" in capsys.readouterr().err and readme.read_text() == "# no markers\n"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"rows": []}))
    assert rt.main([str(bad)]) == 2


def test_newest_per_device(bench_json, tmp_path):
    data = json.loads(bench_json.read_text())
    old = dict(data, env=dict(data["env"], time="2000-01-01T00:00:00Z", commit="oldcommit"))
    other = dict(data, env=dict(data["env"], device="Other GPU", device_type="cuda"))
    paths = []
    for i, d in enumerate((old, data, other)):
        p = tmp_path / f"r{i}.json"
        p.write_text(json.dumps(d))
        paths.append(str(p))
    out = rt.render(rt.newest_per_device(rt.load(paths)))
    assert "oldcommit" not in out and "Other GPU" in out and data["env"]["commit"] in out
    assert "oldcommit" in rt.render(rt.load(paths))  # --all keeps it
    assert "No benchmark results" in rt.render([])
