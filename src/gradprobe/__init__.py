"""gradprobe: see, explain, predict and fix vanishing and exploding gradients in PyTorch models.

Public API (everything else is reachable through the sub-packages)::

    Probe          record per-layer (and, with temporal=True, per-time-step) gradient flow; diagnose it;
                   spikes=True / on_spike="skip": watch every step for gradient spikes (and guard against them)
    mark_state     mark the hidden state of a hand-written recurrent loop for the temporal probe
    Recorder       write your own quantity: Probe(model, recorders=[MyRecorder()])
    Sink           send records somewhere else: Probe(model, sinks=[MySink()])
    LayerFlow      one step's per-layer numbers; TemporalFlow: one recurrent layer's BPTT profile;
                   Trace: the bounded history; Run: a whole run (trace, facts, diagnosis)
    Diagnosis      verdict + evidence + remedies;  diagnose(model, batch, loss_fn)
    load_run       read a run log (SQLite) back as a Run;  load_trace: just its trace

Sub-packages: ``gradprobe.theory`` (mean field, RNN conditions), ``gradprobe.analysis`` (profiles,
spectra, curvature, theory vs measurement), ``gradprobe.remedies`` (clipping, inits, transforms, Ω),
``gradprobe.models`` (the classic models), ``gradprobe.experiments`` (tasks, trials).

Importing gradprobe needs only torch and numpy and has no side effects.
"""
from gradprobe._version import __version__
from gradprobe.diagnosis import Diagnosis, DiagnosisConfig, Remedy, Verdict
from gradprobe.errors import (
    ConfigError,
    GradientSpikeError,
    GradprobeError,
    MissingExtraError,
    NonFiniteGradientError,
    ProbeStateError,
    RunLogError,
)
from gradprobe.monitor import Probe
from gradprobe.oneshot import diagnose
from gradprobe.probe import Contribution, Deferred, Recorder, mark_state
from gradprobe.run import Run, load_run
from gradprobe.runlog import load_trace
from gradprobe.trace import LayerFlow, Sink, Table, TemporalFlow, Trace

__all__ = [
    "__version__",
    "Probe",
    "mark_state",
    "Recorder",
    "Contribution",
    "Deferred",
    "Sink",
    "LayerFlow",
    "Table",
    "TemporalFlow",
    "Trace",
    "Run",
    "Diagnosis",
    "DiagnosisConfig",
    "Verdict",
    "Remedy",
    "diagnose",
    "load_run",
    "load_trace",
    "GradprobeError",
    "ConfigError",
    "ProbeStateError",
    "MissingExtraError",
    "RunLogError",
    "NonFiniteGradientError",
    "GradientSpikeError",
]
