"""Reports of stored experiment results: markdown tables with the published numbers beside ours, and figures.

Figures need matplotlib (extra ``plot``); without it the tables are still produced.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from gradprobe.experiments.runner import Report
from gradprobe.theory import mean_field

def xi_c(sigma_w2: float, sigma_b2: float = 0.05) -> float:
    """Schoenholz et al.'s correlation depth scale ξ_c = −1/ln χ_c for tanh (``gradprobe.theory.mean_field``)."""
    return mean_field("tanh", sigma_w2, sigma_b2).depth_scale


__all__ = ["xi_c", "pascanu_report", "success_table", "glorot_report", "he_report", "schoenholz_report",
           "longrange_report"]


def _have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend (extra ``plot``; callers check :func:`_have_matplotlib`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out_dir: Path, fname: str) -> Path:
    """Lay out ``fig``, write it to ``out_dir / fname`` (PNG, 110 dpi; ``out_dir`` is created), close it and
    return the path."""
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / fname
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


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
    plt = _pyplot()
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
    return _save(fig, out_dir, "pascanu2013_success.png")


# ------------------------------------------------------------------------------------------ feed-forward
def _group(runs, *fields):
    groups: dict[tuple, list] = defaultdict(list)
    for r in runs:
        if r.result is not None:
            groups[tuple(r.config[f] for f in fields)].append(r)
    return groups


def _med(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and np.isnan(x))]
    return float(np.median(xs)) if xs else float("nan")


def _table_report(experiment, intro: str, head: str, rows: list[str], groups, out_dir, make_figures) -> Report:
    """The shared shape of the feed-forward and long-range reports: an introduction, one markdown table
    (``head`` is its header row; the separator is derived from it) and the figures ``make_figures(dir)``
    returns, made only with an output directory, results and matplotlib."""
    lines = [intro, "", head, "|" + "---|" * (head.count("|") - 1)] + rows
    figures = []
    if out_dir is not None and groups and _have_matplotlib():
        figures = list(make_figures(Path(out_dir)))
    return Report(experiment.title, lines, figures)


def _stalled(rs) -> str:
    return f"{sum(x['train_loss_end'] > 0.9 * x['loss_chance'] for x in rs)}/{len(rs)}"


def glorot_report(experiment, runs, store, out_dir) -> Report:
    g = _group(runs, "activation", "init", "hidden_layers")
    rows = []
    for k in sorted(g):
        rs = [r.result for r in g[k]]
        rows.append(
            f"| {k[0]} | {k[1]} | {k[2]} | {_med([x['grad_log_ratio_first'] for x in rs]):.2f} "
            f"| {_med([x['grad_log_ratio_predicted'] for x in rs]):.2f} "
            f"| {_med([x['top_mean_init'] for x in rs]):.3f} → {_med([x['top_mean_end'] for x in rs]):.3f} "
            f"| {_med([x['top_saturated_init'] for x in rs]):.2f} → {_med([x['top_saturated_end'] for x in rs]):.2f} "
            f"| {_med([x['test_error'] for x in rs]):.3f} "
            f"| {_stalled(rs)} stalled |")
    return _table_report(
        experiment,
        "Digits stand-in (the paper: Shapeset-3×2, MNIST, CIFAR-10, width 1000). Gradient columns at init: "
        "ln(E‖δ¹‖² / E‖δᴰ‖²), first over top hidden layer, measured by the probe (median over seeds) and "
        "predicted by layer-wise mean field (variance only: Glorot's uniform inits have n·Var W = 1/3 and 1).",
        "| activation | init | hidden layers | ln ratio measured | ln ratio mean field | top-layer mean act. init → end "
        "| top saturated init → end | test error | chance loss reached? |",
        rows, g, out_dir, lambda d: [_glorot_figure(g, store, d)])


def _glorot_figure(groups, store, out_dir: Path) -> Path:
    plt = _pyplot()
    deepest = max(k[2] for k in groups)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, act in zip(axes, ("sigmoid", "tanh")):
        for init, color in (("standard", "C3"), ("xavier", "C0")):
            rs = groups.get((act, init, deepest))
            if not rs:
                continue
            arr = {n: a for _, n, a in store.arrays(rs[0].key)}
            if "log_grad_sq_ratio_measured" not in arr:
                continue
            layers = np.arange(1, len(arr["log_grad_sq_ratio_measured"]) + 1)
            ax.plot(layers, arr["log_grad_sq_ratio_measured"], "o-", color=color, label=f"{init}: measured")
            ax.plot(layers, arr["log_grad_sq_ratio_predicted"], "--", color=color, label=f"{init}: mean field")
        ax.set_title(f"{act}, {deepest} hidden layers, at init", fontsize=9)
        ax.set_xlabel("hidden layer")
        ax.set_ylabel("ln(E‖δˡ‖² / E‖δᴰ‖²)")
        if ax.get_legend_handles_labels()[1]:
            ax.legend(fontsize=7)
    return _save(fig, out_dir, "glorot2010_gradients.png")


def he_report(experiment, runs, store, out_dir) -> Report:
    g = _group(runs, "init", "hidden_layers", "width")
    rows = []
    for k in sorted(g):
        rs = [r.result for r in g[k]]
        meas = _med([float(np.exp(0.5 * x["grad_log_ratio_first"])) for x in rs])
        theory = (rs[0]["sigma_w2"] / 2.0) ** ((k[1] - 1) / 2.0)
        rows.append(f"| {k[0]} | {k[1]} | {k[2]} | {meas:.3g} | {theory:.3g} | {_med([x['train_loss_end'] for x in rs]):.3f} "
                    f"| {_med([x['test_error'] for x in rs]):.3f} | {_stalled(rs)} |")
    return _table_report(
        experiment,
        "Digits stand-in (the paper: ImageNet, 22- and 30-layer conv nets). Gradient ratio = ‖∂L/∂h¹‖ / ‖∂L/∂hᴰ‖ at "
        "init (probe); theory (σ_w²/2)^((D−1)/2) for the norm (Xavier on square layers: σ_w² = 1; He: 2). "
        "'Stalled' = mean loss over the last 10 % of updates above 0.9·ln 10.",
        "| init | hidden layers | width | grad ratio measured | theory | loss end | test error | stalled |",
        rows, g, out_dir,
        lambda d: [_curve_figure(runs, store, d, "he2015_training.png", "init", "train_loss", "30-layer ReLU MLP on digits")])


def _curve_figure(runs, store, out_dir: Path, fname: str, by: str, metric: str, title: str) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.4))
    colors = {}
    for r in runs:
        m = store.metrics(r.key, metric).get(metric)
        if m is None:
            continue
        lab = str(r.config[by])
        c = colors.setdefault(lab, f"C{len(colors)}")
        ax.plot(m[0], m[1], color=c, alpha=0.8)
    handles = [plt.Line2D([], [], color=c, label=l) for l, c in colors.items()]
    ax.legend(handles=handles, fontsize=8)
    ax.axhline(1.0 if metric == "loss_over_baseline" else np.log(10), color="grey", lw=0.8, ls=":")
    ax.set_xlabel("update")
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize=9)
    return _save(fig, out_dir, fname)


def schoenholz_report(experiment, runs, store, out_dir) -> Report:
    g = _group(runs, "sigma_w2", "hidden_layers")
    sws = sorted({k[0] for k in g})
    depths = sorted({k[1] for k in g})
    acc = {k: _med([r.result["train_accuracy"] for r in v]) for k, v in g.items()}
    b2 = runs[0].config["sigma_b2"] if runs else 0.05
    rows = []
    for sw in sws:
        xc = xi_c(sw, b2)
        cells = [acc.get((sw, d), float("nan")) for d in depths]
        ok = [d for d, a in zip(depths, cells) if a >= 0.5]
        rows.append(f"| {sw:g} | {6 * xc:.0f} | " + " | ".join(f"{a:.2f}" for a in cells)
                    + f" | {max(ok) if ok else '—'} |")
    return _table_report(
        experiment,
        "Digits stand-in (the paper: MNIST and CIFAR-10, width 300, SGD/RMSProp for a fixed number of steps). Cells: "
        "training accuracy after the budget (chance 0.1). 'Trainable' = accuracy ≥ 0.5 here.",
        "| σ_w² | 6·ξ_c | " + " | ".join(f"D={d}" for d in depths) + " | deepest trainable |",
        rows, g, out_dir, lambda d: [_phase_figure(sws, depths, acc, b2, d)])


def _phase_figure(sws, depths, acc, b2, out_dir: Path) -> Path:
    plt = _pyplot()
    grid = np.array([[acc.get((sw, d), np.nan) for sw in sws] for d in depths])
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    im = ax.pcolormesh(np.arange(len(sws) + 1), np.arange(len(depths) + 1), grid, cmap="RdYlGn", vmin=0.1, vmax=1.0)
    fig.colorbar(im, ax=ax, label="training accuracy")
    fine = np.linspace(min(sws), max(sws), 25)
    six = np.array([6 * xi_c(s, b2) for s in fine])
    # map σ_w² and depth to the cell coordinates (cells are evenly spaced; interpolate)
    xs = np.interp(fine, sws, np.arange(len(sws)) + 0.5)
    ys = np.interp(np.minimum(six, max(depths) * 2), depths, np.arange(len(depths)) + 0.5, right=len(depths) + 0.5)
    ax.plot(xs, ys, "k--", label="6·ξ_c (mean field)")
    ax.set_xticks(np.arange(len(sws)) + 0.5, [f"{s:g}" for s in sws])
    ax.set_yticks(np.arange(len(depths)) + 0.5, [str(d) for d in depths])
    ax.set_ylim(0, len(depths))
    ax.set_xlabel("σ_w²")
    ax.set_ylabel("hidden layers")
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title(f"tanh, σ_b² = {b2:g}", fontsize=9)
    return _save(fig, out_dir, "schoenholz2017_phase.png")


# ------------------------------------------------------------------------------------------ long range
LONGRANGE_ORDER = ("tanh", "tanh_omega", "irnn", "lstm", "lstm_fb1", "gru")


def longrange_report(experiment, runs, store, out_dir) -> Report:
    g = _group(runs, "task", "length", "cell")
    rows = []
    for k in sorted(g, key=lambda k: (k[0], k[1], LONGRANGE_ORDER.index(k[2]) if k[2] in LONGRANGE_ORDER else 99)):
        rs = [r.result for r in g[k]]
        rows.append(f"| {k[0]} | {k[1]} | {k[2]} | {_med([x['loss_over_baseline'] for x in rs]):.3f} "
                    f"| {sum(x['beats_baseline'] for x in rs)}/{len(rs)} "
                    f"| {_med([x['horizon_init'] for x in rs]):.0f} → {_med([x['horizon_end'] for x in rs]):.0f} "
                    f"| {_med([x['decay_rate_init'] for x in rs]):.3f} |")
    return _table_report(
        experiment,
        "Loss = mean training loss over the last 10 % of updates, over the memoryless baseline (adding: 1/6; "
        "copying: 10·ln 8/(T+20)); < 0.5 counts as beating it. Horizon: the probe's temporal profile of the memory "
        "part of the loss (steps back ∂E/∂h_t stays above 1 % of its peak), at init and at the end (median over seeds).",
        "| task | T | cell | loss / baseline | beats baseline | horizon init → end | decay rate at init (ln/step) |",
        rows, g, out_dir,
        lambda d: [_curve_figure([r for r in runs if r.config["task"] == task], store, d, f"longrange_{task}.png", "cell",
                                 "loss_over_baseline", f"{task}: training loss / memoryless baseline")
                   for task in sorted({k[0] for k in g})])
