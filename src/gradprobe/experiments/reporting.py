"""Reports of stored experiment results: markdown tables with the published numbers beside ours, and figures.

Figures need matplotlib (extra ``plot``); without it the tables are still produced.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from gradprobe.experiments.runner import Report

__all__ = ["pascanu_report", "success_table"]


def _have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def success_table(runs) -> dict[tuple, dict]:
    """``{(task, init, length label, method): summary}`` over the finished runs of Pascanu2013."""
    groups: dict[tuple, list] = defaultdict(list)
    for r in runs:
        if r.result is None:
            continue
        c = r.config
        label = str(c["min_length"]) if c["min_length"] == c["max_length"] else f"{c['min_length']}-{c['max_length']}"
        groups[(c["task"], c["init"], label, c["method"])].append(r)
    out = {}
    for k, rs in groups.items():
        res = [r.result for r in rs]
        solved = [x["solved"] for x in res]
        below = [x["below_1pct"] for x in res]
        hz = [x["horizon_median"] for x in res if x["horizon_median"] is not None]
        upd = [x["solved_at"] for x in res if x["solved_at"] is not None]
        out[k] = dict(n=len(res), solved=int(sum(solved)), below_1pct=int(sum(below)),
                      horizon=float(np.median(hz)) if hz else float("nan"),
                      updates_to_solve=float(np.median(upd)) if upd else float("nan"),
                      max_updates=rs[0].config["max_updates"],
                      best_error=float(np.median([x["best_valid_error"] for x in res if x["best_valid_error"] is not None]
                                                 or [float("nan")])))
    return out


METHOD_ORDER = ("sgd", "sgd_c", "sgd_cr")
METHOD_NAME = {"sgd": "SGD", "sgd_c": "SGD-C", "sgd_cr": "SGD-CR"}


def _length_key(label: str) -> tuple:
    lo = label.split("-")[0]
    return (int(lo), label)


def pascanu_report(experiment, runs, store, out_dir: Path | None) -> Report:
    table = success_table(runs)
    lines = [
        "Success = 0 errors on the fresh validation set (the authors' code); `<1 %` = the paper's criterion. "
        "Cells: solved / seeds (below 1 %), median probe horizon (steps back the gradient stays above 1 % of its "
        "peak) over training, median updates to solve.",
        "",
        "| task | init | length | method | solved | < 1 % | horizon | updates to solve | budget |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    keys = sorted(table, key=lambda k: (k[0], k[1], _length_key(k[2]), METHOD_ORDER.index(k[3])))
    for k in keys:
        v = table[k]
        upd = "—" if np.isnan(v["updates_to_solve"]) else f"{v['updates_to_solve']:.0f}"
        lines.append(f"| {k[0]} | {k[1]} | {k[2]} | {METHOD_NAME[k[3]]} | {v['solved']}/{v['n']} | {v['below_1pct']}/{v['n']} "
                     f"| {v['horizon']:.0f} | {upd} | {v['max_updates']} |")
    ordered = _ordering(table)
    if ordered:
        lines += ["", "Ordering SGD ≤ SGD-C ≤ SGD-CR of the success counts, per (task, init, length): "
                  + ", ".join(f"{t} {i} L={L}: {'holds' if ok else 'VIOLATED'}" for (t, i, L), ok in ordered.items())]
    figures = []
    if out_dir is not None and table:
        if _have_matplotlib():
            figures.append(_pascanu_figure(table, Path(out_dir)))
        else:
            lines += ["", "(figures need matplotlib: pip install 'gradprobe[plot]')"]
    return Report(experiment.title, lines, figures)


def _ordering(table) -> dict[tuple, bool]:
    out = {}
    pts = {(k[0], k[1], k[2]) for k in table}
    for p in sorted(pts):
        counts = [table[(*p, m)]["solved"] / table[(*p, m)]["n"] for m in METHOD_ORDER if (*p, m) in table]
        if len(counts) == len(METHOD_ORDER):
            out[p] = all(a <= b for a, b in zip(counts, counts[1:]))
    return out


def _pascanu_figure(table, out_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    panels = sorted({(k[0], k[1]) for k in table})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (task, init) in zip(axes[0], panels):
        for m in METHOD_ORDER:
            pts = sorted((_length_key(k[2]), table[k]) for k in table if k[:2] == (task, init) and k[3] == m)
            if not pts:
                continue
            xs = [p[0][1] for p in pts]
            ax.plot(xs, [100.0 * v["solved"] / v["n"] for _, v in pts], marker="o", label=METHOD_NAME[m])
        ax.set_title(f"{task}, {init}", fontsize=9)
        ax.set_xlabel("sequence length")
        ax.set_ylabel("success rate (%)")
        ax.set_ylim(-5, 105)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "pascanu2013_success.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
