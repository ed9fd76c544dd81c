"""gradprobe: see, explain, predict and fix vanishing and exploding gradients in PyTorch models.

Public API (everything else is reachable through the sub-packages)::

    Probe          record per-layer gradient flow on any nn.Module (context manager)
    LayerFlow      one step's per-layer numbers;  Trace: the bounded history
    Diagnosis      verdict + evidence + remedies;  diagnose(model, batch, loss_fn)
    load_trace     read a run log (SQLite) back

Importing gradprobe needs only torch and numpy and has no side effects.
"""
from gradprobe._version import __version__
from gradprobe.diagnosis import Diagnosis, DiagnosisConfig, Remedy, Verdict
from gradprobe.errors import ConfigError, GradprobeError, MissingExtraError, ProbeStateError, RunLogError
from gradprobe.oneshot import diagnose
from gradprobe.probe import Probe
from gradprobe.runlog import load_trace
from gradprobe.trace import LayerFlow, Trace

__all__ = [
    "__version__",
    "Probe",
    "LayerFlow",
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
]
