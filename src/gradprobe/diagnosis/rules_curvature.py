"""Is a small gradient an optimum? Verdicts: a minimum ("converged"), a saddle ("saddle", Dauphin et al.
2014), or vanishing far from any optimum (named "vanishing" with the curvature evidence)."""
from __future__ import annotations

from gradprobe.diagnosis.remedies import pick, rank_for_vanishing
from gradprobe.diagnosis.verdict import Verdict

__all__ = ["rule_stationary"]



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
        return Verdict("saddle", "warning", ev, pick("escape_saddle", "rprop", facts=findings.facts), data=data)
    # vanishing far from the optimum: a small gradient that is not an optimum
    return Verdict("vanishing", "error", ev + ("a small gradient here is not an optimum: the loss is far from its floor",),
                   rank_for_vanishing(findings.facts), data=data)
