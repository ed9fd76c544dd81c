"""Diagnosis: findings → :class:`Verdict` (kind, severity, evidence, remedies). One small pure function per rule.

Verdict ids (stable): ``healthy``, ``vanishing``, ``exploding`` (depth), ``vanishing_in_time``,
``exploding_in_time`` (BPTT), ``exploding_in_training`` (gradient spikes), ``non_finite``, ``saturated_units``, ``dead_units``, ``stagnating``,
``converged``, ``saddle``.
"""
from __future__ import annotations

from dataclasses import replace

from gradprobe.analysis.depth import signal_profile
from gradprobe.analysis.expectation import depth_expectation
from gradprobe.diagnosis.config import DiagnosisConfig
from gradprobe.diagnosis.findings import Findings
from gradprobe.diagnosis.rules import rule_depth, rule_non_finite
from gradprobe.diagnosis.rules_curvature import rule_stationary
from gradprobe.diagnosis.rules_time import rule_exploding_in_time, rule_vanishing_in_time
from gradprobe.diagnosis.rules_training import rule_exploding_in_training
from gradprobe.diagnosis.rules_units import rule_dead_units, rule_saturated_units, rule_stagnating
from gradprobe.diagnosis.verdict import SEVERITY, Diagnosis, Remedy, Verdict
from gradprobe.trace import LayerFlow, ModelFacts, SpikeLog, Trace

__all__ = ["Diagnosis", "Verdict", "Remedy", "DiagnosisConfig", "Findings", "RULES", "diagnose_flow", "run_rules"]

#: Every rule, in the order they run. ``non_finite`` stops the later ones (their numbers mean nothing
#: then); ``exploding_in_training`` runs first because a spike history explains how it came to that.
RULES = (
    rule_exploding_in_training,
    rule_non_finite,
    rule_depth,
    rule_vanishing_in_time,
    rule_exploding_in_time,
    rule_saturated_units,
    rule_dead_units,
    rule_stagnating,
    rule_stationary,
)


def run_rules(findings: Findings, config: DiagnosisConfig | None = None, rules=RULES) -> Diagnosis:
    """Run ``rules`` on ``findings``; verdicts most severe first, "healthy" when none fires."""
    config = config or DiagnosisConfig()
    found = []
    for rule in rules:
        v = rule(findings, config)
        if v is None:
            continue
        if v.kind == "vanishing" and any(f.kind == "vanishing" for f in found):
            # the curvature rule confirms a depth verdict: add its evidence instead of a duplicate
            i = next(k for k, f in enumerate(found) if f.kind == "vanishing")
            found[i] = replace(found[i], evidence=found[i].evidence + v.evidence)
            continue
        found.append(v)
        if v.kind == "non_finite":
            break
    if not found:
        prof = signal_profile(findings.flow)
        if prof is None:
            ev = ("fewer than two layers received a measurable gradient: no depth profile",)
        else:
            ev = (
                f"signal ratio first/last layer = {prof.ratio:.3g} over {prof.n} layers "
                f"(per-layer gain {prof.factor:.3g}), within [{config.vanish_ratio:g}, {config.explode_ratio:g}]",
            )
            if findings.expectation is not None:
                ev += (findings.expectation.sentence(),)
        found.append(Verdict("healthy", "ok", ev))
    found.sort(key=lambda v: -SEVERITY.index(v.severity))  # stable: rule order breaks ties
    return Diagnosis(tuple(found))


def diagnose_flow(
    flow: LayerFlow,
    *,
    facts: ModelFacts | None = None,
    trace: Trace | None = None,
    stationary=None,
    expectation=None,
    spikes: SpikeLog | None = None,
    config: DiagnosisConfig | None = None,
    **overrides,
) -> Diagnosis:
    """Diagnose one recorded step (its units and temporal flows included) with the history in ``trace``.

    ``facts`` (the model's :class:`~gradprobe.trace.ModelFacts`) rank the remedies and, for a plain MLP,
    give the mean-field ``expectation`` of the depth profile (computed from them unless passed).
    ``spikes``: the gradient spikes found during training (``exploding_in_training``).
    ``overrides`` are :class:`DiagnosisConfig` fields, e.g. ``vanish_ratio=1e-3``.
    """
    if config is None:
        config = DiagnosisConfig(**overrides)
    elif overrides:
        config = replace(config, **overrides)
    if expectation is None and facts is not None:
        expectation = depth_expectation(facts, signal_profile(flow))
    findings = Findings(flow, facts=facts, units=flow.units, trace=trace, temporal=flow.temporal,
                        stationary=stationary, expectation=expectation, spikes=spikes)
    basis = {"step": flow.step, "history": len(trace) if trace is not None else 0, "recorders": list(flow.recorders)}
    return replace(run_rules(findings, config), basis=basis)
