"""Analysis: turn recorded flows into interpretable profiles (depth, time, spectra, theory vs measurement)."""
from gradprobe.analysis.curvature import (
    HessianEigs,
    HessianTrace,
    StationaryPoint,
    classify_stationary,
    hessian_eigs,
    hessian_trace,
)
from gradprobe.analysis.depth import SignalProfile, signal_profile
from gradprobe.analysis.spectra import (
    IsometrySummary,
    JacobianSpectrum,
    between_layers,
    isometry_summary,
    jacobian_spectrum,
)
from gradprobe.analysis.temporal import LagDecomposition, lag_decomposition, rnn_lag_decomposition
from gradprobe.analysis.theory_vs_measurement import (
    DepthComparison,
    TimeComparison,
    compare_depth,
    compare_time,
    effective_batch,
    finite_width_error,
)

__all__ = [
    "SignalProfile",
    "signal_profile",
    "LagDecomposition",
    "lag_decomposition",
    "rnn_lag_decomposition",
    "DepthComparison",
    "TimeComparison",
    "compare_depth",
    "compare_time",
    "finite_width_error",
    "effective_batch",
    "JacobianSpectrum",
    "jacobian_spectrum",
    "IsometrySummary",
    "isometry_summary",
    "between_layers",
    "HessianEigs",
    "hessian_eigs",
    "HessianTrace",
    "hessian_trace",
    "StationaryPoint",
    "classify_stationary",
]
