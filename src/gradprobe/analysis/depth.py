"""Depth profile of the back-propagated signal ‖∂L/∂h_l‖ over layers l = 1…L (forward order).

For a product of per-layer Jacobians the signal changes geometrically with depth, so we summarise a
profile ``s_1 … s_n`` (the layers whose output gradient was measured) by

* ``ratio = s_1 / s_n`` (first over last layer; < 1 means the signal shrinks on its way back), and
* ``factor = ratio^(1/(n−1))``: the geometric-mean gain per layer going backward (mean-field theory
  predicts ``√χ₁`` for this number in a wide random MLP; see ``gradprobe.theory``), and
* ``fit_factor = exp(−b)``, ``b`` the least-squares slope of ``ln s_l`` over ``l``: the same gain from
  all layers, robust to an odd first or last layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gradprobe.trace import LayerFlow

__all__ = ["SignalProfile", "signal_profile"]


@dataclass(frozen=True)
class SignalProfile:
    names: tuple[str, ...]
    values: np.ndarray  # (n,) signal norms, forward order
    source: str  # which LayerFlow quantity the profile uses
    ratio: float
    factor: float
    fit_factor: float

    @property
    def n(self) -> int:
        return len(self.names)

    @property
    def orders_of_magnitude(self) -> float:
        """log10(ratio): negative when the first layer receives less signal than the last."""
        return float(np.log10(self.ratio)) if self.ratio > 0 else float("-inf")


def signal_profile(flow: LayerFlow, source: str | None = None) -> SignalProfile | None:
    """Profile from ``output_grad_norm`` (default when measured) else ``grad_norm``; ``None`` if < 2 layers.

    >>> f = LayerFlow.from_arrays(["a", "b", "c"], output_grad_norm=[0.01, 0.1, 1.0])
    >>> p = signal_profile(f)
    >>> round(p.ratio, 6), round(p.factor, 6), round(p.fit_factor, 6)
    (0.01, 0.1, 0.1)
    """
    if source is None:
        source = "output_grad_norm" if flow.has_output_grad.sum() >= 2 else "grad_norm"
    mask_name = {"output_grad_norm": "has_output_grad", "grad_norm": "has_grad"}[source]
    vals = getattr(flow, source)
    keep = getattr(flow, mask_name) & np.isfinite(vals) & (vals > 0)
    if keep.sum() < 2:
        return None
    idx = np.flatnonzero(keep)
    v = vals[idx]
    ratio = float(v[0] / v[-1])
    n = len(v)
    factor = float(ratio ** (1.0 / (n - 1)))
    slope = np.polyfit(np.arange(n, dtype=float), np.log(v), 1)[0]
    return SignalProfile(
        names=tuple(flow.names[i] for i in idx),
        values=v,
        source=source,
        ratio=ratio,
        factor=factor,
        fit_factor=float(np.exp(-slope)),
    )
