"""The run as one PNG: time against M for the NF4 matmul (a panel per weight shape, a line per peer),
and for every other section that ran, speedup bars against its baseline (a group per case, a bar per
peer). Drawn with matplotlib's Agg canvas: no display, no global backend switch."""
from __future__ import annotations

from functools import partial

from ..atomic import write_file
from .report import fmt


def _lines(rows: list, ax) -> None:
    for peer in dict.fromkeys(r["peer"] for r in rows):
        pts = sorted((r["M"], r["ms"]) for r in rows if r["peer"] == peer)
        ax.plot([m for m, _ in pts], [t for _, t in pts], marker="o", label=peer)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("M (rows of x)")
    ax.set_ylabel("ms")


def _case(row: dict, case_cols: list) -> str:
    return " ".join(f"{c}={row[c]}" if isinstance(row.get(c), int) else fmt(row.get(c)) for c in case_cols)


def _bars(rows: list, columns: list, ax) -> None:
    case_cols = columns[:columns.index("peer")]
    speedup = next(c for c in columns if c.startswith("speedup_vs_"))
    cases = list(dict.fromkeys(_case(r, case_cols) for r in rows))
    peers = list(dict.fromkeys(r["peer"] for r in rows))
    width = 0.8 / len(peers)
    for j, peer in enumerate(peers):
        vals = {_case(r, case_cols): r.get(speedup) for r in rows if r["peer"] == peer}
        shown = [(i, vals[c]) for i, c in enumerate(cases) if vals.get(c) is not None]
        ax.bar([i + j * width for i, _ in shown], [v for _, v in shown], width, label=peer)
    if all(r.get(speedup) is None for r in rows):
        ax.text(0.5, 0.5, f"no {speedup} (baseline not installed)", transform=ax.transAxes, ha="center")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))], cases, fontsize=7)
    ax.set_ylabel(speedup.replace("_", " "))


def write(path: str, results: dict, sections: dict) -> None:
    """sections: name -> table columns, for the sections in results."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = []  # (title, draw(ax))
    for name, columns in sections.items():
        rows = results[name]["rows"]
        if name == "nf4_matmul":
            for N, K in sorted({(r["N"], r["K"]) for r in rows}):
                panels.append((f"nf4_matmul {N}x{K}: time vs M",
                               partial(_lines, [r for r in rows if (r["N"], r["K"]) == (N, K)])))
        elif rows:
            panels.append((f"{name}: speedup (higher is faster)", partial(_bars, rows, columns)))
    fig = Figure(figsize=(11, 3.6 * max(1, len(panels))), layout="constrained")
    FigureCanvasAgg(fig)
    for ax, (title, draw) in zip(fig.subplots(max(1, len(panels)), 1, squeeze=False)[:, 0], panels):
        draw(ax)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the panel, never over a bar
    fig.suptitle(f"lora_ext bench on {results.get('gpu', results['device'])} (torch {results['torch']})")
    write_file(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
