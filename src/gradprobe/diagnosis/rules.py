"""Depth and non-finite rules: each a small pure function ``(findings, config) -> Verdict | None``."""
from __future__ import annotations

import math

import numpy as np

from gradprobe.analysis.depth import signal_profile
from gradprobe.diagnosis.remedies import rank_for_exploding, rank_for_nonfinite, rank_for_vanishing
from gradprobe.diagnosis.verdict import Verdict
from gradprobe.diagnosis.config import DiagnosisConfig
from gradprobe.diagnosis.findings import Findings
from gradprobe.trace import LayerFlow, ModelFacts

__all__ = ["rule_non_finite", "rule_depth"]


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def rule_non_finite(findings: Findings, config: DiagnosisConfig) -> Verdict | None:
    """NaN/Inf anywhere: name the first layer in forward order with a non-finite activation, else the
    first layer in backward order whose output gradient or parameter gradient is non-finite."""
    flow, facts = findings.flow, findings.facts
    loss_bad = flow.loss is not None and not math.isfinite(flow.loss)
    act_bad = flow.has_output & ~np.isfinite(flow.activation_norm)
    grad_bad = (flow.has_output_grad & ~np.isfinite(flow.output_grad_norm)) | (
        flow.has_grad & ~np.isfinite(flow.grad_norm)
    )
    if not (loss_bad or act_bad.any() or grad_bad.any()):
        return None
    evidence = []
    layer = None
    if act_bad.any():
        i = int(np.flatnonzero(act_bad)[0])
        layer = flow.names[i]
        evidence.append(
            f"the forward pass first produced a non-finite output at layer {layer!r} "
            f"({flow.kinds[i]}, ‖h‖ = {flow.activation_norm[i]}), layer {i + 1} of {len(flow)} in forward order"
        )
    if grad_bad.any():
        cand = np.flatnonzero(grad_bad)
        i = int(cand[np.argmin(flow.backward_rank[cand])])
        what = []
        if flow.has_output_grad[i] and not np.isfinite(flow.output_grad_norm[i]):
            what.append(f"‖∂L/∂h‖ = {flow.output_grad_norm[i]}")
        if flow.has_grad[i] and not np.isfinite(flow.grad_norm[i]):
            what.append(f"‖∂L/∂θ‖ = {flow.grad_norm[i]}")
        if layer is None:
            layer = flow.names[i]
        evidence.append(
            f"the backward pass first produced a non-finite gradient at layer {flow.names[i]!r} "
            f"({flow.kinds[i]}; {', '.join(what)}); {int(grad_bad.sum())} of {len(flow)} layers have non-finite gradients"
        )
    if loss_bad:
        evidence.append(f"the loss itself is {flow.loss}")
    return Verdict("non_finite", "error", tuple(evidence), rank_for_nonfinite(facts), layer=layer,
                   data={"nonfinite_layers": [flow.names[i] for i in np.flatnonzero(act_bad | grad_bad)]})


def _depth_evidence(flow: LayerFlow, prof) -> list[str]:
    what = "back-propagated signal ‖∂L/∂h‖" if prof.source == "output_grad_norm" else "parameter-gradient norm ‖∂L/∂θ‖"
    ev = [
        f"the {what} at the first layer ({prof.names[0]!r}) is {_fmt(prof.ratio)}× that at the last "
        f"({prof.names[-1]!r}): {_fmt(abs(prof.orders_of_magnitude))} orders of magnitude "
        f"{'smaller' if prof.ratio < 1 else 'larger'} over {prof.n} layers",
        f"per-layer gain going backward: {_fmt(prof.factor)} (endpoints), {_fmt(prof.fit_factor)} (log-linear fit over all layers)",
    ]
    g = flow.grad_norm
    ok = flow.has_grad & np.isfinite(g) & (g > 0)
    if ok.sum() >= 2:
        i, j = np.flatnonzero(ok)[[0, -1]]
        rel = g / np.where(flow.weight_norm > 0, flow.weight_norm, np.nan)
        ev.append(
            f"parameter gradients: ‖∂L/∂θ‖ = {_fmt(g[i])} at {flow.names[i]!r} vs {_fmt(g[j])} at {flow.names[j]!r}"
            f" (relative to ‖θ‖: {_fmt(rel[i])} vs {_fmt(rel[j])})"
        )
    return ev


def _zero_signal(flow: LayerFlow, facts: ModelFacts | None, config: DiagnosisConfig) -> Verdict | None:
    """Signal measured as exactly 0 at the first layer(s) while a later layer receives some: it vanished
    completely before reaching the input (dead units, or underflow); the first/last ratio is 0. The
    ratio profile skips zeros (no logarithm), so without this check such a network could look
    healthy. Zeros elsewhere are not enough: a zero-initialised residual branch (a remedy) has an
    exactly-0 signal inside every branch while the trunk carries it to the first layer."""
    source = "output_grad_norm" if flow.has_output_grad.sum() >= 2 else "grad_norm"
    mask = flow.has_output_grad if source == "output_grad_norm" else flow.has_grad
    vals = getattr(flow, source)
    measured = np.flatnonzero(mask & np.isfinite(vals))
    if len(measured) < config.min_layers:
        return None
    positive = measured[vals[measured] > 0]
    if vals[measured[0]] != 0 or not len(positive):
        return None
    dead = measured[measured < positive[0]]  # the dead prefix, in forward order
    live = int(positive[0])
    what = "back-propagated signal ‖∂L/∂h‖" if source == "output_grad_norm" else "parameter-gradient norm ‖∂L/∂θ‖"
    ev = (
        f"the {what} is exactly 0 at the first {len(dead)} of {len(measured)} layers ({flow.names[dead[0]]!r} "
        f"to {flow.names[dead[-1]]!r}); the first layer that receives any is {flow.names[live]!r} "
        f"({_fmt(vals[live])}): the gradient vanished completely on its way back (dead units or numerical underflow)",
    )
    data = {"ratio": 0.0, "factor": 0.0, "n_layers": len(measured), "source": source,
            "zero_layers": [flow.names[i] for i in dead]}
    return Verdict("vanishing", "error", ev, rank_for_vanishing(facts), layer=flow.names[dead[0]], data=data)


def rule_depth(findings: Findings, config: DiagnosisConfig) -> Verdict | None:
    """Vanishing / exploding with depth, from the first-to-last ratio of the signal profile (or a
    signal that is exactly 0 at the first layers, see :func:`_zero_signal`)."""
    flow, facts = findings.flow, findings.facts
    dead = _zero_signal(flow, facts, config)
    if dead is not None:
        return dead
    prof = signal_profile(flow)
    if prof is None or prof.n < config.min_layers:
        return None
    data = {"ratio": prof.ratio, "factor": prof.factor, "fit_factor": prof.fit_factor, "n_layers": prof.n,
            "source": prof.source}
    evidence = _depth_evidence(flow, prof)
    if findings.expectation is not None:
        evidence.append(findings.expectation.sentence())
        data["expected_factor"] = findings.expectation.gain
    if prof.ratio < config.vanish_ratio:
        return Verdict("vanishing", "error", tuple(evidence), rank_for_vanishing(facts),
                       layer=prof.names[0], data=data)
    if prof.ratio > config.explode_ratio:
        return Verdict("exploding", "error", tuple(evidence), rank_for_exploding(facts),
                       layer=prof.names[0], data=data)
    return None
