"""Analysis: turn recorded flows into interpretable profiles (depth, time, spectra, theory vs measurement)."""
from gradprobe.analysis.depth import SignalProfile, signal_profile

__all__ = ["SignalProfile", "signal_profile"]
