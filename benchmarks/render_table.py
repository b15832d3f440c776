#!/usr/bin/env python3
"""Render the benchmark JSON that `peftkern bench --json` writes as a markdown performance table.

    python benchmarks/render_table.py                      # print the table for benchmarks/results/*.json
    python benchmarks/render_table.py --write README.md    # replace the block between the markers
    python benchmarks/render_table.py --check README.md    # exit 1 if README's block is stale or hand-edited

The README carries no hand-typed numbers: its table lives between
``<!-- perf-table:start -->`` and ``<!-- perf-table:end -->`` and is regenerated from the committed
results. Per op and case, each peftkern provider that ran gets a row with its median time, every
baseline's median (same process, same inputs) and the speedup = baseline median / peftkern median,
plus the bytes saved for backward (peftkern vs peft; for prefix, peft's expand + cat + SDPA path).
By default the newest result per device is shown per set of ops; ``--all`` shows every file.

Only results whose provenance is known are rendered: a file whose commit or preset is unknown (missing,
"unknown", "?", empty) is refused when named on the command line (exit 2) and left out, with a note on
stderr, when read from the default glob. A peftkern row that failed its elementwise check (an "error"
row) shows as an error, never as a time.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

START = "<!-- perf-table:start -->"
END = "<!-- perf-table:end -->"
MODES = ("full", "fwd", "bwd")
PREFERRED = ("peft", "eager", "peft+compile", "base")  # baseline column order
# Row fields that are results, not the case's shape.
_RESULT_KEYS = {"op", "case", "provider", "dtype", "fwd", "bwd", "full", "speedup", "saved_bytes", "peak_bytes",
                "y_checksum", "flops_fwd", "bytes_fwd_min", "skipped", "error", "check", "loss_first_step",
                "tokens_per_s", "fused_layers", "note"}
UNKNOWN = {"", "unknown", "?", "none", "null"}
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_GLOB = os.path.join(HERE, "results", "*.json")


def load(paths: list[str]) -> list[dict]:
    """Each results file as a dict, with its path under "_path"; unreadable files raise ValueError."""
    out = []
    for p in paths:
        try:
            with open(p) as f:
                d = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{p}: cannot read benchmark JSON ({e})") from e
        if not isinstance(d, dict) or "env" not in d or "rows" not in d:
            raise ValueError(f"{p}: not a `peftkern bench --json` file (needs 'env' and 'rows')")
        d["_path"] = p
        out.append(d)
    return out


def provenance_problem(result: dict) -> str | None:
    """Why a results file cannot be shown (its commit or preset is unknown), or None."""
    commit = str(result.get("env", {}).get("commit") or "").strip()
    preset = str(result.get("preset") or "").strip()
    bad = []
    if commit.lower() in UNKNOWN:
        bad.append(f"commit {commit or 'missing'!r}")
    if preset.lower() in UNKNOWN:
        bad.append(f"preset {preset or 'missing'!r}")
    if not bad:
        return None
    where = os.path.relpath(result["_path"]) if result.get("_path") else "results"
    return (f"{where}: {' and '.join(bad)} unknown: numbers that cannot be traced to "
            "a commit and a preset are not rendered (rerun; gpu_check.sh takes PEFTKERN_COMMIT=<hash> where the "
            "tree travels without .git)")


def newest_per_device(results: list[dict]) -> list[dict]:
    """The newest file per device and set of ops (one op's run does not hide another's)."""
    best: dict[str, dict] = {}
    for r in results:
        ops = ",".join(sorted({row.get("op", "?") for row in r["rows"]}))
        key = f"{r['env'].get('device')}|{r['env'].get('device_type')}|{ops}"
        if key not in best or r["env"].get("time", "") > best[key]["env"].get("time", ""):
            best[key] = r
    return sorted(best.values(), key=lambda r: r["env"].get("time", ""), reverse=True)


def _ms(x: float) -> str:
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    if x >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def _bytes(n) -> str:
    if n is None:
        return "-"
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    if n >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    if n >= 2**10:
        return f"{n / 2**10:.0f} KiB"
    return f"{n} B"


def _checked_note(rows: list[dict]) -> str:
    """Says so when peftkern rows posted times without an elementwise check (files from before the check)."""
    timed = [r for r in rows if r["provider"].startswith("peftkern") and any(m in r for m in MODES)]
    unchecked = [r for r in timed if "check" not in r]
    if not unchecked:
        return ""
    return ("; **peftkern outputs not checked elementwise** (recorded before `peftkern bench` checked them: "
            "only mean |y| within 2% of the baseline's)") if len(unchecked) == len(timed) else (
        f"; {len(unchecked)} of {len(timed)} peftkern rows not checked elementwise")


def _spread(t: dict) -> str:
    """The 20th-80th percentile range of a timing, and its sample count where recorded."""
    if "p20_ms" not in t or "p80_ms" not in t:
        return "-"
    return f"{_ms(t['p20_ms'])}-{_ms(t['p80_ms'])}" + (f" ({t['n']})" if t.get("n") else "")


def _shape(row: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in row.items()
                    if k not in _RESULT_KEYS and not isinstance(v, (dict, list, float)))


def _groups(rows: list[dict]) -> list[tuple[tuple[str, str], list[dict]]]:
    order: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        order.setdefault((r["op"], r["case"]), []).append(r)
    return list(order.items())


def table(result: dict) -> str:
    """One results file as a markdown table (with a header line naming device, commit and date)."""
    env = result["env"]
    rows = result["rows"]
    found = [r["provider"] for r in rows if not r["provider"].startswith("peftkern")]
    baselines = [b for b in PREFERRED if b in found] + list(dict.fromkeys(b for b in found if b not in PREFERRED))
    date = (env.get("time") or "")[:10] or "unknown date"
    versions = ", ".join(f"{k} {env[k]}" for k in ("torch", "triton", "cuda", "peft", "transformers") if env.get(k))
    lines = [f"**{env.get('device', '?')}** ({env.get('device_type', '?')}), commit `{env.get('commit', '?')}`, "
             f"{date}; preset `{result.get('preset', '?')}`{' (quick)' if result.get('quick') else ''}; {versions}; "
             f"from `{os.path.basename(result['_path'])}`{_checked_note(rows)}", ""]
    head = ["op", "case", "shape", "dtype", "mode", "peftkern", "ms"] + [f"{b} ms (speedup)" for b in baselines]
    head += ["saved for bwd (peftkern / peft)", "peftkern p20-p80 ms (samples)"]
    lines += ["| " + " | ".join(head) + " |",
              "|" + "---|" * 5 + "---|---:|" + "---:|" * len(baselines) + "---:|---:|"]
    for (op, case), group in _groups(rows):
        by = {r["provider"]: r for r in group}
        mode = next((m for m in MODES if any(m in r for r in group)), None)
        ran = [r for r in group if r["provider"].startswith("peftkern") and mode and mode in r and "error" not in r]
        failed = [r for r in group if r["provider"].startswith("peftkern") and "error" in r]
        first = group[0]
        lead = [op, case, _shape(first), str(first.get("dtype", "")), mode or "-"]
        for r in failed:  # a wrong (or crashed) kernel posts no time
            cells = [*lead, r["provider"].removeprefix("peftkern-"), "error"] + ["-"] * len(baselines)
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in [*cells, "-", r["error"][:160]]) + " |")
        if not ran:
            if failed:
                continue
            why = "; ".join(f"{r['provider']}: {r.get('skipped') or r.get('error')}" for r in group
                            if r["provider"].startswith("peftkern"))
            lines.append("| " + " | ".join([*lead, "none ran", "-"] + ["-"] * len(baselines) + ["-", why or "-"])
                         + " |")
            continue
        for r in ran:
            t = r[mode]["median_ms"]
            cells = [*lead, r["provider"].removeprefix("peftkern-"), _ms(t)]
            for b in baselines:
                br = by.get(b)
                if br is None:
                    cells.append("-")
                elif "skipped" in br or "error" in br:
                    cells.append("skipped" if "skipped" in br else "error")
                elif mode not in br:
                    cells.append("-")
                else:
                    bt = br[mode]["median_ms"]
                    cells.append(f"{_ms(bt)} ({bt / t:.2f}x)")
            peft_row = by.get("peft") or by.get("peft-sdpa") or {}  # prefix: peft's path is "peft-sdpa"
            saved = (f"{_bytes(r.get('saved_bytes'))} / {_bytes(peft_row.get('saved_bytes'))}"
                     if r.get("saved_bytes") is not None else "-")
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in [*cells, saved, _spread(r[mode])]) + " |")
    return "\n".join(lines)


def render(results: list[dict]) -> str:
    """The whole block that goes between the README markers."""
    out = ["<!-- generated by benchmarks/render_table.py from benchmarks/results/*.json: do not edit by hand -->"]
    if not results:
        out.append("No benchmark results committed yet: run `benchmarks/gpu_check.sh` on a GPU and commit the JSON "
                   "it writes to `benchmarks/results/`.")
        return "\n".join(out)
    out.append("Median milliseconds after warm-up (CUDA events, one per call, L2 flushed; on CPU, blocks of calls), "
               "with the 20th-80th percentile range and the number of samples; speedup = baseline median / "
               "peftkern median, measured in the same process on the same inputs; mode `full` = forward + "
               "backward. A peftkern time is shown only when the row passed its elementwise check (output and "
               "every gradient vs fp64 on the same inputs: error <= 2x torch's own in the same dtype + tiny).")
    for r in results:
        out += ["", table(r)]
    return "\n".join(out)


def splice(text: str, block: str, name: str = "README") -> str:
    """`text` with the content between the markers replaced by `block`."""
    i, j = text.find(START), text.find(END)
    if i < 0 or j < 0 or j < i:
        raise ValueError(f"{name} lacks the markers {START} ... {END} (in that order): add them where the "
                         "table belongs")
    return text[: i + len(START)] + "\n" + block + "\n" + text[j:]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="*", help="results JSON files (default: benchmarks/results/*.json)")
    ap.add_argument("--write", metavar="README", help="replace the marked block in this file")
    ap.add_argument("--check", metavar="README", help="exit 1 if this file's marked block differs from the render")
    ap.add_argument("--all", action="store_true", help="every file, not only the newest per device")
    args = ap.parse_args(argv)
    paths = args.paths or sorted(glob.glob(DEFAULT_GLOB))
    try:
        results = []
        for r in load(paths):
            why = provenance_problem(r)
            if why and args.paths:
                raise ValueError(f"refused {why}")
            if why:
                print(f"render_table: left out {why}", file=sys.stderr)
                continue
            results.append(r)
        block = render(results if args.all else newest_per_device(results))
        for target in filter(None, (args.write, args.check)):
            with open(target) as f:
                text = f.read()
            new = splice(text, block, target)
            if target == args.check:
                if new != text:
                    print(f"{target}: the perf table is stale or hand-edited; run "
                          f"`python benchmarks/render_table.py --write {target}`", file=sys.stderr)
                    return 1
                print(f"{target}: perf table up to date")
            else:
                with open(target, "w") as f:
                    f.write(new)
                print(f"wrote the perf table ({len(results)} result file(s)) into {target}")
    except ValueError as e:
        print(f"render_table: {e}", file=sys.stderr)
        return 2
    if not args.write and not args.check:
        print(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
