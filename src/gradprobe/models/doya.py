"""``DoyaNeuron``: the one-neuron dynamical model of Doya 1993 (Pascanu et al. 2013, §2.2 and Fig. 3).

    x_{t+1} = (1 − ε) x_t + ε σ(w x_t + b) + ε w′ u_t

For small ε this is the Euler discretisation of dx/dt = −x + σ(wx + b) + w′u. With u = 0 its fixed
points solve ``x = σ(wx + b)`` (independently of ε), i.e. they lie on the curve

    b = ln(x / (1 − x)) − w x,       0 < x < 1

and the map's derivative there is ``f′(x) = 1 − ε + ε w σ′(wx + b) = 1 − ε + ε w x(1 − x)``
(σ′ = σ(1 − σ) = x(1 − x) at a fixed point). A fixed point is stable when |f′| < 1, which for
0 < ε ≤ 1 and w > 0 means ``w x(1 − x) < 1``. For w > 4 there is a bistable window of b bounded by
two saddle-node bifurcations, where ``w σ′ = 1``: ``x(1 − x) = 1/w`` and ``b = ln(x/(1−x)) − w x``.
For w = 5 the window is b ∈ (−2.6556, −2.3444), inside the range [−3, −2] that Pascanu et al. sweep.

Pascanu et al. (2013, §2.2) use it to show that gradients explode when a small change of x(0) or b
moves the state across the basin boundary (the unstable fixed point), not because of a bifurcation
per se: :meth:`DoyaNeuron.sensitivity` gives dx(T)/dx(0) and dx(T)/db by autograd (and by the exact
forward recursion :func:`doya_sensitivity`), :meth:`DoyaNeuron.delta_ratio` the finite ratios
Δx(T)/Δx(0) and Δx(T)/Δb.

Math in pure functions (floats, float64); the module holds the parameters w, b, w′ and runs the map.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from gradprobe.errors import ConfigError
from gradprobe.functional.activations import ACTIVATIONS as _ACTIVATIONS

__all__ = [
    "DoyaNeuron",
    "FixedPoint",
    "Sensitivity",
    "BifurcationDiagram",
    "doya_fixed_points",
    "doya_bifurcations",
    "doya_saddle_nodes",
    "doya_sensitivity",
    "doya_fixed_point_curve",
    "doya_bifurcation_diagram",
]


_dsigmoid = _ACTIVATIONS["sigmoid"].grad_from_output  # σ′ = σ(1 − σ), plain arithmetic: floats and arrays too


def _sigmoid(z: float) -> float:
    # Two branches so that neither exp overflows.
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


def _logit(x: float) -> float:
    return math.log(x / (1.0 - x))


def _check_eps(eps: float) -> float:
    eps = float(eps)
    if not 0.0 < eps <= 1.0:
        raise ConfigError(f"Doya's step size eps must lie in (0, 1]; got eps={eps}")
    return eps


@dataclass(frozen=True)
class FixedPoint:
    """A fixed point ``x = σ(wx + b)`` of the autonomous map.

    ``multiplier`` is the map's derivative f′(x) = 1 − ε + ε w x(1 − x); ``stable`` is |f′| < 1.
    """

    x: float
    multiplier: float
    stable: bool


def doya_fixed_points(w: float, b: float, eps: float = 1.0) -> tuple[FixedPoint, ...]:
    """Every solution of ``x = σ(wx + b)``, ascending, with stability under the map of step ``eps``.

    g(x) = σ(wx + b) − x is ≥ 0 at x = 0 and ≤ 0 at x = 1, and its only critical points are where
    ``w σ′(wx + b) = 1`` (two of them when w > 4, none otherwise), so it has at most three roots, one
    per monotone piece; each is bracketed and bisected to float64 resolution. A root sitting exactly
    on a critical point (at a bifurcation, within 1e-14) is reported once, with multiplier 1.

    >>> [round(p.x, 4) for p in doya_fixed_points(5.0, -2.5)]
    [0.1448, 0.5, 0.8552]
    >>> [p.stable for p in doya_fixed_points(5.0, -2.5)]
    [True, False, True]
    """
    w, b, eps = float(w), float(b), _check_eps(eps)

    def g(x: float) -> float:
        return _sigmoid(w * x + b) - x

    breaks = [0.0, 1.0]
    if w > 4.0:
        r = math.sqrt(1.0 - 4.0 / w)
        for s in ((1.0 - r) / 2.0, (1.0 + r) / 2.0):  # σ′ = s(1 − s) = 1/w
            xc = (_logit(s) - b) / w
            if 0.0 < xc < 1.0:
                breaks.append(xc)
    breaks.sort()
    # A zero at an endpoint (σ saturated to exactly 0 or 1, |b| ≳ 37) or a tangency at a critical
    # point (a bifurcation, within 1e-14) is a root; bisection brackets the rest. Signs are taken as
    # "g > 0" or not, so a zero endpoint still brackets and converges onto itself (deduplicated below).
    roots: list[float] = [c for i, c in enumerate(breaks)
                          if g(c) == 0.0 or (0 < i < len(breaks) - 1 and abs(g(c)) <= 1e-14)]
    for lo, hi in zip(breaks[:-1], breaks[1:]):
        glo, ghi = g(lo), g(hi)
        if (glo > 0) == (ghi > 0):
            continue
        for _ in range(200):  # bisection: halves the bracket until it stops shrinking
            mid = 0.5 * (lo + hi)
            if mid in (lo, hi):
                break
            gm = g(mid)
            if (gm > 0) == (glo > 0):
                lo, glo = mid, gm
            else:
                hi = mid
        x = min((lo, hi), key=lambda v: abs(g(v)))  # the better of the two adjacent floats
        if all(abs(x - r0) > 1e-9 for r0 in roots):
            roots.append(x)
    out = []
    for x in sorted(roots):
        m = 1.0 - eps + eps * w * _dsigmoid(x)  # σ′ = x(1 − x) at a fixed point x = σ(wx + b)
        out.append(FixedPoint(x=x, multiplier=m, stable=abs(m) < 1.0))
    return tuple(out)


def doya_saddle_nodes(w: float) -> tuple[tuple[float, float], tuple[float, float]]:
    """The two saddle-node points ``(b, x)`` for recurrent weight ``w > 4``, ascending in b.

    Closed form: ``x(1 − x) = 1/w`` gives x = (1 ± √(1 − 4/w))/2, then ``b = ln(x/(1−x)) − w x``.

    >>> [(round(b, 4), round(x, 4)) for b, x in doya_saddle_nodes(5.0)]
    [(-2.6556, 0.7236), (-2.3444, 0.2764)]
    """
    w = float(w)
    if not w > 4.0:
        raise ConfigError(
            f"Doya's neuron has a bistable window only for w > 4 (w·max σ′ = w/4 must exceed 1); got w={w}"
        )
    r = math.sqrt(1.0 - 4.0 / w)
    pts = [(_logit(x) - w * x, x) for x in ((1.0 - r) / 2.0, (1.0 + r) / 2.0)]
    return tuple(sorted(pts))  # type: ignore[return-value]


def doya_bifurcations(w: float) -> tuple[float, float]:
    """``(b_low, b_high)``: the saddle-node values of b bounding the bistable window (w > 4).

    >>> [round(v, 4) for v in doya_bifurcations(5.0)]
    [-2.6556, -2.3444]
    """
    (b_lo, _), (b_hi, _) = doya_saddle_nodes(w)
    return b_lo, b_hi


def doya_fixed_point_curve(w: float, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The fixed-point curve ``b(x) = ln(x/(1−x)) − w x`` and its stability ``w x(1−x) < 1`` at ``xs``.

    Shapes follow ``xs`` (values in (0, 1)); stability is that of the flow (small ε).
    """
    xs = np.asarray(xs, dtype=np.float64)
    if np.any((xs <= 0) | (xs >= 1)):
        raise ConfigError("fixed points of Doya's neuron lie in (0, 1); pass xs strictly inside")
    return np.log(xs / (1.0 - xs)) - float(w) * xs, float(w) * _dsigmoid(xs) < 1.0


@dataclass(frozen=True)
class BifurcationDiagram:
    """Fixed points over a sweep of b: parallel 1-D arrays ``b``, ``x``, ``stable`` (one entry per
    fixed point), ``window`` = the saddle-node values (or ``None`` when w ≤ 4)."""

    w: float
    b: np.ndarray
    x: np.ndarray
    stable: np.ndarray
    window: tuple[float, float] | None


def doya_bifurcation_diagram(w: float, bs, eps: float = 1.0) -> BifurcationDiagram:
    """Fixed points of ``x = σ(wx + b)`` for every b in ``bs`` (the data of Pascanu et al. Fig. 3).

    >>> d = doya_bifurcation_diagram(5.0, [-3.0, -2.5, -2.0])
    >>> d.b.tolist()
    [-3.0, -2.5, -2.5, -2.5, -2.0]
    """
    bb, xx, ss = [], [], []
    for b in np.asarray(bs, dtype=np.float64).reshape(-1):
        for p in doya_fixed_points(w, float(b), eps):
            bb.append(float(b))
            xx.append(p.x)
            ss.append(p.stable)
    window = doya_bifurcations(w) if w > 4.0 else None
    return BifurcationDiagram(float(w), np.array(bb), np.array(xx), np.array(ss, dtype=bool), window)


@dataclass(frozen=True)
class Sensitivity:
    """``x_T`` and the exact derivatives ``dx_T/dx_0`` and ``dx_T/db`` of one trajectory."""

    x_T: float
    dx0: float
    db: float


def doya_sensitivity(w: float, b: float, eps: float, x0: float, T: int, w_in: float = 0.0,
                     u=None) -> Sensitivity:
    """Forward-mode (exact) derivatives of ``x_T`` by the recursion, without autograd.

    With a_t = f′(x_t) = 1 − ε + ε w σ′(w x_t + b):  d_{t+1} = a_t d_t (d_0 = 1) for x_0 and
    s_{t+1} = a_t s_t + ε σ′(w x_t + b) (s_0 = 0) for b. ``u``: T inputs (or ``None`` for zeros).
    """
    w, b, eps = float(w), float(b), _check_eps(eps)
    us = [0.0] * T if u is None else [float(v) for v in u]
    if len(us) != T:
        raise ConfigError(f"need T={T} inputs u_t; got {len(us)}")
    x, d, s = float(x0), 1.0, 0.0
    for t in range(T):
        sig = _sigmoid(w * x + b)
        ds = _dsigmoid(sig)
        a = 1.0 - eps + eps * w * ds
        d, s = a * d, a * s + eps * ds
        x = (1.0 - eps) * x + eps * sig + eps * w_in * us[t]
    return Sensitivity(x_T=x, dx0=d, db=s)


class DoyaNeuron(nn.Module):
    """Doya's leaky sigmoid neuron (Doya 1993): ``x_{t+1} = (1−ε)x_t + ε σ(w x_t + b) + ε w′ u_t``.

    Args:
        w: recurrent weight (Pascanu et al.: 5.0); b: bias (they sweep [−3, −2]); w_in: input weight w′.
        eps: step size ε ∈ (0, 1] (the small-ε limit is Doya's ODE); dtype: of the parameters
            (float64 by default: this is an analysis model).

    Parameters ``w``, ``b``, ``w_in`` are 0-d ``nn.Parameter``s. ``forward(x0, u=None, T=None)``:
    ``x0`` is a float or shape ``(B,)``; ``u`` is time-major ``(T, *x0.shape)`` or ``None`` (then
    give ``T``); returns the states ``(T + 1, *x0.shape)`` including ``x_0``.

    >>> m = DoyaNeuron(w=5.0, b=-2.5, eps=0.1)
    >>> [round(p.x, 3) for p in m.fixed_points()]
    [0.145, 0.5, 0.855]
    >>> with torch.no_grad():  # start just below and just above the unstable point x = 0.5
    ...     round(float(m(0.49, T=400)[-1]), 3), round(float(m(0.51, T=400)[-1]), 3)
    (0.145, 0.855)
    """

    def __init__(self, w: float = 5.0, b: float = -2.5, *, eps: float = 0.1, w_in: float = 1.0,
                 dtype: torch.dtype = torch.float64):
        super().__init__()
        self.eps = _check_eps(eps)
        self.w = nn.Parameter(torch.tensor(float(w), dtype=dtype))
        self.b = nn.Parameter(torch.tensor(float(b), dtype=dtype))
        self.w_in = nn.Parameter(torch.tensor(float(w_in), dtype=dtype))

    def step(self, x: torch.Tensor, u: torch.Tensor | None = None) -> torch.Tensor:
        """One step of the map (any shape)."""
        nxt = (1.0 - self.eps) * x + self.eps * torch.sigmoid(self.w * x + self.b)
        return nxt if u is None else nxt + self.eps * self.w_in * u

    def forward(self, x0, u: torch.Tensor | None = None, T: int | None = None) -> torch.Tensor:
        x = torch.as_tensor(x0, dtype=self.w.dtype)
        if u is None:
            if T is None or T < 0:
                raise ConfigError("DoyaNeuron.forward needs either inputs u of shape (T, ...) or a step count T >= 0")
            steps = [None] * int(T)
        else:
            u = torch.as_tensor(u, dtype=self.w.dtype)
            if T is not None and T != u.shape[0]:
                raise ConfigError(f"T={T} disagrees with u's time dimension {u.shape[0]}")
            steps = list(u)
        xs = [x]
        for ut in steps:  # Python loop: time steps are the "layers" of the unrolled network
            xs.append(self.step(xs[-1], ut))
        return torch.stack(xs)  # (T + 1, *x0.shape)

    # -- analysis (pure functions of the current parameters) ----------------------------------
    def _wb(self) -> tuple[float, float]:
        return float(self.w.detach()), float(self.b.detach())

    def fixed_points(self) -> tuple[FixedPoint, ...]:
        """Fixed points of the autonomous map (u = 0), see :func:`doya_fixed_points`."""
        w, b = self._wb()
        return doya_fixed_points(w, b, self.eps)

    def bifurcations(self) -> tuple[float, float]:
        """The two saddle-node values of b for the current w (ConfigError if w ≤ 4)."""
        return doya_bifurcations(self._wb()[0])

    def bifurcation_diagram(self, bs) -> BifurcationDiagram:
        """Fixed points for each b in ``bs`` at the current w and ε."""
        return doya_bifurcation_diagram(self._wb()[0], bs, self.eps)

    def sensitivity(self, x0: float, T: int, u=None) -> Sensitivity:
        """``dx_T/dx_0`` and ``dx_T/db`` by autograd through T steps (the model's parameters as is)."""
        x0t = torch.tensor(float(x0), dtype=self.w.dtype, requires_grad=True)
        xT = self(x0t, u=u, T=None if u is not None else T)[-1]
        gx0, gb = torch.autograd.grad(xT, (x0t, self.b))
        return Sensitivity(x_T=float(xT.detach()), dx0=float(gx0), db=float(gb))

    @torch.no_grad()
    def delta_ratio(self, x0: float, T: int, *, dx0: float = 0.0, db: float = 0.0, u=None) -> float:
        """The finite ratio ``(x_T(x0 + dx0, b + db) − x_T(x0, b)) / (dx0 or db)`` (give exactly one).

        Unlike the derivative, it sees a jump across the basin boundary: when (x0, b) sits near the
        unstable fixed point the ratio is ≈ (gap between the stable points) / step.
        """
        if (dx0 == 0.0) == (db == 0.0):
            raise ConfigError("delta_ratio needs exactly one non-zero step: dx0 or db")
        Tn = None if u is not None else T
        base = self(torch.tensor(float(x0), dtype=self.w.dtype), u=u, T=Tn)[-1]
        old_b = self.b.detach().clone()
        try:
            self.b.add_(db)
            moved = self(torch.tensor(float(x0) + dx0, dtype=self.w.dtype), u=u, T=Tn)[-1]
        finally:
            self.b.copy_(old_b)  # restore what we changed
        return float((moved - base) / (dx0 if dx0 != 0.0 else db))
