"""Pure numpy math on gradient-norm profiles (over time steps or layers): decay rate and horizon."""
from __future__ import annotations

import numpy as np

from gradprobe.errors import ConfigError

__all__ = ["fit_decay_rate", "gradient_horizon"]


def _support(profile: np.ndarray) -> tuple[int, int]:
    """First and last index with a positive, finite value (``(-1, -1)`` if none)."""
    ok = np.flatnonzero(np.isfinite(profile) & (profile > 0))
    return (int(ok[0]), int(ok[-1])) if ok.size else (-1, -1)


def fit_decay_rate(profile: np.ndarray) -> tuple[float, tuple[int, int]]:
    """Per-step rate ``r`` with ``profile[s] ≈ C·e^{r·s}`` on the decaying side; returns ``(r, (s0, s1))``.

    ``profile[s]`` is a gradient norm ``s`` steps back along the propagation (``s = 0`` nearest the
    loss end). ``r`` is the least-squares slope of ``ln profile[s]`` over ``s ∈ [s0, s1]``, where
    ``s1`` is the farthest positive entry and ``s0`` the peak (argmax), so the fit covers the side on
    which the signal decays going back; if the peak *is* the farthest entry (the signal grows all the
    way back: explosion), ``s0`` is the first positive entry. Zero entries (no gradient, underflow)
    are skipped.

    Sign convention: ``r < 0`` vanishing (the signal shrinks by ``e^r`` per step back), ``r > 0``
    exploding. For a linear RNN ``h_t = α·Q h_{t−1}`` (Q orthogonal) and a loss at the last step,
    ``r = ln α`` exactly. ``nan`` if fewer than two usable points.

    >>> r, window = fit_decay_rate(0.5 ** np.arange(10))
    >>> bool(abs(r - np.log(0.5)) < 1e-12), window
    (True, (0, 9))
    """
    p = np.asarray(profile, dtype=np.float64)
    first, last = _support(p)
    if first < 0:
        return float("nan"), (-1, -1)
    masked = np.where(np.isfinite(p), p, -np.inf)
    peak = int(np.argmax(masked))
    s0 = first if peak >= last else peak
    s = np.arange(s0, last + 1)
    v = p[s0 : last + 1]
    keep = np.isfinite(v) & (v > 0)
    if keep.sum() < 2:
        return float("nan"), (s0, last)
    slope = np.polyfit(s[keep].astype(np.float64), np.log(v[keep]), 1)[0]
    return float(slope), (s0, last)


def gradient_horizon(profile: np.ndarray, fraction: float = 1e-2) -> int:
    """Steps back from where the gradient enters to the farthest step still ``≥ fraction·max``.

    ``profile[s]`` as in :func:`fit_decay_rate`. Returns ``s_far − s_first`` with ``s_first`` the first
    positive entry (the loss end) and ``s_far`` the largest ``s`` with ``profile[s] ≥ fraction·max``.
    For the linear RNN ``h_t = α·Q h_{t−1}`` with a loss at the last step and ``α < 1``:
    ``⌊ln(fraction)/ln α⌋`` (capped at ``T−1``); with ``α ≥ 1`` the whole sequence, ``T−1``.

    Note: with a loss at every step the total gradient at every step includes its own direct term,
    so the horizon of ``‖∂E/∂h_k‖`` is long even when long-term components vanish; use
    :func:`rnn_lag_decomposition` to separate them.

    >>> gradient_horizon(0.5 ** np.arange(20), fraction=0.1)  # 0.5**3 = 0.125 >= 0.1 > 0.5**4
    3
    """
    if not 0 < fraction <= 1:
        raise ConfigError(f"horizon(fraction={fraction}) must be in (0, 1]")
    p = np.asarray(profile, dtype=np.float64)
    first, _ = _support(p)
    if first < 0:
        return 0
    finite = np.where(np.isfinite(p), p, 0.0)
    above = np.flatnonzero(finite >= fraction * finite.max())
    return int(above[-1] - first)
