"""The report's figures, from saved data only: PNGs rendered deterministically, each with the data and
the axes' place in the image that the page's inline script needs to show values under the pointer.

Every function takes a :class:`~gradprobe.trace.Trace` (or a note's plain values) and returns a
:class:`Figure` (``None`` when there is nothing to draw). Rendering uses matplotlib's Agg backend
under its default style, writes no software tag or date into the PNG, and so gives the same bytes for
the same data: the report built live and the one rebuilt from run logs are identical.
"""
from __future__ import annotations

import io
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from gradprobe.errors import require
from gradprobe.trace import LABELS, SpikeEvent, SpikeLog, Trace

__all__ = ["Figure", "columns", "loss_figure", "heatmap_figure", "layer_series_figure", "profiles_figure",
           "temporal_figure", "spectrum_figure", "flight_figure", "flight_quantity_figure", "spike_marks", "DPI", "MAX_COLUMNS", "SPIKE_COLOR"]

#: image resolution (pixels per inch); figures are 6.4 × 3.2 inches
DPI = 100
#: at most this many recorded steps are drawn (evenly spaced, first and last included)
MAX_COLUMNS = 300
_SIZE = (6.4, 3.2)
#: the colour of spike marks (matplotlib's default red)
SPIKE_COLOR = "C3"


@dataclass(frozen=True)
class Figure:
    """One rendered figure: ``png`` bytes, a ``caption`` and ``hover`` (plain JSON for the page script:
    ``kind`` "lines" or "heat", ``box`` = the axes as ``[left, top, right, bottom]`` fractions of the image,
    the axis limits and scales, the values drawn, and for line figures ``marks``: the gradient spikes
    drawn as vertical lines, ``{"x": step, "text": what happened}``)."""

    key: str
    caption: str
    png: bytes
    hover: dict = field(default_factory=dict)


def _pyplot():
    mpl = require("matplotlib", "report")
    if mpl.get_backend().lower() not in ("agg", "pdf", "svg", "cairo"):
        mpl.use("Agg")
    return mpl, require("matplotlib.pyplot", "report")


def _text(s: str, limit: int = 28) -> str:
    """A user's string as matplotlib shows it literally ('$' starts math text there), shortened."""
    s = str(s)
    if len(s) > limit:
        s = "…" + s[-(limit - 1):]
    return s.replace("$", r"\$")


def _finite(v) -> list:
    """Floats for JSON, with ``None`` where a value is NaN/Inf (not drawn)."""
    return [float(x) if math.isfinite(x) else None for x in np.asarray(v, dtype=np.float64).ravel()]


def columns(n: int, cap: int = MAX_COLUMNS) -> np.ndarray:
    """Indices of at most ``cap`` of ``n`` recorded steps, evenly spaced, first and last included."""
    if n <= cap:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, cap).round().astype(np.int64))


class _Canvas:
    """A figure under the default style with a fixed layout (the axes' place is known before drawing, and
    one draw renders it), rendered once to PNG."""

    def __init__(self, *, left: float = 0.11, colorbar: bool = False):
        self.mpl, self.plt = _pyplot()
        self._style = self.plt.style.context("default")
        self._style.__enter__()
        self.fig = self.plt.figure(figsize=_SIZE, dpi=DPI)
        right = 0.86 if colorbar else 0.97
        self.ax = self.fig.add_axes((left, 0.15, right - left, 0.74))
        self.cax = self.fig.add_axes((0.88, 0.15, 0.018, 0.74)) if colorbar else None

    def integer_x(self) -> None:
        """Whole-number ticks on x (steps, layers, ranks)."""
        self.ax.xaxis.set_major_locator(self.mpl.ticker.MaxNLocator(integer=True))

    def colorbar(self, mappable, label: str) -> None:
        cb = self.fig.colorbar(mappable, cax=self.cax)
        cb.set_label(label, fontsize=8)
        cb.ax.tick_params(labelsize=7)

    def render(self) -> tuple[bytes, list[float]]:
        try:
            p = self.ax.get_position()
            buf = io.BytesIO()
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r"Glyph .* missing from")  # a user's name in an odd script
                self.fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
            box = [round(float(p.x0), 6), round(1.0 - float(p.y1), 6), round(float(p.x1), 6), round(1.0 - float(p.y0), 6)]
            return buf.getvalue(), box
        finally:
            self.plt.close(self.fig)
            self._style.__exit__(None, None, None)

    def lines_hover(self, x, series, *, xname: str, label: str) -> dict:
        ax = self.ax
        return {"kind": "lines", "x": _finite(x), "xname": xname, "label": label,
                "xlim": [float(v) for v in ax.get_xlim()], "ylim": [float(v) for v in ax.get_ylim()],
                "xlog": ax.get_xscale() == "log", "ylog": ax.get_yscale() == "log",
                "series": [{"name": n, "y": _finite(y)} for n, y in series]}


def _positive(v: np.ndarray) -> np.ndarray:
    out = np.asarray(v, dtype=np.float64).copy()
    out[~(np.isfinite(out) & (out > 0))] = np.nan
    return out


def _layer_colors(cm, n: int):
    return [cm(0.05 + 0.85 * (i / max(n - 1, 1))) for i in range(n)]


def _depth_colorbar(c: _Canvas, n: int) -> None:
    sm = c.mpl.cm.ScalarMappable(cmap=c.mpl.colormaps["viridis"], norm=c.mpl.colors.Normalize(0, max(n - 1, 1)))
    c.colorbar(sm, "layer (0 = input side)")


def spike_marks(spikes: SpikeLog | None) -> list[dict]:
    """``{"x": step, "text": sentence}`` of every spike event (the hover data of the marks)."""
    if spikes is None:
        return []
    return [{"x": int(e.step), "text": e.sentence()} for e in spikes.events]


def _mark_spikes(c: _Canvas, spikes: SpikeLog | None) -> list[dict]:
    """Vertical lines at the spike steps (after the data is drawn: the x limits widen to show them)."""
    marks = spike_marks(spikes)
    for m in marks:
        c.ax.axvline(m["x"], color=SPIKE_COLOR, ls=":", lw=1.2, zorder=0)
    return marks


def _spike_caption(marks: list[dict]) -> str:
    if not marks:
        return ""
    n = len(marks)
    return (f" Red dotted line{'s' if n != 1 else ''}: {n} gradient spike{'s' if n != 1 else ''} (step"
            f"{'s' if n != 1 else ''} {', '.join(str(m['x']) for m in marks[:10])}{', …' if n > 10 else ''}).")


def loss_figure(history: Trace, key: str, spikes: SpikeLog | None = None) -> Figure | None:
    """The loss of every drawn recorded step (log scale when it spans more than 30×); ``spikes`` are
    marked as vertical lines at their steps."""
    if len(history) == 0:
        return None
    idx = columns(len(history))
    steps, loss = history.steps[idx], history.losses[idx]
    if not np.isfinite(loss).any():
        return None
    c = _Canvas()
    c.ax.plot(steps, loss, color="C0", lw=1.2)
    ok = loss[np.isfinite(loss)]
    if ok.min() > 0 and ok.max() / ok.min() > 30:
        c.ax.set_yscale("log")
    c.ax.set_xlabel("step")
    c.integer_x()
    c.ax.set_ylabel("loss")
    c.ax.grid(True, which="both", alpha=0.3)
    c.ax.set_title("training loss", fontsize=10)
    marks = _mark_spikes(c, spikes)
    hover = c.lines_hover(steps, [("loss", loss)], xname="step", label="loss")
    if marks:
        hover["marks"] = marks
    png, hover["box"] = c.render()
    return Figure(key, "Training loss at every recorded step." + _spike_caption(marks), png, hover)


def heatmap_figure(history: Trace, key: str, quantity: str = "output_grad_norm") -> Figure | None:
    """log10(``quantity``) over recorded steps (x) and layers (y, input side at the bottom); grey: not measured."""
    if len(history) == 0 or quantity not in history.quantities:
        return None
    idx = columns(len(history))
    m = history.matrix(quantity)[idx]  # (S, L)
    if not np.isfinite(m).any():
        return None
    names = history.names
    with np.errstate(divide="ignore", invalid="ignore"):
        logm = np.log10(_positive(m))
    c = _Canvas(left=0.2, colorbar=True)
    cmap = c.mpl.colormaps["viridis"].with_extremes(bad="#d9d9d9")
    im = c.ax.imshow(np.ma.masked_invalid(logm.T), aspect="auto", origin="lower", cmap=cmap, interpolation="nearest",
                     extent=(-0.5, len(idx) - 0.5, -0.5, len(names) - 0.5))
    tick = np.unique(np.linspace(0, len(names) - 1, min(len(names), 10)).round().astype(int))
    c.ax.set_yticks(tick, [_text(names[i], 18) for i in tick], fontsize=7)
    steps = history.steps[idx]
    xt = np.unique(np.linspace(0, len(idx) - 1, min(len(idx), 6)).round().astype(int))
    c.ax.set_xticks(xt, [str(int(steps[i])) for i in xt], fontsize=8)
    c.ax.set_xlabel("step")
    label = LABELS.get(quantity, quantity)
    c.ax.set_title(f"log10 {_text(label)} per layer over training", fontsize=10)
    c.colorbar(im, "log10")
    hover = {"kind": "heat", "x": [int(s) for s in steps], "rows": list(names), "label": label,
             "xlim": [-0.5, len(idx) - 0.5], "ylim": [-0.5, len(names) - 0.5],
             "z": [_finite(m[:, j]) for j in range(len(names))]}
    png, hover["box"] = c.render()
    shown = "" if len(idx) == len(history) else f" ({len(idx)} of {len(history)} recorded steps drawn)"
    return Figure(key, f"{label} per layer (rows, input side at the bottom) over training{shown}; "
                       "grey: not measured.", png, hover)


def layer_series_figure(history: Trace, key: str, quantity: str, spikes: SpikeLog | None = None) -> Figure | None:
    """One line per layer of ``quantity`` over training (log scale), coloured from the input side to the
    output; ``spikes`` are marked as vertical lines at their steps."""
    if len(history) == 0 or quantity not in history.quantities:
        return None
    idx = columns(len(history))
    m = _positive(history.matrix(quantity)[idx])
    if not np.isfinite(m).any():
        return None
    names, steps = history.names, history.steps[idx]
    c = _Canvas(left=0.13, colorbar=True)
    colors = _layer_colors(c.mpl.colormaps["viridis"], len(names))
    for j in range(len(names)):
        if np.isfinite(m[:, j]).any():
            c.ax.plot(steps, m[:, j], color=colors[j], lw=1.0)
    c.ax.set_yscale("log")
    c.ax.set_xlabel("step")
    c.integer_x()
    label = LABELS.get(quantity, quantity)
    c.ax.set_ylabel(_text(label), fontsize=9)
    c.ax.grid(True, which="both", alpha=0.3)
    c.ax.set_title(f"{_text(label)} per layer over training", fontsize=10)
    _depth_colorbar(c, len(names))
    marks = _mark_spikes(c, spikes)
    hover = c.lines_hover(steps, [(n, m[:, j]) for j, n in enumerate(names)], xname="step", label=label)
    if marks:
        hover["marks"] = marks
    png, hover["box"] = c.render()
    what = {"grad_norm": "Parameter-gradient norm ‖∂L/∂θ_l‖ of each layer",
            "update_ratio": "Update ratio ‖Δθ_l‖/‖θ_l‖ of each layer between recorded steps"}.get(quantity, label)
    return Figure(key, f"{what} over training (one line per layer; colour: depth)." + _spike_caption(marks), png, hover)


def _lines(c: _Canvas, curves, n: int):
    """Draw ``(label, values, colour index, dashed)`` curves against 0…n−1; returns the hover series."""
    series = []
    for lab, v, color, dashed in curves:
        c.ax.plot(np.arange(len(v)), v, "--" if dashed else "-", color=f"C{color % 10}", marker="o" if n <= 40 else None,
                  ms=3, lw=1.0, label=_text(lab, 40))
        series.append((lab, np.pad(v, (0, n - len(v)), constant_values=np.nan)))
    return series


def _log_curves_figure(curves, key: str, *, xlabel: str, ylabel: str, title: str, xname: str,
                       caption: str) -> Figure | None:
    """Positive ``(label, values, colour index, dashed)`` curves on a log y axis against their index, with
    a hover read-out (``None`` when no curve has a positive finite value)."""
    drawn = [(lab, _positive(v), col, d) for lab, v, col, d in curves if np.isfinite(_positive(v)).any()]
    if not drawn:
        return None
    c = _Canvas()
    n = max(len(v) for _, v, _, _ in drawn)
    series = _lines(c, drawn, n)
    c.ax.set_yscale("log")
    c.ax.set_xlabel(xlabel)
    c.integer_x()
    c.ax.set_ylabel(ylabel)
    c.ax.grid(True, which="both", alpha=0.3)
    c.ax.legend(fontsize=6)
    c.ax.set_title(title, fontsize=10)
    hover = c.lines_hover(np.arange(n), series, xname=xname, label=ylabel)
    png, hover["box"] = c.render()
    return Figure(key, caption, png, hover)


def profiles_figure(curves: Sequence[tuple[str, np.ndarray, int, bool]], key: str) -> Figure | None:
    """``‖∂L/∂h_l‖`` against layer index for ``(label, values, colour index, dashed)`` curves."""
    return _log_curves_figure(
        curves, key, xlabel="layer index (0 = input side)", ylabel="‖∂L/∂h_l‖",
        title="back-propagated signal per layer", xname="layer",
        caption="‖∂L/∂h_l‖ per layer at the first (dashed) and last (solid) recorded step of every run.")


def temporal_figure(curves: Sequence[tuple[str, np.ndarray, int, bool]], key: str) -> Figure | None:
    """``‖∂E/∂h_k‖`` against steps back from the loss end for ``(label, profile, colour index, dashed)`` curves."""
    return _log_curves_figure(
        curves, key, xlabel="steps back from the loss end (s = T − k)", ylabel="‖∂E/∂h_k‖",
        title="gradient through time", xname="steps back",
        caption="‖∂E/∂h_k‖ against the number of steps back from the loss end (back-propagation through "
                "time; Pascanu et al. 2013), at the first (dashed) and last (solid) recorded step.")


def spectrum_figure(spectra: Mapping[str, np.ndarray], key: str) -> Figure | None:
    """Singular values σ_i against their rank, one line per ``{label: (B, k) values}`` and example."""
    drawn = {k: np.atleast_2d(_positive(v)) for k, v in spectra.items()}
    drawn = {k: v for k, v in drawn.items() if np.isfinite(v).any()}
    if not drawn:
        return None
    c = _Canvas()
    n = max(v.shape[1] for v in drawn.values())
    series = []
    for k, (lab, v) in enumerate(drawn.items()):
        for b in range(v.shape[0]):
            name = (lab or "σ") + (f" (example {b})" if v.shape[0] > 1 else "")
            c.ax.plot(np.arange(1, v.shape[1] + 1), v[b], marker="o", ms=3, lw=0.8, color=f"C{k % 10}",
                      alpha=1.0 if v.shape[0] == 1 else 0.6, label=_text(lab, 40) if b == 0 and lab else None)
            series.append((name, np.pad(v[b], (0, n - v.shape[1]), constant_values=np.nan)))
    c.ax.axhline(1.0, color="0.4", lw=0.8, ls=":")
    c.ax.set_yscale("log")
    c.ax.set_xlabel("rank i")
    c.integer_x()
    c.ax.set_ylabel("σ_i of ∂y/∂x")
    c.ax.grid(True, which="both", alpha=0.3)
    if any(drawn):
        c.ax.legend(fontsize=6)
    c.ax.set_title("input–output Jacobian singular values", fontsize=10)
    hover = c.lines_hover(np.arange(1, n + 1), series, xname="rank", label="σ")
    png, hover["box"] = c.render()
    return Figure(key, "Singular values of each example's input–output Jacobian (dotted: σ = 1, dynamical "
                       "isometry; Saxe et al. 2014; Pennington, Schoenholz & Ganguli 2017).", png, hover)


def flight_figure(event: SpikeEvent, key: str) -> Figure | None:
    """The flight record of one spike: the total gradient norm ‖∇θ‖ of every step before it (black) with
    the rolling median (dashed) and the spike bound (dotted) in force at each step, every layer's
    ‖∇θ_l‖ (thin, coloured by depth as listed), and the flagged steps (red dots); log scale."""
    f = event.flight
    if f is None or not len(f):
        return None
    steps = np.asarray(f.steps, dtype=np.float64)
    total = _positive(np.asarray(f.total, dtype=np.float64))
    layers = _positive(np.asarray(f.grad_norm, dtype=np.float64).reshape(len(steps), -1))
    med = _positive(np.asarray(f.total_median, dtype=np.float64))
    bound = _positive(np.asarray(f.total_threshold, dtype=np.float64))
    if not (np.isfinite(total).any() or np.isfinite(layers).any()):
        return None
    c = _Canvas(left=0.13, colorbar=True)
    colors = _layer_colors(c.mpl.colormaps["viridis"], len(f.layers))
    for j in range(len(f.layers)):
        if np.isfinite(layers[:, j]).any():
            c.ax.plot(steps, layers[:, j], color=colors[j], lw=0.8, alpha=0.8)
    c.ax.plot(steps, total, color="black", lw=1.6, marker="o", ms=2.5)
    c.ax.plot(steps, med, color="0.35", ls="--", lw=1.0)
    c.ax.plot(steps, bound, color="0.35", ls=":", lw=1.0)
    flagged = np.asarray(f.flagged, dtype=bool)
    if flagged.any():
        c.ax.plot(steps[flagged], np.where(np.isfinite(total[flagged]), total[flagged], np.nan), "o",
                  color=SPIKE_COLOR, ms=6, zorder=5)
    c.ax.set_yscale("log")
    c.ax.set_xlabel("step")
    c.integer_x()
    c.ax.set_ylabel("gradient norm", fontsize=9)
    c.ax.grid(True, which="both", alpha=0.3)
    c.ax.set_title(f"flight record before the spike at step {event.step}", fontsize=10)
    _depth_colorbar(c, len(f.layers))
    marks = _mark_spikes(c, SpikeLog((event,)))
    series = [("‖∇θ‖ total", total), ("rolling median", med), ("spike bound", bound)]
    series += [(n, layers[:, j]) for j, n in enumerate(f.layers)]
    hover = c.lines_hover(steps, series, xname="step", label="gradient norm")
    hover["marks"] = marks
    png, hover["box"] = c.render()
    return Figure(key, f"Flight record of the {len(f)} steps up to the spike at step {event.step}: the total "
                  "gradient norm ‖∇θ‖ (black; red: flagged steps), its rolling median (dashed) and the spike bound "
                  "(dotted) in force at each step, and each layer's ‖∇θ_l‖ (thin; colour: layer as listed).", png, hover)


#: what each per-layer quantity of a full flight record is, for the figure's caption
_FLIGHT_CAPTIONS = {
    "output_grad_norm": "the back-propagated signal ‖∂L/∂h_l‖ at each layer's output",
    "update_ratio": "each layer's update ratio ‖θ_l(t) − θ_l(t−1)‖/‖θ_l(t−1)‖ over that one step",
    "activation_norm": "each layer's activation norm ‖h_l‖",
    "weight_norm": "each layer's weight norm ‖θ_l‖",
}


def flight_quantity_figure(event: SpikeEvent, quantity: str, key: str) -> Figure | None:
    """One per-layer quantity of a full flight record (``SpikeWatch(full_flight=True)``) over the steps
    before the spike: one line per layer (coloured by depth as listed), log scale, the spike marked."""
    f = event.flight
    if f is None or quantity not in f.quantities or not len(f):
        return None
    steps = np.asarray(f.steps, dtype=np.float64)
    v = _positive(np.asarray(f.quantities[quantity], dtype=np.float64).reshape(len(steps), -1))
    if not np.isfinite(v).any():
        return None
    label = LABELS.get(quantity, quantity)
    c = _Canvas(left=0.13, colorbar=True)
    colors = _layer_colors(c.mpl.colormaps["viridis"], len(f.layers))
    for j in range(len(f.layers)):
        if np.isfinite(v[:, j]).any():
            c.ax.plot(steps, v[:, j], color=colors[j], lw=1.0, marker="o", ms=1.5)
    c.ax.set_yscale("log")
    c.ax.set_xlabel("step")
    c.integer_x()
    c.ax.set_ylabel(label, fontsize=9)
    c.ax.grid(True, which="both", alpha=0.3)
    c.ax.set_title(f"{label} before the spike at step {event.step}", fontsize=10)
    _depth_colorbar(c, len(f.layers))
    marks = _mark_spikes(c, SpikeLog((event,)))
    hover = c.lines_hover(steps, [(n, v[:, j]) for j, n in enumerate(f.layers)], xname="step", label=label)
    hover["marks"] = marks
    png, hover["box"] = c.render()
    what = _FLIGHT_CAPTIONS.get(quantity, f"each layer's {quantity}")
    return Figure(key, f"Full flight record of the {len(f)} steps up to the spike at step {event.step} (every step, "
                  f"whatever the schedule recorded): {what} (colour: layer as listed; dotted red: the spike).", png, hover)
