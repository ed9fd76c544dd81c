"""Typed views of two well-known tables: unit statistics (:class:`UnitStats`) and BPTT profiles (:class:`TemporalFlow`).

A recorder stores them as plain :class:`~gradprobe.trace.Table` objects (so the run log, exports and
``load_run`` treat them like any other table); these classes are the readable face of those tables.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gradprobe._display import esc, html_table, num
from gradprobe.errors import ConfigError
from gradprobe.functional.profiles import fit_decay_rate, gradient_horizon
from gradprobe.trace.table import Table

__all__ = ["UnitStats", "TemporalFlow"]


@dataclass(frozen=True, eq=False)
class UnitStats:
    """Per activation module (forward order): ``saturated_fraction`` / ``dead_fraction`` (NaN where not applicable).

    ``saturated_fraction``: fraction of (sample, unit) entries of a sigmoid/tanh module whose local
    derivative is below the probe's ``saturation`` times its maximum; ``dead_fraction``: fraction of a
    ReLU module's units that are 0 on every sample of the batch; ``n_units``: units per module.
    """

    names: tuple[str, ...]
    kinds: tuple[str, ...]
    saturated_fraction: np.ndarray
    dead_fraction: np.ndarray
    n_units: np.ndarray

    def __len__(self) -> int:
        return len(self.names)

    def to_table(self) -> Table:
        return Table(self.names, self.kinds, {"saturated_fraction": np.asarray(self.saturated_fraction, dtype=np.float64),
                                              "dead_fraction": np.asarray(self.dead_fraction, dtype=np.float64),
                                              "n_units": np.asarray(self.n_units, dtype=np.int64)})

    @classmethod
    def from_table(cls, t: Table) -> UnitStats:
        return cls(t.sites, t.kinds, t.column("saturated_fraction"), t.column("dead_fraction"), t.column("n_units"))

    def __repr__(self) -> str:
        return f"UnitStats({len(self)} activation modules)"

    def _rows(self) -> list[list]:
        def pct(x):
            return None if not np.isfinite(x) else f"{100 * float(x):.1f} %"
        return [[n, k, pct(s), pct(d), int(u)] for n, k, s, d, u in
                zip(self.names, self.kinds, self.saturated_fraction, self.dead_fraction, self.n_units)]

    def __str__(self) -> str:
        lines = [f"{'module':<28} {'kind':<12} {'saturated':>10} {'dead':>10} {'units':>6}"]
        for n, k, sat, dead, units in self._rows():
            lines.append(f"{n[-28:]:<28} {k[:12]:<12} {sat or '—':>10} {dead or '—':>10} {units:>6}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        return html_table(["module", "kind", "saturated", "dead", "units"], self._rows())


@dataclass(frozen=True, eq=False)
class TemporalFlow:
    """``‖∂E/∂h_k‖`` for every step ``k`` of one recurrent layer and direction.

    Attributes:
        name: layer (and direction) name, e.g. ``"lstm.l1.reverse"``, or a :func:`mark_state` name.
        per_sequence: ``(B, T)`` float64, ``‖∂E/∂h_k[b]‖₂`` over the hidden units, time order. ``E`` is
            the scalar the user back-propagated (a mean-reduced loss gives gradients of the mean).
            Kept in memory only: a :class:`TemporalFlow` read back from a run log has ``B = 1`` (the
            batch profile).
        cell_per_sequence: ``(B, T)`` the same for the LSTM cell state ``c_k`` (``None`` otherwise).
        reverse: the reverse direction of a bidirectional layer (processes ``T−1 … 0``).
        lengths: ``(B,)`` valid steps per sequence (packed input); steps ``≥ lengths[b]`` hold 0.
            ``None`` for padded input (every step is processed, padding included).
        profile, cell_profile: the ``(T,)`` batch profiles; computed from ``per_sequence`` when omitted.
    """

    name: str
    per_sequence: np.ndarray | None
    cell_per_sequence: np.ndarray | None = None
    reverse: bool = False
    lengths: np.ndarray | None = None
    profile: np.ndarray | None = None
    cell_profile: np.ndarray | None = None

    def __post_init__(self):
        if self.profile is None:
            if self.per_sequence is None:
                raise ConfigError(f"TemporalFlow {self.name!r} needs per_sequence or a profile")
            object.__setattr__(self, "profile", np.sqrt((np.asarray(self.per_sequence) ** 2).sum(0)))
        if self.cell_profile is None and self.cell_per_sequence is not None:
            object.__setattr__(self, "cell_profile", np.sqrt((np.asarray(self.cell_per_sequence) ** 2).sum(0)))
        if self.per_sequence is None:
            object.__setattr__(self, "per_sequence", np.asarray(self.profile)[None, :])
            if self.cell_profile is not None and self.cell_per_sequence is None:
                object.__setattr__(self, "cell_per_sequence", np.asarray(self.cell_profile)[None, :])

    @property
    def steps(self) -> int:
        return len(self.profile)

    @property
    def grad_norm(self) -> np.ndarray:
        """``(T,)`` ``‖∂E/∂h_k‖₂`` over the whole batch (norm over ``(B, H)``), time order."""
        return self.profile

    @property
    def cell_norm(self) -> np.ndarray | None:
        """``(T,)`` ``‖∂E/∂c_k‖₂`` over the batch for an LSTM; ``None`` for other cells."""
        return self.cell_profile

    def steps_back(self, which: str = "h") -> np.ndarray:
        """``(T,)`` the batch profile in propagation order: entry ``s`` is ``s`` steps back from the loss end."""
        g = self.grad_norm if which == "h" else self.cell_norm
        if g is None:
            raise ConfigError(f"{self.name} has no cell state; steps_back(which='c') is for LSTM layers")
        return g if self.reverse else g[::-1]

    @property
    def decay_rate(self) -> float:
        """Fitted ``ln`` gain per step back (``< 0`` vanishing, ``> 0`` exploding); see :func:`gradprobe.functional.profiles.fit_decay_rate`."""
        return fit_decay_rate(self.steps_back())[0]

    def horizon(self, fraction: float = 1e-2) -> int:
        """Steps back the signal stays above ``fraction`` of its maximum; see :func:`gradprobe.functional.profiles.gradient_horizon`."""
        return gradient_horizon(self.steps_back(), fraction)

    def __repr__(self) -> str:
        return (
            f"TemporalFlow({self.name!r}, T={self.steps}, B={self.per_sequence.shape[0]}, "
            f"decay_rate={self.decay_rate:.4g}, horizon={self.horizon()})"
        )

    def _facts(self) -> list[tuple[str, str]]:
        """(what, value) pairs a person reads: the profile's two ends, its decay and its horizon."""
        back = self.steps_back()
        rate = self.decay_rate
        out = [("steps (T)", str(self.steps)),
               ("direction", "reverse" if self.reverse else "forward"),
               ("‖∂E/∂h‖ at the loss end", num(back[0])),
               (f"‖∂E/∂h‖ {self.steps - 1} steps back", num(back[-1])),
               ("change per step back", "nan" if not np.isfinite(rate) else f"×{np.exp(rate):.4g} (ln gain {rate:.4g})"),
               ("horizon (signal ≥ 1 % of its peak)", f"{self.horizon()} steps")]
        if self.cell_norm is not None:
            c_rate = fit_decay_rate(self.steps_back("c"))[0]
            out.append(("cell state c: change per step back",
                        "nan" if not np.isfinite(c_rate) else f"×{np.exp(c_rate):.4g} (ln gain {c_rate:.4g})"))
            out.append(("cell state c: horizon", f"{gradient_horizon(self.steps_back('c'), 1e-2)} steps"))
        return out

    def __str__(self) -> str:
        facts = self._facts()
        width = max(len(k) for k, _ in facts)
        return f"‖∂E/∂h_k‖ through time for {self.name!r}\n" + "\n".join(f"  {k:<{width}}  {v}" for k, v in facts)

    def _repr_html_(self) -> str:
        return (f"<div><p>‖∂E/∂h_k‖ through time for <code>{esc(self.name)}</code></p>"
                + html_table(None, self._facts()) + "</div>")

    # ------------------------------------------------------------ as a table
    @staticmethod
    def to_table(flows: dict[str, TemporalFlow]) -> Table:
        """One table for a step's profiles: site = series name; per-sequence arrays stay in memory."""
        fs = list(flows.values())
        return Table(
            tuple(flows), ("",) * len(fs),
            {
                "h": tuple(f.profile for f in fs),
                "c": tuple(f.cell_profile for f in fs),
                "lengths": tuple(None if f.lengths is None else np.asarray(f.lengths, dtype=np.int64) for f in fs),
                "reverse": np.array([f.reverse for f in fs], dtype=bool),
                "per_sequence": tuple(f.per_sequence for f in fs),
                "cell_per_sequence": tuple(f.cell_per_sequence for f in fs),
            },
            transient=frozenset({"per_sequence", "cell_per_sequence"}),
        )

    @classmethod
    def from_table(cls, t: Table) -> dict[str, TemporalFlow]:
        per = t.columns.get("per_sequence", (None,) * len(t))
        cper = t.columns.get("cell_per_sequence", (None,) * len(t))
        h, c, lengths, rev = t.column("h"), t.column("c"), t.column("lengths"), t.column("reverse")
        return {
            s: cls(s, per[i], cper[i], bool(rev[i]), lengths[i], profile=h[i], cell_profile=c[i])
            for i, s in enumerate(t.sites)
        }
