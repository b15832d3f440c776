"""`peftkern bench --plot PATH`: speedup of each peftkern provider over each baseline, per op/case."""

from __future__ import annotations


def plot(rows: list[dict], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # an optional extra: say how to get it
        raise SystemExit(f"--plot needs matplotlib: pip install 'peftkern[plot]' ({e})") from e
    bars = []  # (label, baseline, speedup)
    for r in rows:
        sp = r.get("speedup", {})
        mode = "full" if "full" in sp else "fwd" if "fwd" in sp else None
        if mode is None:
            continue
        for base, v in sp[mode].items():
            bars.append((f"{r['op']}/{r['case']}\n{r['provider'].removeprefix('peftkern-')} ({mode})", base, v))
    if not bars:
        raise SystemExit("--plot: no peftkern rows with speedups to plot")
    labels = list(dict.fromkeys(b[0] for b in bars))
    bases = list(dict.fromkeys(b[1] for b in bars))
    width = 0.8 / len(bases)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(labels)), 4))
    for j, base in enumerate(bases):
        xs = [i + j * width for i, lab in enumerate(labels) for b in bars if b[0] == lab and b[1] == base]
        ys = [b[2] for lab in labels for b in bars if b[0] == lab and b[1] == base]
        ax.bar(xs, ys, width, label=f"vs {base}")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))], labels, fontsize=7)
    ax.set_ylabel("speedup (baseline time / peftkern time)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
