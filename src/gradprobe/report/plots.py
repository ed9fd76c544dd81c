"""Matplotlib figures of gradient flow (extra: ``pip install 'gradprobe[plot]'``).

Every function takes saved data (a :class:`~gradprobe.trace.Trace`, e.g. from
:func:`gradprobe.load_trace`) and returns a ``matplotlib.figure.Figure``; nothing reads a model.
"""
from __future__ import annotations

import io

import numpy as np

from gradprobe.errors import ConfigError, require
from gradprobe.trace import QUANTITIES, Trace

__all__ = ["plot_signal_heatmap", "plot_signal_profiles", "figure_png"]

_LABEL = {
    "output_grad_norm": "‖∂L/∂h_l‖ (back-propagated signal)",
    "grad_norm": "‖∂L/∂θ_l‖",
    "activation_norm": "‖h_l‖",
    "weight_norm": "‖θ_l‖",
    "update_ratio": "‖Δθ_l‖/‖θ_l‖",
}


def _pyplot():
    mpl = require("matplotlib", "plot")
    if mpl.get_backend().lower() not in ("agg", "pdf", "svg", "cairo"):
        mpl.use("Agg")  # headless: the report only writes files
    return require("matplotlib.pyplot", "plot")


def _log10(m: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.log10(m)
    out[~np.isfinite(out)] = np.nan
    return out


def plot_signal_heatmap(trace: Trace, quantity: str = "output_grad_norm", title: str | None = None):
    """Heat map of log10(``quantity``) over recorded steps (x) and layers (y, input at the bottom)."""
    if quantity not in QUANTITIES:
        raise ConfigError(f"unknown quantity {quantity!r}; choose one of {QUANTITIES}")
    if len(trace) == 0:
        raise ConfigError("the trace is empty: record at least one step before plotting")
    plt = _pyplot()
    m = _log10(trace.matrix(quantity))  # (S, L)
    fig, ax = plt.subplots(figsize=(7, 4), constrained_layout=True)
    steps = trace.steps
    im = ax.imshow(m.T, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest",
                   extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, m.shape[1] - 0.5))
    names = trace.names
    tick = np.linspace(0, len(names) - 1, min(len(names), 12)).round().astype(int)
    ax.set_yticks(tick, [names[i] for i in tick], fontsize=7)
    ax.set_xlabel("step")
    ax.set_ylabel("layer (forward order)")
    ax.set_title(title or f"log10 {_LABEL[quantity]}", fontsize=10)
    fig.colorbar(im, ax=ax, label="log10")
    return fig


def plot_signal_profiles(traces: dict[str, Trace], quantity: str = "output_grad_norm", at: str = "first_last"):
    """Per-layer profiles (log scale) of several runs, at their first and last recorded step."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), constrained_layout=True)
    for k, (label, trace) in enumerate(traces.items()):
        if len(trace) == 0:
            raise ConfigError(f"the trace {label!r} is empty")
        color = f"C{k}"
        picks = [(trace[0], "--", "first step"), (trace.last, "-", "last step")] if at == "first_last" else [(trace.last, "-", "")]
        for flow, style, when in picks:
            v = getattr(flow, quantity)
            ax.semilogy(np.arange(len(v)), v, style, color=color, marker="o", ms=3,
                        label=f"{label} ({when}, step {flow.step})" if when else label)
    ax.set_xlabel("layer index (forward order; 0 = input side)")
    ax.set_ylabel(_LABEL[quantity])
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def figure_png(fig, dpi: int = 110) -> bytes:
    """Render a figure to PNG bytes and close it."""
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()
