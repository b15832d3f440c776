"""The report and `--measure` as text or markdown tables."""

from __future__ import annotations

from .presets import BY_KEY


def fmt_bytes(n) -> str:
    if n is None:
        return "-"
    if n == 0:
        return "0"
    if abs(n) >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    if abs(n) >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**10:.1f} KiB"


def _pct(p) -> str:
    return "-" if p is None else (f"{p:.3g}%" if p < 100 else f"{p:.0f}%")


COLS = ("method", "setting", "trainable", "% model", "kernel", "weights", "grads", "AdamW", "activations",
        "act. peftkern", "total", "total peftkern", "saved")
_RIGHT = {2, 3, 5, 6, 7, 8, 9, 10, 11}


def _kernel(row: dict) -> str:
    """The op serving the method; "(k/n)" when it serves only k of n sites, "-" when none."""
    if "served" not in row or row["served"] >= row["sites"]:
        return row["kernel"]
    return f"{row['kernel']} ({row['served']}/{row['sites']})" if row["served"] else "-"


def _cells(row: dict) -> list[str]:
    mem = row.get("memory") or {}
    act_k = mem.get("activations_peftkern")
    saved = None if act_k is None else mem["activations"] - act_k
    cells = [row["name"], row.get("setting", ""), f"{row['trainable']:,}" if "trainable" in row else "-",
             _pct(row.get("percent")), _kernel(row), fmt_bytes(mem.get("weights")), fmt_bytes(mem.get("grads")),
             fmt_bytes(mem.get("optimizer"))]
    if "activations" in mem:
        cells += [fmt_bytes(mem["activations"]), fmt_bytes(act_k), fmt_bytes(mem["total"]),
                  fmt_bytes(mem["total_peftkern"]),
                  "-" if not saved else f"{fmt_bytes(saved)} ({100 * saved / mem['total']:.1f}%)"]
    else:
        cells += [row.get("note") or "-", "-", "-", "-", "-"]
    return cells


def _header(rep: dict) -> str:
    c = rep["config"]
    return (f"peftkern report: {rep['model']} ({c['model_type']}, {c['blocks']} blocks, hidden {c['hidden']}, "
            f"{rep['base_params']:,} parameters), batch {rep['batch']} x seq {rep['seq']}, {rep['dtype']}, "
            f"AdamW, kernels modelled for {rep['target']}")


def _footer(rep: dict) -> list[str]:
    lines = [f"{r['name']}: {r['note']}" for r in rep["rows"] if r.get("note")]
    lines += [f"{BY_KEY[m].name}: no row: {why}" for m, why in rep.get("absent", {}).items()]
    lines.append("activations: bytes saved for backward (traced on meta); total = weights + grads + AdamW + "
                 "activations; saved = activations peft/eager - peftkern (% of total)")
    return lines


def format_table(rep: dict) -> str:
    rows = [list(COLS)] + [_cells(r) for r in rep["rows"]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLS))]
    fmt = lambda r: "  ".join(c.rjust(w) if i in _RIGHT else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([_header(rep), fmt(rows[0]), "  ".join("-" * w for w in widths),
                      *(fmt(r) for r in rows[1:]), *_footer(rep)])


def format_markdown(rep: dict) -> str:
    lines = [f"**{_header(rep)}**", "", "| " + " | ".join(COLS) + " |",
             "|" + "|".join("---:" if i in _RIGHT else "---" for i in range(len(COLS))) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in _cells(r)) + " |" for r in rep["rows"]]
    return "\n".join(lines + [""] + [f"- {x}" for x in _footer(rep)])


def format_measure(meas: dict, markdown: bool = False) -> str:
    c = meas["scaled_down"]
    head = (f"--measure: {c['model_type']} scaled down to {c['blocks']} blocks, hidden {c['hidden']}, "
            f"on {meas['device']}, batch {meas['batch']} x seq {meas['seq']}, {meas['dtype']}")
    cols = ["method", "act. estimate", "act. measured", "ratio", "total estimate", "total measured", "ratio"]
    rows = []
    ratio = lambda a, b: f"{b / a:.3f}" if a else "-"
    for r in meas["rows"]:
        name = BY_KEY[r["method"]].name
        if "estimate" not in r:
            rows.append([name, r.get("note", "n/a")] + ["-"] * 5)
            continue
        e, m = r["estimate"], r["measured"]
        rows.append([name, fmt_bytes(e["activations"]), fmt_bytes(m["activations"]),
                     ratio(e["activations"], m["activations"]), fmt_bytes(e["total"]), fmt_bytes(m["total"]),
                     ratio(e["total"], m["total"])])
        if "measured_peftkern" in r and "error" in r["measured_peftkern"]:
            rows.append([name + " (peftkern)", "ERROR: " + r["measured_peftkern"]["error"]] + ["-"] * 5)
        elif "measured_peftkern" in r:
            mk = r["measured_peftkern"]
            rows.append([name + " (peftkern)", fmt_bytes(e["activations_peftkern"]), fmt_bytes(mk["activations"]),
                         ratio(e["activations_peftkern"], mk["activations"]), fmt_bytes(e["total_peftkern"]),
                         fmt_bytes(mk["total"]), ratio(e["total_peftkern"], mk["total"])])
    how = next((r["measured"]["how"] for r in meas["rows"] if "measured" in r), "")
    if markdown:
        out = [f"**{head}**", "", "| " + " | ".join(cols) + " |", "|---|" + "---:|" * (len(cols) - 1)]
        out += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(out + ["", f"- measured: {how}; ratio = measured / estimate"])
    table = [cols] + rows
    widths = [max(len(r[i]) for r in table) for i in range(len(cols))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([head, fmt(cols), "  ".join("-" * w for w in widths), *(fmt(r) for r in rows),
                      f"measured: {how}; ratio = measured / estimate"])
