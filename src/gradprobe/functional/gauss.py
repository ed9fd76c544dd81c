"""Gaussian expectations ``E_z[f(m + √q·z)]``, z ~ N(0, 1), accurate for any variance ``q``.

Mean-field theory (Poole et al. 2016; Schoenholz et al. 2017) needs integrals such as
``∫Dz φ'(√q z)²`` at variances from 0 up to q ≈ 50 and beyond (deep residual nets, saturated sigmoid
or large-σ_w tanh nets). Two pitfalls (see ``shared/references.md``, "Oracles and pitfalls"):

* probabilists' Gauss–Hermite in ``z`` only resolves the integrand while ``q ≲ 2``: the features of
  φ sit at ``|u| ≈ 1``, i.e. at ``|z| ≈ 1/√q``, between the nodes when ``q`` is large (E[tanh'(u)²] with
  201 nodes: rel. error 1e-3 at q = 10, 0.24 at q = 50); ``numpy.polynomial.hermite_e.hermegauss``
  even returns NaN weights for n ≳ 370;
* kinks (ReLU, hard-tanh, leaky ReLU, SELU's derivative) defeat any global polynomial rule.

So we integrate in ``u = m + √q z`` with a *graded composite Gauss–Legendre* rule: panels whose
edges are the kinks ``{0, ±1}`` (and the mean), refined geometrically around them from width
``min(1, √q)/8`` up to 40 standard deviations (the Gaussian mass beyond is < e^{-800}). Every panel
holds a smooth piece of the integrand, so 24 nodes per panel give ~1e-14 relative accuracy for
every activation in :mod:`gradprobe.theory` at every variance (tests compare with ``scipy.integrate.quad``
up to q = 50). The rule is pure NumPy, vectorised, and needs no SciPy.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from gradprobe.errors import ConfigError

__all__ = ["gauss_rule", "gauss_expect"]

_NODES_PER_PANEL = 24
_TAIL_SD = 40.0  # exp(-40²/2) = e^{-800}: below float64's smallest normal number
_GL_X, _GL_W = np.polynomial.legendre.leggauss(_NODES_PER_PANEL)


def _graded_edges(center: float, lo: float, hi: float, h0: float) -> np.ndarray:
    """Panel edges in [lo, hi] refined geometrically (×2) away from ``center`` starting at width ``h0``."""
    edges = [center]
    for sign in (-1.0, 1.0):
        step = h0
        x = center
        bound = lo if sign < 0 else hi
        while sign * (bound - x) > 0:
            x = x + sign * step
            edges.append(min(max(x, lo), hi))
            step *= 2.0
    return np.asarray(edges)


def gauss_rule(q: float, mean: float = 0.0, kinks: Sequence[float] = (0.0, -1.0, 1.0)) -> tuple[np.ndarray, np.ndarray]:
    """Nodes ``u`` and weights ``w`` with ``Σ w f(u) ≈ E[f(U)]``, U ~ N(mean, q).

    Shapes: both ``(n,)`` float64; ``Σ w = 1`` to rounding. ``q = 0`` gives the single node ``mean``.
    ``kinks`` are points where ``f`` (or the integrand) may be non-smooth; panels are graded around them.

    >>> u, w = gauss_rule(4.0)
    >>> round(float(w @ u**2), 12), round(float(w @ u**4), 10)   # E[U²] = q, E[U⁴] = 3q²
    (4.0, 48.0)
    """
    q = float(q)
    mean = float(mean)
    if not math.isfinite(q) or q < 0:
        raise ConfigError(f"a Gaussian variance must be finite and >= 0; got q={q}")
    if q == 0.0:
        return np.array([mean]), np.array([1.0])
    sd = math.sqrt(q)
    lo, hi = mean - _TAIL_SD * sd, mean + _TAIL_SD * sd
    h0 = min(1.0, sd) / 8.0
    centers = [mean] + [k for k in kinks if lo < k < hi]
    edges = np.unique(np.concatenate([_graded_edges(c, lo, hi, h0) for c in centers] + [np.array([lo, hi])]))
    a, b = edges[:-1], edges[1:]
    half = 0.5 * (b - a)  # (P,)
    u = (0.5 * (a + b))[:, None] + half[:, None] * _GL_X[None, :]  # (P, n)
    dens = np.exp(-0.5 * ((u - mean) / sd) ** 2) / (sd * math.sqrt(2.0 * math.pi))
    w = half[:, None] * _GL_W[None, :] * dens
    return u.ravel(), w.ravel()


def gauss_expect(
    f: Callable[[np.ndarray], np.ndarray],
    q: float,
    mean: float = 0.0,
    kinks: Sequence[float] = (0.0, -1.0, 1.0),
) -> float:
    """``E_z[f(mean + √q·z)]`` for z ~ N(0, 1); ``f`` maps a float64 array to an array of the same shape.

    >>> round(gauss_expect(np.abs, 1.0), 12) == round(math.sqrt(2 / math.pi), 12)   # E|z|
    True
    >>> round(gauss_expect(lambda u: (1 - np.tanh(u) ** 2) ** 2, 50.0), 6)
    0.074984
    """
    u, w = gauss_rule(q, mean, kinks)
    vals = np.asarray(f(u), dtype=np.float64)
    if vals.shape != u.shape:
        raise ConfigError(f"the integrand must be elementwise (shape {u.shape} in, got {vals.shape} out)")
    return float(w @ vals)
