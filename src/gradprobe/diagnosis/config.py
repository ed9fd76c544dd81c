"""Thresholds of the diagnosis: ratios and fractions, never bare absolute norms."""
from __future__ import annotations

from dataclasses import dataclass

from gradprobe.errors import ConfigError

__all__ = ["DiagnosisConfig"]


@dataclass(frozen=True)
class DiagnosisConfig:
    """Scale-aware thresholds (ratios across layers, never bare absolute norms).

    * ``vanish_ratio``: "vanishing" when the first layer's signal ‖∂L/∂h_1‖ is below this fraction of
      the last layer's (default 1e-2: two orders of magnitude).
    * ``explode_ratio``: "exploding" when it is above this multiple (default 1e2).
    * ``min_layers``: fewer measured layers (or time steps) than this give no depth (or time) verdict.
    * ``saturation``: a sigmoid/tanh entry is saturated when |φ'| < ``saturation``·max|φ'| (recorded
      by the probe, ``Probe(saturation=...)``); ``saturated_fraction``: "saturated_units" when a module
      has more than this fraction of saturated entries (default 0.5).
    * ``dead_fraction``: "dead_units" when a ReLU module has more than this fraction of units at 0 on
      every input of the batch (default 0.5).
    * ``window``, ``window_min``: "stagnating" looks at the last ``window`` recorded steps and needs at
      least ``2·window_min``; ``stagnation_ratio``: first-over-last layer median update ratio below
      which the lower layers count as frozen (default 1e-2); ``plateau``: the loss improved by less
      than this fraction between the window's halves (default 1 %).

    The defaults sit far outside the finite-width spread of a healthy network's log-ratio
    (≈ √(1.25·L·(3r−1)/N) in natural-log units; 0.7 for a 20-layer, 256-wide ReLU MLP: a factor 2).
    """

    vanish_ratio: float = 1e-2
    explode_ratio: float = 1e2
    min_layers: int = 3
    saturation: float = 0.05
    saturated_fraction: float = 0.5
    dead_fraction: float = 0.5
    window: int = 100
    window_min: int = 10
    stagnation_ratio: float = 1e-2
    plateau: float = 0.01

    def __post_init__(self):
        if not (0 < self.vanish_ratio < 1 < self.explode_ratio):
            raise ConfigError(
                f"need 0 < vanish_ratio < 1 < explode_ratio; got {self.vanish_ratio} and {self.explode_ratio}"
            )
        if self.min_layers < 2:
            raise ConfigError(f"min_layers={self.min_layers} must be at least 2")
        for name in ("saturation", "saturated_fraction", "dead_fraction", "stagnation_ratio", "plateau"):
            v = getattr(self, name)
            if not 0 < v < 1:
                raise ConfigError(f"{name}={v} must be a fraction in (0, 1)")
        if not 1 <= self.window_min <= self.window // 2:
            raise ConfigError(f"need 1 <= window_min <= window/2; got window={self.window}, window_min={self.window_min}")
