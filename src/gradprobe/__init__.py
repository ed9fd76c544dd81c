"""gradprobe: see, explain, predict and fix vanishing and exploding gradients in PyTorch models.

Public API (everything else is reachable through the sub-packages)::

    Probe          record per-layer (and, with temporal=True, per-time-step) gradient flow
    mark_state     mark the hidden state of a hand-written recurrent loop for the temporal probe
    LayerFlow      one step's per-layer numbers; TemporalFlow: one recurrent layer's BPTT profile;
                   Trace: the bounded history
    Diagnosis      verdict + evidence + remedies;  diagnose(model, batch, loss_fn)
    load_trace     read a run log (SQLite) back

Sub-packages: ``gradprobe.theory`` (mean field, RNN conditions), ``gradprobe.analysis`` (profiles,
spectra, curvature, theory vs measurement), ``gradprobe.remedies`` (clipping, inits, transforms, Ω),
``gradprobe.models`` (the seeds' models), ``gradprobe.experiments`` (tasks, trials).

Importing gradprobe needs only torch and numpy and has no side effects.
"""
from gradprobe._version import __version__
from gradprobe.diagnosis import Diagnosis, DiagnosisConfig, Remedy, Verdict
from gradprobe.errors import (
    ConfigError,
    GradprobeError,
    MissingExtraError,
    NonFiniteGradientError,
    ProbeStateError,
    RunLogError,
)
from gradprobe.oneshot import diagnose
from gradprobe.probe import Probe, mark_state
from gradprobe.runlog import load_trace
from gradprobe.trace import LayerFlow, TemporalFlow, Trace

__all__ = [
    "__version__",
    "Probe",
    "mark_state",
    "LayerFlow",
    "TemporalFlow",
    "Trace",
    "Diagnosis",
    "DiagnosisConfig",
    "Verdict",
    "Remedy",
    "diagnose",
    "load_trace",
    "GradprobeError",
    "ConfigError",
    "ProbeStateError",
    "MissingExtraError",
    "RunLogError",
    "NonFiniteGradientError",
]
