"""Rules over time (backpropagation through time): ``vanishing_in_time`` and ``exploding_in_time``.

For each recurrent layer the profile is ``‖∂E/∂h_k‖`` in propagation order (``s`` steps back from the
loss end; Pascanu, Mikolov & Bengio 2013 eq. 5: a product of ``s`` Jacobians ``W_recᵀ diag(σ'(x))``). Verdicts compare the
signal ``s`` steps back with its peak, so they are scale-free:

* vanishing_in_time: the farthest step's signal is below ``config.vanish_ratio`` × the peak; the
  horizon (steps back the signal stays above that fraction) and the fitted per-step decay ``e^r`` are
  the evidence;
* exploding_in_time: the farthest step's signal is above ``config.explode_ratio`` × the signal where
  the gradient enters.

For an LSTM the error is carried back by the cell state (the constant error carousel of Hochreiter &
Schmidhuber 1997: ``∂c_t/∂c_{t−1} = diag(f_t)``), and ``∂E/∂c_k`` is what reaches the input and cell
gates of step ``k``. ``‖∂E/∂h_k‖`` can fall far below its peak while ``‖∂E/∂c_k‖`` keeps its size (a
trained readout makes the last step's direct term dominate ``h``); so an LSTM layer is vanishing in time
only when both its ``h`` and its ``c`` profiles are, and the evidence gives both.

With a loss at every step each ``‖∂E/∂h_k‖`` contains its own direct term, which hides vanishing
long-term components; ``gradprobe.analysis.rnn_lag_decomposition`` separates them.
"""
from __future__ import annotations

import math

import numpy as np

from gradprobe.diagnosis.remedies import rank_for_exploding_in_time, rank_for_vanishing_in_time
from gradprobe.diagnosis.verdict import Verdict

__all__ = ["rule_vanishing_in_time", "rule_exploding_in_time", "time_profile", "far_over_peak", "cell_far_over_peak"]



def time_profile(tf) -> tuple[np.ndarray, int, int]:
    """(profile in propagation order, index where the gradient enters, farthest index with a value)."""
    p = tf.steps_back()
    ok = np.flatnonzero(np.isfinite(p) & (p > 0))
    if ok.size < 2:
        return p, -1, -1
    return p, int(ok[0]), int(ok[-1])


def far_over_peak(tf) -> float:
    """``‖∂E/∂h‖`` at the farthest measured step back over the profile's peak (NaN with fewer than two
    measured steps): the ratio ``vanishing_in_time`` compares with ``config.vanish_ratio``."""
    p, first, far = time_profile(tf)
    return math.nan if first < 0 else float(p[far] / _peak(p))


def _measured(findings, config):
    """``(name, tf, p, first, far)`` for each recurrent layer of ``findings.temporal`` whose profile
    (:func:`time_profile`) has at least two measured steps, ``config.min_layers`` or more steps apart;
    the layers a time verdict may speak of."""
    for name, tf in (findings.temporal or {}).items():
        p, first, far = time_profile(tf)
        if first >= 0 and far - first >= config.min_layers:
            yield name, tf, p, first, far


def _peak(p: np.ndarray) -> float:
    return float(np.nanmax(np.where(np.isfinite(p), p, np.nan)))


def _evidence(name, tf, p, first, far, peak) -> list[str]:
    r = tf.decay_rate
    steps = far - first
    ev = [
        f"in {name!r} the gradient {steps} steps back ‖∂E/∂h‖ = {p[far]:.3g} is {p[far] / peak:.3g}× its peak "
        f"{peak:.3g} over {tf.steps} time steps",
        f"fitted change per step back: ×{math.exp(r):.4g} (rate {r:.4g}); horizon at 1e-2 of the peak: "
        f"{tf.horizon(1e-2)} steps",
    ]
    if far < len(p) - 1 and np.all(p[far + 1 :] == 0):
        ev.append(f"from {far + 1} steps back on the gradient is exactly 0: it fell below floating-point resolution")
    return ev


def cell_far_over_peak(tf) -> float:
    """``‖∂E/∂c‖`` at the farthest measured step back over its peak, for an LSTM layer (NaN for other
    cells, or with fewer than two measured steps)."""
    if tf.cell_norm is None:
        return math.nan
    c = tf.steps_back("c")
    ok = np.flatnonzero(np.isfinite(c) & (c > 0))
    if ok.size < 2:
        return math.nan
    return float(c[ok[-1]] / _peak(c))


def rule_vanishing_in_time(findings, config) -> Verdict | None:
    worst = None
    for name, tf, p, first, far in _measured(findings, config):
        peak = _peak(p)
        ratio = p[far] / peak
        c_ratio = cell_far_over_peak(tf)
        if np.isfinite(c_ratio) and c_ratio >= config.vanish_ratio:
            continue  # the cell state carries the error back: not vanishing (see the module docstring)
        if ratio < config.vanish_ratio and (worst is None or ratio < worst[0]):
            worst = (ratio, name, tf, p, first, far, peak, c_ratio)
    if worst is None:
        return None
    ratio, name, tf, p, first, far, peak, c_ratio = worst
    ev = _evidence(name, tf, p, first, far, peak)
    if np.isfinite(c_ratio):
        ev.append(f"the cell state does not carry it either: ‖∂E/∂c‖ {far - first} steps back is {c_ratio:.3g}× its "
                  f"peak (an LSTM's constant error carousel, Hochreiter & Schmidhuber 1997, needs forget gates near 1)")
    remedies = rank_for_vanishing_in_time(findings.facts)
    return Verdict("vanishing_in_time", "error", tuple(ev), remedies,
                   layer=name, data={"ratio": float(ratio), "decay_rate": tf.decay_rate, "horizon": tf.horizon(1e-2)})


def rule_exploding_in_time(findings, config) -> Verdict | None:
    worst = None
    for name, tf, p, first, far in _measured(findings, config):
        growth = p[far] / p[first]
        if (not np.isfinite(growth) or growth > config.explode_ratio) and (worst is None or growth > worst[0]):
            worst = (growth, name, tf, p, first, far)
    if worst is None:
        return None
    growth, name, tf, p, first, far = worst
    ev = [
        f"in {name!r} the gradient {far - first} steps back ‖∂E/∂h‖ = {p[far]:.3g} is {growth:.3g}× the "
        f"gradient where it enters ({p[first]:.3g}), over {tf.steps} time steps",
        f"fitted change per step back: ×{math.exp(tf.decay_rate):.4g} (rate {tf.decay_rate:.4g})",
    ]
    remedies = rank_for_exploding_in_time(findings.facts)
    return Verdict("exploding_in_time", "error", tuple(ev), remedies, layer=name,
                   data={"growth": float(growth), "decay_rate": tf.decay_rate})
