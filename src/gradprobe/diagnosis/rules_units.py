"""Rules over unit statistics and training history: saturated units, dead units, stagnation.

Each rule is a small pure function ``(findings, config) -> Verdict | None``.
"""
from __future__ import annotations

import numpy as np

from gradprobe.diagnosis.remedies import pick, rank_for_vanishing
from gradprobe.diagnosis.verdict import Verdict

__all__ = ["rule_saturated_units", "rule_dead_units", "rule_stagnating"]


def _worst(fracs, threshold):
    """(indices above ``threshold``, index of the largest) or None; NaN means not applicable."""
    fr = np.where(np.isnan(fracs), -1.0, fracs)
    hit = np.flatnonzero(fr > threshold)
    if not len(hit):
        return None
    return hit, int(hit[np.argmax(fr[hit])])


def _flagged(findings, field: str, threshold: float):
    """``(units, hit, worst)`` for the per-module fraction ``findings.units.<field>``: the unit statistics,
    the indices of the modules above ``threshold`` and the index of the largest (as :func:`_worst`); None
    without unit statistics or when no module is above."""
    units = findings.units
    if units is None:
        return None
    found = _worst(getattr(units, field), threshold)
    return None if found is None else (units, *found)


def rule_saturated_units(findings, config) -> Verdict | None:
    """Sigmoid/tanh modules whose (sample, unit) entries are saturated beyond ``config.saturated_fraction``."""
    found = _flagged(findings, "saturated_fraction", config.saturated_fraction)
    if found is None:
        return None
    units, hit, w = found
    ev = [
        f"{len(hit)} of {int((~np.isnan(units.saturated_fraction)).sum())} saturating activation modules have more than "
        f"{config.saturated_fraction:.0%} of their unit outputs in the flat region (|φ'| < {config.saturation:g}·max)",
        f"worst: {units.names[w]!r} ({units.kinds[w]}) with {units.saturated_fraction[w]:.1%} saturated",
    ]
    ev += [f"{units.names[i]!r}: {units.saturated_fraction[i]:.1%}" for i in hit[:8] if i != w]
    return Verdict("saturated_units", "warning", tuple(ev),
                   pick("normalization", "he_init", "relu_activation", "smaller_init", facts=findings.facts), layer=units.names[w],
                   data={"saturated_fraction": dict(zip(units.names, units.saturated_fraction.tolist()))})


def rule_dead_units(findings, config) -> Verdict | None:
    """ReLU modules with more than ``config.dead_fraction`` of their units inactive on the whole batch."""
    found = _flagged(findings, "dead_fraction", config.dead_fraction)
    if found is None:
        return None
    units, hit, w = found
    ev = [
        f"{len(hit)} ReLU modules have more than {config.dead_fraction:.0%} of their units at 0 on every input of the batch "
        "(no gradient flows through a dead unit)",
        f"worst: {units.names[w]!r} with {units.dead_fraction[w]:.1%} of {int(units.n_units[w])} units dead",
    ]
    return Verdict("dead_units", "warning", tuple(ev), pick("leaky_activation", "he_init", "lower_lr", "normalization", facts=findings.facts), layer=units.names[w],
                   data={"dead_fraction": dict(zip(units.names, units.dead_fraction.tolist()))})


def rule_stagnating(findings, config) -> Verdict | None:
    """Lower layers barely change while upper layers do, and the loss has plateaued (the symptom of
    vanishing gradients described by Hochreiter 1991 and measured by Glorot & Bengio 2010).

    Over the last ``config.window`` recorded steps: the median update ratio ‖Δθ‖/‖θ‖ of the first
    layer is below ``config.stagnation_ratio`` times the last layer's, and the mean loss of the
    window's second half improved on the first half by less than ``config.plateau``.
    """
    trace, facts = findings.trace, findings.facts
    if trace is None or len(trace) < 2 * config.window_min:
        return None
    recent = list(trace)[-config.window :]
    half = len(recent) // 2
    losses = np.array([f.loss if f.loss is not None else np.nan for f in recent])
    if np.isnan(losses).any():
        return None
    a, b = losses[:half].mean(), losses[half:].mean()
    improvement = (a - b) / max(abs(a), 1e-12)
    ratios = np.array([f.update_ratio for f in recent if len(f) == len(recent[-1])])
    if ratios.size == 0 or ratios.shape[1] < 2:
        return None
    finite = np.isfinite(ratios)
    if not (finite[:, 0].any() and finite[:, -1].any()):  # no update ratios (Probe(update_ratio=False))
        return None
    first, last = float(np.median(ratios[finite[:, 0], 0])), float(np.median(ratios[finite[:, -1], -1]))
    if not last > 0:
        return None
    rel = first / last
    if rel >= config.stagnation_ratio or improvement >= config.plateau:
        return None
    names = recent[-1].names
    ev = (
        f"over the last {len(recent)} recorded steps the first layer ({names[0]!r}) changed by a median "
        f"{first:.3g} of its norm per step, the last ({names[-1]!r}) by {last:.3g}: {rel:.3g}× ",
        f"the loss improved by only {improvement:.2%} between the two halves of that window ({a:.4g} → {b:.4g})",
    )
    return Verdict("stagnating", "warning", ev, rank_for_vanishing(facts), layer=names[0],
                   data={"update_ratio_first_over_last": float(rel), "loss_improvement": float(improvement)})
