"""Speedup ratios and the text table shared by every op's benchmark.

A row is a dict: op, case, provider, shape fields, and per mode ("fwd", "bwd", "full") a dict
{median_ms, p20_ms, p80_ms}; optionally saved_bytes, peak_bytes; or "skipped"/"error" with a reason.
Rows whose provider starts with "peftkern" get speedup[mode][baseline] = baseline / peftkern time, once
their elementwise check (row["check"]) passed; a row with "error" never gets one.
"""

from __future__ import annotations

from . import _timing

MODES = ("fwd", "bwd", "full")


def speedups(rows: list[dict], baselines: tuple[str, ...]) -> list[dict]:
    """Adds speedups to the peftkern rows that ran and passed their elementwise check (bench/_check.py):
    a wrong kernel must not post a speedup. A measured peftkern row that carries no check at all is
    made an error row (an op benchmark that forgot to check cannot post numbers either)."""
    index = {(r["op"], r["case"], r["provider"]): r for r in rows}
    for r in rows:
        if not r["provider"].startswith("peftkern") or "skipped" in r or "error" in r:
            continue
        if "check" not in r:
            r["error"] = "not checked elementwise against a high-precision result (bench/_check.py)"
            continue
        for mode in MODES:
            if mode not in r:
                continue
            for base in baselines:
                b = index.get((r["op"], r["case"], base))
                if b and mode in b:
                    r.setdefault("speedup", {}).setdefault(mode, {})[base] = (
                        b[mode]["median_ms"] / r[mode]["median_ms"])
    return rows


def _fmt_bytes(n):
    if n is None:
        return "-"
    return f"{n / 2**20:.1f}M" if n >= 2**20 else f"{n / 2**10:.0f}K"


def table(rows: list[dict], baselines: tuple[str, ...]) -> str:
    w = max([12] + [len(r["case"]) + 2 for r in rows])
    wo = max([8] + [len(r["op"]) + 1 for r in rows])  # "overhead" must not run into its case
    lines = [f"{'op':<{wo}}{'case':<{w}}{'provider':<18}{'fwd ms':>9}{'bwd ms':>9}{'full ms':>9}{'saved':>9}"
             f"{'peak':>9}   speedup (full, else fwd) vs {' / '.join(baselines)}"]
    for r in rows:
        head = f"{r['op']:<{wo}}{r['case']:<{w}}{r['provider']:<18}"
        if "skipped" in r or "error" in r:
            lines.append(head + ("skipped: " + r["skipped"] if "skipped" in r else "ERROR: " + r["error"]))
            continue
        t = lambda m, r=r: (f"{'-':>9}" if m not in r else
                            f"{r[m]['median_ms']:8.3f}~" if _timing.noisy(r[m]) else f"{r[m]['median_ms']:9.3f}")
        sp = r.get("speedup", {}).get("full") or r.get("speedup", {}).get("fwd") or {}
        spd = " / ".join(f"{sp[b]:.2f}x" if b in sp else "-" for b in baselines)
        tok = f"   {r['tokens_per_s']:,.0f} tok/s" if "tokens_per_s" in r else ""
        lines.append(head + t("fwd") + t("bwd") + t("full") + f"{_fmt_bytes(r.get('saved_bytes')):>9}"
                     f"{_fmt_bytes(r.get('peak_bytes')):>9}   " + (spd if sp else "") + tok)
    if any("~" in line for line in lines[1:]):
        lines.append("~ the 20th-80th percentile spread is over 25% of the median (a busy machine?): "
                     "a ratio from that time is weak; rerun before trusting it")
    return "\n".join(lines)
