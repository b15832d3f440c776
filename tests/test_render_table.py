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
    mp.setenv("PEFTKERN_COMMIT", "0123abc")  # the tree may travel without .git (a GPU machine): a known commit
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


@pytest.mark.parametrize("field,value", [("commit", "unknown"), ("commit", "?"), ("commit", None), ("preset", "?"),
                                         ("preset", None)])
def test_unknown_commit_or_preset_is_refused(bench_json, tmp_path, capsys, field, value):
    data = json.loads(bench_json.read_text())
    if field == "commit":
        data["env"] = {k: v for k, v in data["env"].items() if k != "commit" or value is not None}
        if value is not None:
            data["env"]["commit"] = value
    else:
        data = {k: v for k, v in data.items() if k != "preset" or value is not None}
        if value is not None:
            data["preset"] = value
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    assert rt.main([str(bad)]) == 2
    err = capsys.readouterr().err
    assert "refused" in err and f"{field} " in err and "unknown" in err
    readme = tmp_path / "README.md"
    readme.write_text(f"{rt.START}\n{rt.END}\n")
    assert rt.main(["--write", str(readme), str(bad)]) == 2 and readme.read_text() == f"{rt.START}\n{rt.END}\n"


def test_default_glob_leaves_unknown_results_out(bench_json, tmp_path, capsys, monkeypatch):
    data = json.loads(bench_json.read_text())
    (tmp_path / "good.json").write_text(json.dumps(data))
    (tmp_path / "old.json").write_text(json.dumps(dict(data, env=dict(data["env"], commit="unknown",
                                                                       device="Old GPU"))))
    monkeypatch.setattr(rt, "DEFAULT_GLOB", str(tmp_path / "*.json"))
    assert rt.main([]) == 0
    out, err = capsys.readouterr()
    assert data["env"]["device"] in out and "Old GPU" not in out
    assert "left out" in err and "old.json" in err


def test_error_rows_show_no_time(bench_json, tmp_path):
    data = json.loads(bench_json.read_text())
    for r in data["rows"]:
        if r["provider"] == "peftkern-torch" and r["case"] == "train":
            r["error"] = "elementwise check failed: y max error 1 > bound"
            t = r["full"]["median_ms"]
    out = rt.render(rt.load([_write(tmp_path / "e.json", data)]))
    line = next(ln for ln in out.splitlines() if ln.startswith("| lora | train |") and "| torch |" in ln)
    assert "| error |" in line and "elementwise check failed" in line and rt._ms(t) not in line.split("|")[7]


def test_spread_and_unchecked_note(bench_json, tmp_path):
    data = json.loads(bench_json.read_text())
    out = rt.render(rt.load([str(bench_json)]))
    r = next(r for r in data["rows"] if r["provider"] == "peftkern-torch" and r["case"] == "train")
    assert f"{rt._ms(r['full']['p20_ms'])}-{rt._ms(r['full']['p80_ms'])} ({r['full']['n']})" in out
    assert "not checked elementwise" not in out
    for r in data["rows"]:
        r.pop("check", None)
    assert "not checked elementwise" in rt.render(rt.load([_write(tmp_path / "u.json", data)]))


def _write(path, data) -> str:
    path.write_text(json.dumps(data))
    return str(path)
