"""Loss curvature, and the question "is a small gradient a minimum, a saddle, or a vanishing gradient?"

Why doesn't a vanishing gradient mean we are at the optimum (a question often asked, e.g. on Stack
Exchange)? A small ``‖∇L‖`` happens

* at a minimum: the loss is near its floor and the Hessian has no significant negative eigenvalue;
* at a saddle: the Hessian has a significant negative eigenvalue (``f(x, y) = x² − y²`` at 0);
* far from any optimum: ``f_c(x) = max(0, c·x)`` has ``f' = c`` (tiny) at every ``x > 0`` however high
  the loss, and a deep sigmoid net back-propagates a gradient that shrinks layer by layer
  (``∏ w_i σ'(·)``, ``σ' ≤ 1/4``) so the lower layers are starved while the loss is still high.

Hessian eigenvalues come from Lanczos on double-backward Hessian-vector products, the trace from
Hutchinson's estimator (:mod:`gradprobe.functional.lanczos`, :mod:`gradprobe.functional.products`).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from gradprobe._display import html_pre
from gradprobe.errors import ConfigError
from gradprobe.functional.lanczos import hutchinson_trace, lanczos
from gradprobe.functional.products import hessian_operator

__all__ = [
    "HessianEigs",
    "hessian_eigs",
    "HessianTrace",
    "hessian_trace",
    "StationaryPoint",
    "classify_stationary",
    "KINDS",
]

KINDS = ("converged", "saddle", "vanishing_far_from_optimum", "not_stationary")


@dataclass(frozen=True)
class HessianEigs:
    """Extreme Hessian eigenvalues: ``top (k,)`` descending, ``bottom (k,)`` ascending (``None`` if not asked)."""

    top: np.ndarray | None
    bottom: np.ndarray | None
    top_residuals: np.ndarray | None
    bottom_residuals: np.ndarray | None
    n_params: int
    n_iter: int
    converged: bool

    def as_dict(self) -> dict:
        """Plain JSON values, e.g. for ``probe.note("curvature", {...})`` (see :mod:`gradprobe.report.notes`)."""
        plain = lambda a: None if a is None else np.asarray(a, dtype=np.float64).tolist()  # noqa: E731
        return {"top": plain(self.top), "bottom": plain(self.bottom), "n_params": int(self.n_params),
                "n_iter": int(self.n_iter), "converged": bool(self.converged)}


def hessian_eigs(
    loss_fn: Callable[[], torch.Tensor],
    params: Iterable[torch.Tensor],
    k: int = 1,
    which: str = "both",
    *,
    tol: float = 1e-10,
    max_iter: int | None = None,
    generator: torch.Generator | None = None,
) -> HessianEigs:
    """The ``k`` largest and/or smallest eigenvalues of ``H = ∇²_θ L`` by Lanczos on Hessian-vector products.

    ``loss_fn()`` recomputes the scalar loss from ``params`` (the Hessian is of whatever it returns: a
    batch mean gives the Hessian of the mean). ``which``: "top", "bottom" or "both" (one Krylov space
    serves both ends). ``tol``: Ritz residual relative to the largest ``|α|, |β|`` seen (≈ ``‖H‖``).
    Cost: ``n_iter`` double-backward products, ``n_iter × n_params`` float64 memory.

    >>> w = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    >>> e = hessian_eigs(lambda: w[0] ** 2 - 3 * w[1] ** 2, [w])
    >>> e.top.round(8).tolist(), e.bottom.round(8).tolist()
    ([2.0], [-6.0])
    """
    ps = list(params)
    _, grad, matvec = hessian_operator(loss_fn, ps)
    n = grad.numel()
    r = lanczos(matvec, n, k=k, which=which, tol=tol, max_iter=max_iter, generator=generator, device=grad.device)
    pick = (lambda a: None if a is None else a[0])
    return HessianEigs(pick(r.top), pick(r.bottom), pick(r.top_residuals), pick(r.bottom_residuals), n, r.n_iter, r.converged)


@dataclass(frozen=True)
class HessianTrace:
    """Hutchinson estimate ``value`` of ``tr H`` with standard error ``stderr`` over ``n_probes`` probes."""

    value: float
    stderr: float
    n_probes: int

    def as_dict(self) -> dict:
        """``{"trace", "trace_stderr", "trace_probes"}`` (names that merge with the other curvature results)."""
        return {"trace": float(self.value), "trace_stderr": float(self.stderr), "trace_probes": int(self.n_probes)}


def hessian_trace(
    loss_fn: Callable[[], torch.Tensor],
    params: Iterable[torch.Tensor],
    n_probes: int = 100,
    *,
    generator: torch.Generator | None = None,
) -> HessianTrace:
    """``tr ∇²L ≈ (1/P) Σ_p z_pᵀ H z_p`` with Rademacher ``z_p`` (Hutchinson 1990); unbiased.

    The standard error ``s/√P`` is the sample standard deviation of ``z_pᵀHz_p`` over ``√P``; for a
    diagonal Hessian every probe gives the exact trace and the error is 0.

    >>> w = torch.ones(3, dtype=torch.float64, requires_grad=True)
    >>> t = hessian_trace(lambda: (w ** 4).sum(), [w], n_probes=8)  # H = diag(12 w²)
    >>> t.value, t.stderr
    (36.0, 0.0)
    """
    ps = list(params)
    _, grad, matvec = hessian_operator(loss_fn, ps)
    est = hutchinson_trace(
        lambda Z: (Z * matvec(Z)).sum(1), grad.numel(), n_probes=n_probes, generator=generator, device=grad.device
    )
    return HessianTrace(float(est.value[0]), float(est.stderr[0]), n_probes)


@dataclass(frozen=True)
class StationaryPoint:
    """What a small (or not) gradient means at the current parameters.

    ``kind`` is one of :data:`KINDS`; ``reasons`` says which tests decided it, with numbers.
    ``neg_curvature = −λ_min / max(|λ_max|, |λ_min|)`` (> 0 when there is negative curvature);
    ``layer_ratio = ‖g_first‖/‖g_last‖`` over the per-layer gradient profile (``None`` without one);
    ``predicted_decrease = ‖g‖²/(2 gᵀHg/‖g‖²)`` (``inf`` without positive curvature along ``g``).
    """

    kind: str
    loss: float
    loss_floor: float | None
    grad_norm: float
    top_eig: float
    bottom_eig: float
    neg_curvature: float
    layer_ratio: float | None
    predicted_decrease: float
    reasons: tuple[str, ...]

    @property
    def is_converged(self) -> bool:
        return self.kind == "converged"

    def as_dict(self) -> dict:
        """Plain JSON values (``reasons`` as a list), e.g. for ``probe.note("curvature", point.as_dict())``."""
        d = dataclasses.asdict(self)
        d["reasons"] = list(self.reasons)
        return d

    def __str__(self) -> str:
        return f"{self.kind.replace('_', ' ')} (loss {self.loss:.4g}, ‖∇L‖ {self.grad_norm:.3g}):\n" + "\n".join(
            f"  - {r}" for r in self.reasons)

    def _repr_html_(self) -> str:
        return html_pre(str(self))


def classify_stationary(
    loss_fn: Callable[[], torch.Tensor],
    params: Iterable[torch.Tensor],
    loss_floor: float | None = None,
    *,
    loss_scale: float = 1.0,
    grad_tol: float = 1e-3,
    loss_tol: float = 1e-2,
    neg_tol: float = 1e-3,
    starve_tol: float = 1e-2,
    layers: Sequence[Iterable[torch.Tensor]] | None = None,
    layer_grad_norms: Sequence[float] | None = None,
    lanczos_tol: float = 1e-6,
    max_iter: int = 40,
    generator: torch.Generator | None = None,
) -> StationaryPoint:
    """Tell a minimum, a saddle and a gradient vanishing far from the optimum apart (a vanishing gradient
    is "``0 < ‖∇F(p)‖ ≤ c`` for some small c" while the loss is still far from its optimum; Dauphin et al.
    2014 on saddle points).

    Tests (all relative; the loss is measured in units of ``loss_scale``, e.g. ``ln C`` for C-class
    cross-entropy or ``Var(y)`` for MSE, default 1):

    * *small gradient*: ``‖∇L‖ <= grad_tol · loss_scale`` (the small ``c`` above).
    * *near the floor*: ``L − loss_floor <= loss_tol · loss_scale``. Without ``loss_floor`` the gap is
      replaced by the decrease the local quadratic model still predicts along ``−g``,
      ``‖g‖²/(2κ)`` with ``κ = gᵀHg/‖g‖²`` (infinite when ``κ <= 0``: a flat or concave direction, as in
      ``max(0, c·x)``).
    * *significant negative curvature*: ``λ_min < −neg_tol · max(|λ_max|, |λ_min|)``.
    * *starved lower layers*: ``‖g_first‖/‖g_last‖ < starve_tol`` for the per-layer gradient norms in
      forward order: from ``layers`` (parameter groups, e.g. ``[m.parameters() for m in net.linears]``)
      or given directly as ``layer_grad_norms`` (e.g. a probe's profile,
      ``gradprobe.analysis.signal_profile(flow).values``).

    Verdict, first match wins:

    1. ``"vanishing_far_from_optimum"``: loss not near its floor, and lower layers starved or a small
       gradient without negative curvature (``max(0, c·x)``, a deep sigmoid net at standard init);
    2. ``"saddle"``: small gradient and significant negative curvature (``x² − y²`` at 0);
    3. ``"converged"``: small gradient, no significant negative curvature, loss near its floor (with
       no floor given: "a local minimum", not necessarily the optimum);
    4. ``"not_stationary"``: anything else (an ordinary point with a sizeable gradient).

    Curvature: ``max_iter`` (default 40) Lanczos products. Ritz values lie inside the spectrum, so
    an unconverged bottom value is an upper bound on ``λ_min``: negative curvature is never
    invented by stopping early, only possibly under-reported.

    >>> w = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    >>> classify_stationary(lambda: w[0] ** 2 - w[1] ** 2, [w]).kind
    'saddle'
    """
    for name, val in (("loss_scale", loss_scale), ("grad_tol", grad_tol), ("loss_tol", loss_tol),
                      ("neg_tol", neg_tol), ("starve_tol", starve_tol)):
        if not (val > 0 and math.isfinite(val)):
            raise ConfigError(f"{name} must be a positive finite number; got {val}")
    if layers is not None and layer_grad_norms is not None:
        raise ConfigError("pass either layers= (parameter groups) or layer_grad_norms=, not both")
    ps = list(params)
    loss_t, grad, matvec = hessian_operator(loss_fn, ps)
    loss = float(loss_t)
    if not math.isfinite(loss):
        raise ConfigError(f"the loss is {loss}: curvature at a non-finite loss means nothing; fix the forward pass first")
    grad_norm = float(torch.linalg.vector_norm(grad))
    n = grad.numel()
    r = lanczos(matvec, n, k=1, which="both", tol=lanczos_tol, max_iter=max_iter, generator=generator, device=grad.device)
    top, bottom = float(r.top[0, 0]), float(r.bottom[0, 0])
    size = max(abs(top), abs(bottom))
    neg = -bottom / size if size > 0 else 0.0

    # Curvature along the gradient, κ = gᵀHg/‖g‖²: the local quadratic model then predicts that
    # the loss can still drop by ‖g‖²/(2κ) along −g (unboundedly if κ <= 0). This stands in for the
    # distance to the floor when the floor is unknown.
    if grad_norm == 0.0:
        predicted = 0.0
    else:
        kappa = float(grad @ matvec(grad.reshape(1, -1))[0]) / grad_norm**2
        predicted = grad_norm**2 / (2 * kappa) if kappa > 0 else math.inf

    norms = None
    if layers is not None:
        norms = _group_norms(ps, grad, layers)
    elif layer_grad_norms is not None:
        norms = np.asarray(layer_grad_norms, dtype=np.float64)
    layer_ratio = None
    if norms is not None:
        if norms.size < 2 or not np.all(np.isfinite(norms)) or norms[-1] <= 0:
            raise ConfigError(f"the per-layer gradient profile needs >= 2 finite norms with a positive last one; got {norms.tolist()}")
        layer_ratio = float(norms[0] / norms[-1])

    small = grad_norm <= grad_tol * loss_scale
    gap = (loss - loss_floor) if loss_floor is not None else predicted
    near = gap <= loss_tol * loss_scale
    negcurv = neg > neg_tol
    starved = layer_ratio is not None and layer_ratio < starve_tol
    reasons = [
        f"gradient norm {grad_norm:.3g} {'<=' if small else '>'} grad_tol·loss_scale = {grad_tol * loss_scale:.3g}",
        f"Hessian eigenvalues in [{bottom:.3g}, {top:.3g}]: negative curvature ratio {neg:.3g} "
        f"{'>' if negcurv else '<='} neg_tol = {neg_tol:.3g}",
    ]
    if loss_floor is not None:
        reasons.append(f"loss {loss:.4g} is {gap:.3g} above its floor {loss_floor:.4g} "
                       f"({'<=' if near else '>'} loss_tol·loss_scale = {loss_tol * loss_scale:.3g})")
    else:
        reasons.append(f"no loss floor given; the quadratic model along -g predicts a further decrease of "
                       f"{gap:.3g} ({'<=' if near else '>'} loss_tol·loss_scale = {loss_tol * loss_scale:.3g})")
    if layer_ratio is not None:
        reasons.append(f"first/last layer gradient ratio {layer_ratio:.3g} {'<' if starved else '>='} starve_tol = {starve_tol:.3g}")

    if not near and (starved or (small and not negcurv)):
        kind = "vanishing_far_from_optimum"
    elif small and negcurv:
        kind = "saddle"
    elif small and near:
        kind = "converged"
    else:
        kind = "not_stationary"
    return StationaryPoint(kind, loss, loss_floor, grad_norm, top, bottom, neg, layer_ratio, predicted, tuple(reasons))


def _group_norms(params: list[torch.Tensor], grad: torch.Tensor, layers: Sequence[Iterable[torch.Tensor]]) -> np.ndarray:
    """L2 norm of the gradient restricted to each parameter group (groups must be drawn from ``params``)."""
    offsets, i = {}, 0
    for p in params:
        offsets[id(p)] = (i, i + p.numel())
        i += p.numel()
    out = []
    for j, group in enumerate(layers):
        sq = 0.0
        for p in group:
            if id(p) not in offsets:
                raise ConfigError(f"layer group {j} holds a tensor of shape {tuple(p.shape)} that is not among params")
            a, b = offsets[id(p)]
            sq += float(grad[a:b].pow(2).sum())
        out.append(math.sqrt(sq))
    return np.asarray(out)
