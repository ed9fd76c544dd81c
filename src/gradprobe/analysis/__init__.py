"""Analysis: turn recorded flows into interpretable profiles (depth, time, spectra, theory vs measurement)."""
from gradprobe.analysis.depth import SignalProfile, signal_profile
from gradprobe.analysis.temporal import LagDecomposition, lag_decomposition, rnn_lag_decomposition
from gradprobe.analysis.theory_vs_measurement import (
    DepthComparison,
    TimeComparison,
    compare_depth,
    compare_time,
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
]
