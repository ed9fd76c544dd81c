"""Seed 004's question as verdicts: a small gradient at a minimum ("converged"), at a saddle ("saddle"),
or vanishing far from any optimum (named "vanishing" with the curvature evidence)."""
from __future__ import annotations

from gradprobe.diagnosis.remedies import CATALOGUE, rank_for_vanishing
from gradprobe.diagnosis.verdict import Remedy, Verdict

__all__ = ["rule_stationary"]

_PERTURB = Remedy(
    "escape_saddle", "Keep training with noise or momentum (SGD's noise escapes strict saddles)",
    "the gradient is small only because the point is a saddle: a descent direction of negative curvature exists",
    "torch.optim.SGD(momentum=0.9)",
)


def rule_stationary(findings, config) -> Verdict | None:
    """Turn a :class:`gradprobe.analysis.curvature.StationaryPoint` into a verdict (``None`` without one)."""
    sp = findings.stationary
    if sp is None or sp.kind == "not_stationary":
        return None
    ev = (
        f"loss {sp.loss:.4g}, gradient norm {sp.grad_norm:.3g}; Hessian eigenvalues from {sp.bottom_eig:.3g} "
        f"to {sp.top_eig:.3g} (Lanczos)",
    ) + tuple(sp.reasons)
    data = {"loss": sp.loss, "grad_norm": sp.grad_norm, "top_eig": sp.top_eig, "bottom_eig": sp.bottom_eig}
    if sp.kind == "converged":
        return Verdict("converged", "ok", ev, (), data=data)
    if sp.kind == "saddle":
        return Verdict("saddle", "warning", ev, (_PERTURB, CATALOGUE["rprop"]), data=data)
    # vanishing far from the optimum: seed 004's "small gradient that is not an optimum"
    return Verdict("vanishing", "error", ev + ("a small gradient here is not an optimum: the loss is far from its floor",),
                   rank_for_vanishing(findings.facts), data=data)
