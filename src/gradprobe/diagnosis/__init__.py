"""Diagnosis: findings → :class:`Verdict` (kind, evidence, remedies). One small pure function per rule."""
from __future__ import annotations

from dataclasses import replace

from gradprobe.analysis.depth import signal_profile
from gradprobe.diagnosis.rules import RULES, DiagnosisConfig
from gradprobe.diagnosis.verdict import SEVERITY, Diagnosis, Remedy, Verdict
from gradprobe.probe.layers import ModelFacts
from gradprobe.trace import LayerFlow, Trace

__all__ = ["Diagnosis", "Verdict", "Remedy", "DiagnosisConfig", "diagnose_flow"]


def diagnose_flow(
    flow: LayerFlow,
    *,
    facts: ModelFacts | None = None,
    trace: Trace | None = None,
    config: DiagnosisConfig | None = None,
    **overrides,
) -> Diagnosis:
    """Run every rule on ``flow`` and return the verdicts, most severe first ("healthy" if none fires).

    ``overrides`` are :class:`DiagnosisConfig` fields, e.g. ``vanish_ratio=1e-3``.
    """
    if config is None:
        config = DiagnosisConfig(**overrides)
    elif overrides:
        config = replace(config, **overrides)
    found = []
    for rule in RULES:
        v = rule(flow, facts, config)
        if v is not None:
            found.append(v)
            if v.kind == "non_finite":
                break  # other numbers are meaningless once NaN/Inf appear
    if not found:
        prof = signal_profile(flow)
        if prof is None:
            ev = ("fewer than two layers received a measurable gradient: no depth profile",)
        else:
            ev = (
                f"signal ratio first/last layer = {prof.ratio:.3g} over {prof.n} layers "
                f"(per-layer gain {prof.factor:.3g}), within [{config.vanish_ratio:g}, {config.explode_ratio:g}]",
            )
        found.append(Verdict("healthy", "ok", ev))
    found.sort(key=lambda v: -SEVERITY.index(v.severity))
    return Diagnosis(tuple(found))
