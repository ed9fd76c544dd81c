"""What mean-field theory expects of a model's depth profile, estimated from its own weights.

For a plain MLP ``h^l = W^l φ(h^{l−1}) + b^l`` with one activation type, the weight and bias
variances are read off the hidden ``width×width`` Linear layers (``σ_w² = fan_in·mean(W²)``,
``σ_b² = mean(b²)``, medians over layers), and :func:`gradprobe.theory.mean_field` gives χ₁: the
back-propagated signal should change by ``√χ₁`` per layer (Poole et al. 2016; Schoenholz et al.
2017), within the finite-width spread of :func:`~gradprobe.analysis.theory_vs_measurement.finite_width_error`.
Skip connections, normalisation and training all change the gain, so a measurement far from the
expectation is itself informative. Models that are not plain MLPs get no expectation (``None``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from torch import nn

from gradprobe.analysis.depth import SignalProfile
from gradprobe.analysis.theory_vs_measurement import finite_width_error
from gradprobe.errors import GradprobeError
from gradprobe.probe.layers import mlp_facts
from gradprobe.theory import mean_field
from gradprobe.trace import MLPFacts, ModelFacts

__all__ = ["DepthExpectation", "depth_expectation"]


@dataclass(frozen=True)
class DepthExpectation:
    """Mean field's expectation for one measured depth profile: σ_w², σ_b² read off the weights, χ₁ and its
    phase, the expected per-layer gain √χ₁ beside the measured one, and ``z``, the measured log
    squared-norm ratio's deviation from theory in standard deviations of the finite-width error
    (:func:`~gradprobe.analysis.theory_vs_measurement.finite_width_error`); |z| ≤ 3 counts as consistent."""

    activation: str
    sigma_w2: float
    sigma_b2: float
    chi1: float
    phase: str
    width: int
    n_steps: int  # layers between the first and last measured layer
    gain: float  # √χ₁: expected per-layer gain of ‖∂L/∂h‖ going backward
    measured_gain: float
    z: float  # standardised deviation of the measured log squared-norm ratio

    def sentence(self) -> str:
        agree = "consistent with" if abs(self.z) <= 3 else "far from"
        where = "within" if abs(self.z) <= 3 else "outside"
        # σ² read off finite weights is never exactly critical: call |χ₁ − 1| < 2 % near-critical
        phase = "near-critical" if abs(self.chi1 - 1.0) < 0.02 else self.phase
        return (
            f"mean-field expectation for a plain random {self.activation} MLP with σ_w² = {self.sigma_w2:.3g}, "
            f"σ_b² = {self.sigma_b2:.3g} (read off the weights): per-layer gain √χ₁ = {self.gain:.3g} "
            f"({phase}); measured {self.measured_gain:.3g}, {agree} it: z = {self.z:.2g}, {where} |z| ≤ 3 "
            f"standard deviations of the finite-width error at width {self.width}"
        )


def depth_expectation(model: nn.Module | ModelFacts | MLPFacts | None, profile: SignalProfile | None) -> DepthExpectation | None:
    """The mean-field expectation for a measured ``profile``, from the model itself or from its saved
    facts (:class:`~gradprobe.trace.ModelFacts`); ``None`` when the model is not a plain MLP of one
    activation type (or theory cannot evaluate it here).

    σ_w² and σ_b² are medians over the measured hidden ``width×width`` Linear layers of
    ``fan_in·mean(W²)`` and ``mean(b²)``.
    """
    if profile is None or profile.n < 3 or profile.source != "output_grad_norm":
        return None
    if isinstance(model, nn.Module):
        model = mlp_facts(model)
    elif isinstance(model, ModelFacts):
        model = model.mlp
    if model is None:
        return None
    by_name = {s.name: s for s in model.linears}
    if not all(n in by_name for n in profile.names):
        return None
    hidden = [by_name[n] for n in profile.names if by_name[n].in_features == by_name[n].out_features]
    if not hidden:
        return None
    sw = float(np.median([s.in_features * s.weight_ms for s in hidden]))
    sb = float(np.median([s.bias_ms for s in hidden]))
    width = int(np.median([s.in_features for s in hidden]))
    kwargs = {} if model.slope is None else {"slope": model.slope}
    try:
        mf = mean_field(model.activation, sw, sb, **kwargs)
    except GradprobeError:  # e.g. the 'theory' extra (scipy) is missing for a chaotic-phase root
        return None
    n = profile.n - 1
    if not (mf.chi1 > 0 and math.isfinite(mf.chi1) and mf.r > 0):
        return None
    bias, sd = finite_width_error(n, width, mf.r)
    measured = 2.0 * math.log(profile.ratio)  # log squared-norm ratio, first over last
    z = (measured - (n * math.log(mf.chi1) + bias)) / sd if sd > 0 else math.inf
    return DepthExpectation(mf.activation, sw, sb, mf.chi1, mf.phase, width, n, math.sqrt(mf.chi1),
                            profile.factor, z)
