"""Mean-field signal propagation in wide random MLPs (Poole et al. 2016; Schoenholz et al. 2017).

Network: ``h^l = W^l φ(h^{l−1}) + b^l`` with ``W_ij ~ N(0, σ_w²/N)``, ``b_i ~ N(0, σ_b²)``, width N → ∞.

* Length map ``q^l = F(q^{l−1}) = σ_w² ∫Dz φ(√q^{l−1} z)² + σ_b²``; ``q*`` is the fixed point reached by
  iterating F from ``q0`` (default 1). ``q* = inf`` when the variance grows without bound.
* ``χ₁ = σ_w² ∫Dz φ'(√q* z)²``: the per-layer factor of the back-propagated *squared* norm,
  ``E‖δ^{l−1}‖² ≈ χ₁ E‖δ^l‖²`` (so the norm changes by ``√χ₁`` per layer).
* ``ξ_q = −1/ln F'(q*)`` with ``F'(q) = σ_w² E[φ(u)φ'(u)u]/q`` (Gaussian integration by parts), the
  depth over which the length map converges.
* Correlation map ``c → (σ_w² E[φ(u₁)φ(u₂)] + σ_b²)/q*`` (u₁, u₂ ~ N(0, q*) with correlation c); its
  stable fixed point ``c*`` (1 in the ordered phase) and slope there ``χ_c = σ_w² E[φ'(u₁)φ'(u₂)]``
  (= χ₁ when c* = 1); ``depth_scale ξ_c = −1/ln χ_c`` (inf at criticality).
* phase: "ordered" (χ₁ < 1, gradients vanish), "critical" (χ₁ = 1), "chaotic" (χ₁ > 1, they explode).

Integrals use :func:`gradprobe.functional.gauss.gauss_rule` (graded composite rule, accurate at any
q and across kinks); positively homogeneous activations (relu, leaky_relu, linear) and hard-tanh use
closed forms. φ, φ′ and the kinks of every named activation are the rows of the activation table
(:mod:`gradprobe.functional.activations`), evaluated in float64 through NumPy views. All numbers are
float64 Python floats.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from gradprobe.errors import ConfigError, require
from gradprobe.functional.activations import ACTIVATIONS as _TABLE
from gradprobe.functional.activations import leaky_relu as _leaky_row
from gradprobe.functional.gauss import gauss_expect, gauss_rule

__all__ = [
    "MeanField",
    "mean_field",
    "critical_sigma_w2",
    "critical_line",
    "ResidualGrowth",
    "residual_growth",
    "ACTIVATIONS",
]

#: the activations mean-field theory knows by name: the rows of the activation table
ACTIVATIONS = tuple(_TABLE)
_SQRT2 = math.sqrt(2.0)
_CRIT_TOL = 1e-10  # |χ₁ − 1| below this counts as critical (quadrature is ~1e-14 accurate)
# positively homogeneous activations φ(u) = a·u⁻ + b·u⁺: (a, b), for the closed-form moments
_SLOPES = {"relu": (0.0, 1.0), "linear": (1.0, 1.0)}


def _numpy(f: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[np.ndarray], np.ndarray]:
    """A torch elementwise function of the activation table as a float64 NumPy one (zero-copy in and out)."""

    def g(u):
        return f(torch.from_numpy(np.asarray(u, dtype=np.float64))).numpy()

    return g


@dataclass(frozen=True)
class _Act:
    """An activation as a pair of NumPy functions, its kinks, and (if positively homogeneous) its slopes."""

    name: str
    phi: Callable[[np.ndarray], np.ndarray]
    dphi: Callable[[np.ndarray], np.ndarray]
    kinks: tuple[float, ...] = (0.0,)
    slopes: tuple[float, float] | None = None  # (slope for u<0, slope for u>0) if φ(u) = a·u⁻ + b·u⁺

    def moments(self, q: float) -> tuple[float, float, float]:
        """(E[φ'²], E[φ'⁴], E[φ²]) at variance q; closed forms where the integrand has kinks."""
        if self.slopes is not None:
            a, b = self.slopes
            return (a * a + b * b) / 2, (a**4 + b**4) / 2, q * (a * a + b * b) / 2
        if self.name == "hard_tanh":
            return _hard_tanh_moments(q)
        u, w = gauss_rule(q, kinks=self.kinks)  # one rule, three integrands (as gauss_expect would do thrice)
        d, p = self.dphi(u), self.phi(u)
        return float(w @ d**2), float(w @ d**4), float(w @ p**2)


def _hard_tanh_moments(q: float) -> tuple[float, float, float]:
    # φ = clip(u, −1, 1), u ~ N(0, q): φ'² = φ'⁴ = 1{|u|<1}; with a = 1/√q,
    # E[φ²] = q·(erf(a/√2) − 2aϕ(a)) + erfc(a/√2)   (E[z²; |z|<a] = erf(a/√2) − 2aϕ(a)).
    if q == 0.0:
        return 1.0, 1.0, 0.0
    a = 1.0 / math.sqrt(q)
    p_in = math.erf(a / _SQRT2)
    pdf = math.exp(-0.5 * a * a) / math.sqrt(2 * math.pi)
    return p_in, p_in, q * (p_in - 2 * a * pdf) + math.erfc(a / _SQRT2)


def _from_callable(f: Callable) -> _Act:
    """Wrap a torch elementwise function; φ' by autograd in float64."""
    name = getattr(f, "__name__", type(f).__name__)

    def phi(u):
        with torch.no_grad():
            return f(torch.as_tensor(u, dtype=torch.float64)).detach().numpy()

    def dphi(u):
        x = torch.as_tensor(u, dtype=torch.float64).clone().requires_grad_(True)
        with torch.enable_grad():
            y = f(x)
            if y.shape != x.shape:
                raise ConfigError(f"activation {name} must be elementwise; mapped shape {tuple(x.shape)} to {tuple(y.shape)}")
            (g,) = torch.autograd.grad(y.sum(), x)
        return g.numpy()

    try:
        phi(np.zeros(3))
        dphi(np.zeros(3))
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(
            f"activation {name!r} must be a torch function of one float64 tensor (e.g. torch.tanh or nn.SiLU()); "
            f"calling it failed with {type(exc).__name__}: {exc}"
        ) from exc
    return _Act(name, phi, dphi, (0.0, -1.0, 1.0))


def _activation(activation, slope: float = 0.01) -> _Act:
    # φ, φ′ and the kinks come from the activation table (functional.activations); mean field adds the
    # quadrature's default panel edge 0 and, for positively homogeneous φ, the slopes of its closed forms
    if callable(activation) and not isinstance(activation, str):
        return _from_callable(activation)
    if not isinstance(activation, str) or activation not in _TABLE:
        raise ConfigError(f"unknown activation {activation!r}; choose one of {ACTIVATIONS} or pass a torch function")
    row = _leaky_row(slope) if activation == "leaky_relu" else _TABLE[activation]
    slopes = (float(slope), 1.0) if activation == "leaky_relu" else _SLOPES.get(activation)
    return _Act(activation, _numpy(row.fn), _numpy(row.grad), (0.0,) + row.kinks, slopes)


def _check_var(name: str, v: float) -> float:
    v = float(v)
    if not math.isfinite(v) or v < 0:
        raise ConfigError(f"{name} is a variance and must be finite and >= 0; got {v}")
    return v


def _length_map(act: _Act, sigma_w2: float, sigma_b2: float, q: float) -> float:
    return sigma_w2 * act.moments(q)[2] + sigma_b2


_Q_MAX = 1e15  # beyond this the variance is declared divergent
_Q_MIN = 1e-12  # a fixed point below this is reported as 0: F(q) − q is lost in rounding there


def _bisect(g: Callable[[float], float], lo: float, hi: float, rel: float = 1e-15, iters: int = 200) -> float:
    """Root of g in [lo, hi] where sign(g(lo)) != sign(g(hi)), by bisection (robust, needs no SciPy)."""
    glo = g(lo)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if hi - lo <= rel * max(abs(hi), abs(lo)) or mid in (lo, hi):
            break
        gm = g(mid)
        if (gm > 0) == (glo > 0) and gm != 0:
            lo, glo = mid, gm
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _q_star(act: _Act, sigma_w2: float, sigma_b2: float, q0: float) -> float:
    if act.slopes is not None:  # F(q) = σ_w²·c·q + σ_b²: closed form
        slope = sigma_w2 * act.moments(1.0)[2]
        if slope < 1.0:
            return sigma_b2 / (1.0 - slope)
        return q0 if (slope == 1.0 and sigma_b2 == 0.0) else math.inf
    g = lambda q: _length_map(act, sigma_w2, sigma_b2, q) - q  # noqa: E731
    g0 = g(q0)
    if g0 == 0.0:
        return q0
    if g0 > 0:  # q grows from q0: first sign change above
        lo, hi = q0, 2.0 * q0
        while g(hi) > 0:
            lo, hi = hi, 2.0 * hi
            if hi > _Q_MAX:
                return math.inf
        return _bisect(g, lo, hi)
    lo, hi = 0.5 * q0, q0  # q shrinks: first sign change below
    while g(lo) <= 0:  # "<=": saturating maps (hard-tanh) have F(q) − q = 0 to rounding near 0
        lo, hi = 0.5 * lo, lo
        if lo < _Q_MIN:
            return 0.0
    return _bisect(g, lo, hi)


@dataclass(frozen=True)
class MeanField:
    """Mean-field summary of a wide random MLP (see the module docstring for every definition).

    ``r = E[φ'⁴]/E[φ'²]²`` at q* sets the finite-width spread of measured gradient ratios
    (see :func:`gradprobe.analysis.theory_vs_measurement.compare_depth`).

    Edge cases: when the variance diverges (``q_star = inf``, e.g. ReLU with σ_w² > 2, or any
    unbounded φ at large σ_w²) χ₁ uses the limits of φ' at ±∞, the correlation map is undefined
    (``c_star``, ``chi_c``, ``depth_scale`` are NaN), ``xi_q`` is inf, and "chaotic" then means
    "gradients grow with depth" rather than chaos in the correlation map. ``xi_q`` is also inf
    whenever the length map does not converge geometrically (F'(q*) ≥ 1, e.g. tanh at σ_w² = 1,
    σ_b = 0, where q^l → 0 like 1/l). A fixed point below 1e-12 is reported as exactly 0.
    """

    activation: str
    sigma_w2: float
    sigma_b2: float
    q_star: float
    chi1: float
    chi_c: float
    c_star: float
    depth_scale: float
    xi_q: float
    r: float
    phase: str

    @property
    def grad_norm_factor(self) -> float:
        """Predicted per-layer factor of ‖∂L/∂h‖ going backward: √χ₁."""
        return math.sqrt(self.chi1)


def _depth(x: float) -> float:
    """−1/ln x for a contraction factor x (inf at x = 1, 0 at x = 0, NaN if x > 1 or undefined)."""
    if not math.isfinite(x) or x > 1.0 + _CRIT_TOL:
        return math.nan
    if x >= 1.0 - _CRIT_TOL:
        return math.inf
    if x <= 0.0:
        return 0.0
    return -1.0 / math.log(x)


def _c_map_pieces(act: _Act, q: float):
    """A function c → (E[φ(u₁)φ(u₂)], E[φ'(u₁)φ'(u₂)]) for u₁, u₂ ~ N(0, q) with correlation c.

    Written as an iterated integral, ``E[g(u₁) h(u₂)] = E_{u₁}[g(u₁)·E[h(c u₁ + √(q(1−c²)) z)]]``, so
    both levels use the graded 1-D rule with panels at the kinks of φ (a tensor-product rule in
    (z₁, z₂) would cut kinks obliquely: 1–2% error on χ_c for hard-tanh).
    """
    u1, w1 = gauss_rule(q, kinks=act.kinks)
    keep = w1 > 1e-30 * w1.max()  # nodes 30+ s.d. out contribute nothing at float64 precision
    u1, w1 = u1[keep], w1[keep]
    p1, d1 = act.phi(u1), act.dphi(u1)

    def at(c: float) -> tuple[float, float]:
        var = q * max(0.0, 1.0 - c * c)
        ep = np.empty_like(u1)
        ed = np.empty_like(u1)
        for i, m in enumerate(c * u1):  # inner conditional expectation given u₁
            u2, w2 = gauss_rule(var, mean=float(m), kinks=act.kinks)
            ep[i] = w2 @ act.phi(u2)
            ed[i] = w2 @ act.dphi(u2)
        return float(w1 @ (p1 * ep)), float(w1 @ (d1 * ed))

    return at


def _chi1(act: _Act, sigma_w2: float, sigma_b2: float, q0: float) -> float:
    q = _q_star(act, sigma_w2, sigma_b2, q0)
    return sigma_w2 * _dphi_moments(act, q)[0]


def _dphi_moments(act: _Act, q: float) -> tuple[float, float]:
    """(E[φ'²], E[φ'⁴]) at q; at q = inf the limits (φ'(−∞)² + φ'(+∞)²)/2 and the same for φ'⁴."""
    if math.isinf(q):
        # The variance diverges; φ' then sees only its limits at ±∞.
        lim = act.dphi(np.array([-1e3, 1e3])) if act.slopes is None else np.array(act.slopes)
        return float(np.mean(lim**2)), float(np.mean(lim**4))
    return act.moments(q)[:2]


def mean_field(activation, sigma_w2: float, sigma_b2: float = 0.0, *, slope: float = 0.01, q0: float = 1.0) -> MeanField:
    """Fixed point, χ₁, χ_c, depth scales and phase of a wide random MLP (Poole et al. 2016, Schoenholz et al. 2017).

    Args:
        activation: one of ``ACTIVATIONS`` or a torch elementwise function (φ' by autograd).
        sigma_w2: σ_w² (weights N(0, σ_w²/fan_in)); sigma_b2: σ_b² (biases N(0, σ_b²)).
        slope: the negative slope of ``leaky_relu``. q0: variance the length map is iterated from.

    >>> mean_field("relu", 2.0).chi1, mean_field("relu", 2.0).phase
    (1.0, 'critical')
    >>> mf = mean_field("tanh", 1.0, 0.0)
    >>> mf.q_star, mf.chi1, mf.phase, mf.depth_scale
    (0.0, 1.0, 'critical', inf)
    >>> round(mean_field("tanh", 2.0).chi1, 6)
    1.105529
    """
    sigma_w2 = _check_var("sigma_w2", sigma_w2)
    sigma_b2 = _check_var("sigma_b2", sigma_b2)
    q0 = float(q0)
    if not (math.isfinite(q0) and q0 > 0):
        raise ConfigError(f"q0 (the starting variance) must be finite and > 0; got {q0}")
    act = _activation(activation, slope)
    q = _q_star(act, sigma_w2, sigma_b2, q0)
    e2, e4 = _dphi_moments(act, q)
    chi1 = sigma_w2 * e2
    r = e4 / (e2 * e2) if e2 > 0 else math.nan
    if math.isinf(q):
        fprime = math.nan
    elif act.slopes is not None:
        fprime = sigma_w2 * act.moments(1.0)[2]
    elif q == 0.0:
        fprime = sigma_w2 * float(act.dphi(np.zeros(1))[0]) ** 2
    else:
        fprime = sigma_w2 * gauss_expect(lambda u: act.phi(u) * act.dphi(u) * u, q, kinks=act.kinks) / q
    xi_q = math.inf if (math.isnan(fprime) or fprime >= 1.0 - _CRIT_TOL) else _depth(fprime)

    if abs(chi1 - 1.0) <= _CRIT_TOL:
        phase = "critical"
    else:
        phase = "ordered" if chi1 < 1.0 else "chaotic"
    if math.isinf(q):
        c_star, chi_c = math.nan, math.nan
    elif chi1 <= 1.0 + _CRIT_TOL or q == 0.0:
        c_star, chi_c = 1.0, min(chi1, 1.0) if phase == "critical" else chi1
    else:
        at = _c_map_pieces(act, q)
        gc = lambda c: (sigma_w2 * at(c)[0] + sigma_b2) / q - c  # noqa: E731
        # c = 1 is unstable here (slope χ₁ > 1); c = −1 can be an unstable fixed point too (odd φ,
        # σ_b = 0), so search the open interval, from 0 toward the side where the map moves.
        # Each evaluation is a 2-D integral, so use Brent's method (~10 evaluations, not ~45).
        brentq = require("scipy.optimize", "theory").brentq
        g0 = gc(0.0)
        if abs(g0) <= 1e-15:
            c_star = 0.0
        elif g0 > 0:
            # gc(1 − ε) ≈ −(χ₁ − 1)ε < 0; back off ε until that is visible above quadrature error.
            hi = next((1.0 - e for e in (1e-9, 1e-7, 1e-5, 1e-3) if gc(1.0 - e) < 0), None)
            if hi is None:
                raise ConfigError(f"{act.name}: could not bracket the correlation fixed point (χ₁ = {chi1:.6g})")
            c_star = float(brentq(gc, 0.0, hi, xtol=1e-13))
        else:
            c_star = -1.0 if gc(-1.0 + 1e-9) <= 0 else float(brentq(gc, -1.0 + 1e-9, 0.0, xtol=1e-13))
        chi_c = sigma_w2 * at(c_star)[1]
    return MeanField(
        activation=act.name,
        sigma_w2=sigma_w2,
        sigma_b2=sigma_b2,
        q_star=q,
        chi1=chi1,
        chi_c=chi_c,
        c_star=c_star,
        depth_scale=_depth(chi_c),
        xi_q=xi_q,
        r=r,
        phase=phase,
    )


def critical_sigma_w2(activation, sigma_b2: float = 0.0, *, slope: float = 0.01, q0: float = 1.0) -> float:
    """σ_w² at which χ₁ = 1 for the given σ_b² (the edge of chaos), by Brent's method on σ_w² ↦ χ₁ − 1.

    Closed form for relu/leaky_relu/linear: σ_w² = 1/E[φ'²] (2 for ReLU, 1 for linear).

    >>> critical_sigma_w2("relu"), round(critical_sigma_w2("tanh"), 6), round(critical_sigma_w2("tanh", 0.05), 4)
    (2.0, 1.0, 1.761)
    """
    sigma_b2 = _check_var("sigma_b2", sigma_b2)
    act = _activation(activation, slope)
    if act.slopes is not None:
        return 1.0 / act.moments(1.0)[0]
    f = lambda s: _chi1(act, s, sigma_b2, q0) - 1.0  # noqa: E731
    lo, hi = 0.5, 2.0
    while f(lo) > 0:
        lo *= 0.5
        if lo < 1e-8:
            raise ConfigError(f"{act.name}: χ₁ > 1 even for σ_w² → 0 at σ_b² = {sigma_b2}; no critical point")
    while f(hi) < 0:
        lo, hi = hi, 2.0 * hi
        if hi > 1e8:
            raise ConfigError(f"{act.name}: χ₁ < 1 for every σ_w² up to 1e8 at σ_b² = {sigma_b2}; no critical point")
    if f(hi) == 0.0:
        return hi
    optimize = require("scipy.optimize", "theory")
    return float(optimize.brentq(f, lo, hi, xtol=1e-14, rtol=1e-13))


def critical_line(activation, sigma_b2_values, *, slope: float = 0.01) -> np.ndarray:
    """Critical σ_w² for each σ_b² in ``sigma_b2_values`` (shape ``(n,)`` → ``(n,)``); the order-to-chaos line.

    >>> critical_line("relu", [0.0, 0.5]).tolist()
    [2.0, 2.0]
    """
    values = np.atleast_1d(np.asarray(sigma_b2_values, dtype=np.float64))
    return np.array([critical_sigma_w2(activation, float(b), slope=slope) for b in values])


@dataclass(frozen=True)
class ResidualGrowth:
    """Predicted signal growth through residual blocks ``x^l = x^{l−1} + s·V φ(W x^{l−1})``.

    ``q``: (depth+1,) per-unit E[x_i²] at block outputs (q[0] = input); ``forward_growth[l] = q[l+1]/q[l]``;
    ``grad_growth[l]``: the factor of E‖δ‖² across block l+1 going backward,
    ``1 + s²σ_v²σ_w²·E[φ'(√(σ_w² q^{l}) z)²]`` (cross terms vanish in expectation since V has zero mean).
    """

    q: np.ndarray
    forward_growth: np.ndarray
    grad_growth: np.ndarray

    @property
    def log_grad_growth(self) -> np.ndarray:
        """ln of the per-block growth of E‖δ‖² (ReLU, σ_w² = 2, σ_v² = 1, s = 1: ln 2 ≈ 0.69 per block)."""
        return np.log(self.grad_growth)

    @property
    def total_grad_growth(self) -> float:
        """E‖δ^0‖²/E‖δ^depth‖²: the product of the per-block factors."""
        return float(np.prod(self.grad_growth))


def residual_growth(
    activation,
    sigma_w2: float,
    sigma_v2: float = 1.0,
    branch_scale: float = 1.0,
    depth: int = 1,
    *,
    q0: float = 1.0,
    slope: float = 0.01,
) -> ResidualGrowth:
    """Mean-field growth through ``depth`` residual blocks (no biases), W ~ N(0, σ_w²/N), V ~ N(0, σ_v²/N).

    Forward: ``q^l = q^{l−1} + s²σ_v² E[φ(√(σ_w² q^{l−1}) z)²]``; backward: see :class:`ResidualGrowth`.
    Even at a "critical" branch init the signal grows every block; scaling the branch by
    ``s ∝ depth^{−1/2}`` keeps the total growth bounded.

    >>> g = residual_growth("relu", 2.0, 1.0, 1.0, depth=3)
    >>> g.grad_growth.tolist(), round(float(g.log_grad_growth[0]), 4)
    ([2.0, 2.0, 2.0], 0.6931)
    """
    sigma_w2 = _check_var("sigma_w2", sigma_w2)
    sigma_v2 = _check_var("sigma_v2", sigma_v2)
    if not isinstance(depth, int) or depth < 1:
        raise ConfigError(f"depth must be a positive integer number of residual blocks; got {depth!r}")
    if not math.isfinite(branch_scale):
        raise ConfigError(f"branch_scale must be finite; got {branch_scale}")
    act = _activation(activation, slope)
    s2 = float(branch_scale) ** 2
    qs = [_check_var("q0", q0)]
    grad = []
    for _ in range(depth):
        e2, _, p2 = act.moments(sigma_w2 * qs[-1])
        grad.append(1.0 + s2 * sigma_v2 * sigma_w2 * e2)
        qs.append(qs[-1] + s2 * sigma_v2 * p2)
    q = np.array(qs)
    with np.errstate(divide="ignore", invalid="ignore"):
        fwd = q[1:] / q[:-1]
    return ResidualGrowth(q=q, forward_growth=fwd, grad_growth=np.array(grad))
