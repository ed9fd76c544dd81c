"""What the rules see: one bundle of measured findings (all optional but the layer flow)."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from gradprobe.trace import LayerFlow, ModelFacts, SpikeLog, TemporalFlow, Trace, UnitStats

__all__ = ["Findings"]


@dataclass(frozen=True)
class Findings:
    """Inputs of the diagnosis rules.

    * ``flow``: the per-layer flow of the step being diagnosed;
    * ``facts``: the model's building blocks (hints for ranking remedies, never evidence);
    * ``units``: saturated / dead unit statistics of that step;
    * ``trace``: the recorded history (for rules over time, e.g. stagnation);
    * ``temporal``: per recurrent layer ``TemporalFlow`` (BPTT profile) of that step;
    * ``stationary``: a curvature classification (``gradprobe.analysis.curvature``), if computed;
    * ``expectation``: the mean-field expectation of the depth profile
      (:func:`gradprobe.analysis.expectation.depth_expectation`), if the model admits one;
    * ``spikes``: the gradient spikes found during training (:class:`~gradprobe.trace.SpikeLog`), if watched.
    """

    flow: LayerFlow
    facts: ModelFacts | None = None
    units: UnitStats | None = None
    trace: Trace | None = None
    temporal: Mapping[str, TemporalFlow] | None = None
    stationary: object | None = None
    expectation: object | None = None
    spikes: SpikeLog | None = None
