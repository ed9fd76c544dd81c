"""The data contract: what one recorded step holds (:class:`LayerFlow`) and a bounded history (:class:`Trace`).

Everything above this floor (analysis, diagnosis, report) reads these objects or the run log they
are saved to, never the model. A trace can therefore be rebuilt from a run log without the model.

Quantities per layer (a *layer* is a module that owns parameters directly; containers are not layers):

============================  =====================================================================
``grad_norm``                 ‖∇_θ L‖₂ over the layer's own parameters (as accumulated in ``.grad``)
``output_grad_norm``          ‖∂L/∂h_l‖₂, h_l the layer's output(s), summed over the batch (the
                              back-propagated signal). A module called several times in one step
                              reports √(Σ_calls ‖∂L/∂h_l^(call)‖²): the norm of all its outputs together.
``activation_norm``           ‖h_l‖₂ of the forward output(s), same convention.
``weight_norm``               ‖θ_l‖₂ over the layer's own parameters.
``update_ratio``              ‖θ_l(now) − θ_l(previous recorded step)‖₂ / ‖θ_l(previous)‖₂.
============================  =====================================================================

NaN means *not defined* (no gradient reached that tensor, first step for ``update_ratio``); the
boolean masks ``has_grad``, ``has_output_grad`` and ``has_output`` say which values were measured, so a
measured NaN or Inf (a real non-finite gradient) is never confused with "not measured".
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np

from gradprobe.errors import ConfigError
from gradprobe.functional.profiles import fit_decay_rate, gradient_horizon

__all__ = ["LayerFlow", "TemporalFlow", "UnitStats", "ModelFacts", "Trace", "QUANTITIES", "MASKS"]

#: Per-layer float quantities, in the order they are stored.
QUANTITIES: tuple[str, ...] = (
    "grad_norm",
    "output_grad_norm",
    "activation_norm",
    "weight_norm",
    "update_ratio",
)
#: Per-layer boolean masks saying which quantities were measured.
MASKS: tuple[str, ...] = ("has_grad", "has_output_grad", "has_output")


def _as_float(a) -> np.ndarray:
    arr = np.asarray(a, dtype=np.float64)
    arr.setflags(write=False)
    return arr


def _as_bool(a) -> np.ndarray:
    arr = np.asarray(a, dtype=bool)
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True, eq=False)
class LayerFlow:
    """Per-layer gradient flow of one step, aligned with ``names`` (forward execution order).

    Arrays have shape ``(L,)`` for ``L`` layers. ``backward_rank[i]`` is the position of layer ``i`` in
    backward order (0 = first reached by the backward pass); layers whose output gradient was not
    observed are ranked after the others, in reverse forward order.

    >>> import numpy as np
    >>> f = LayerFlow.from_arrays(["a", "b"], grad_norm=[1.0, 2.0])
    >>> f.names, f.grad_norm.tolist(), bool(np.isnan(f.update_ratio).all())
    (('a', 'b'), [1.0, 2.0], True)
    """

    names: tuple[str, ...]
    kinds: tuple[str, ...]
    grad_norm: np.ndarray
    output_grad_norm: np.ndarray
    activation_norm: np.ndarray
    weight_norm: np.ndarray
    update_ratio: np.ndarray
    has_grad: np.ndarray
    has_output_grad: np.ndarray
    has_output: np.ndarray
    backward_rank: np.ndarray
    step: int | None = None
    loss: float | None = None
    extra: dict = field(default_factory=dict)
    #: saturated / dead unit statistics of activation modules in this step (``Probe(units=True)``)
    units: UnitStats | None = None
    #: ``{recurrent layer: TemporalFlow}`` of this step (``Probe(temporal=True)``)
    temporal: Mapping[str, TemporalFlow] | None = None

    @classmethod
    def from_arrays(cls, names, kinds=None, *, step=None, loss=None, backward_rank=None, **arrays) -> LayerFlow:
        """Build a flow from plain sequences; missing quantities are NaN and masks default to "measured where finite-or-not-NaN"."""
        names = tuple(names)
        n = len(names)
        unknown = set(arrays) - set(QUANTITIES) - set(MASKS)
        if unknown:
            raise ConfigError(f"unknown LayerFlow fields {sorted(unknown)}; expected some of {QUANTITIES + MASKS}")
        vals = {}
        for q in QUANTITIES:
            v = arrays.get(q)
            vals[q] = _as_float(np.full(n, np.nan) if v is None else v)
            if vals[q].shape != (n,):
                raise ConfigError(f"LayerFlow.{q} has shape {vals[q].shape}, expected ({n},) to match names")
        default_masks = {
            "has_grad": ~np.isnan(vals["grad_norm"]),
            "has_output_grad": ~np.isnan(vals["output_grad_norm"]),
            "has_output": ~np.isnan(vals["activation_norm"]),
        }
        for m in MASKS:
            vals[m] = _as_bool(arrays.get(m, default_masks[m]))
        if backward_rank is None:
            backward_rank = np.arange(n)[::-1].copy()
        rank = np.asarray(backward_rank, dtype=np.int64)
        rank.setflags(write=False)
        return cls(
            names=names,
            kinds=tuple(kinds) if kinds is not None else ("",) * n,
            backward_rank=rank,
            step=step,
            loss=None if loss is None else float(loss),
            **vals,
        )

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        extras = "".join(
            f", {k}" for k, v in (("units", self.units), ("temporal", self.temporal)) if v is not None
        )
        return f"LayerFlow(step={self.step}, loss={self.loss}, {len(self)} layers{extras})"

    def index(self, name: str) -> int:
        """Position of layer ``name`` (raises ``ConfigError`` listing the known names)."""
        try:
            return self.names.index(name)
        except ValueError:
            raise ConfigError(f"no layer named {name!r}; layers are {list(self.names)}") from None

    def nonfinite(self) -> np.ndarray:
        """Boolean ``(L,)``: a measured quantity of the layer is NaN or ±Inf."""
        bad = np.zeros(len(self), dtype=bool)
        for q, m in (("grad_norm", "has_grad"), ("output_grad_norm", "has_output_grad"), ("activation_norm", "has_output")):
            bad |= getattr(self, m) & ~np.isfinite(getattr(self, q))
        return bad

    def as_dict(self) -> dict:
        """Plain-Python view (lists, floats; NaN kept as float('nan')) for JSON-like serialisation."""
        d = {"step": self.step, "loss": self.loss, "names": list(self.names), "kinds": list(self.kinds)}
        for q in QUANTITIES + MASKS:
            d[q] = getattr(self, q).tolist()
        d["backward_rank"] = self.backward_rank.tolist()
        return d

    def table(self, max_rows: int | None = None) -> str:
        """A fixed-width text table: one row per layer, in forward order."""
        head = f"{'#':>3}  {'layer':<28} {'kind':<12} {'‖∂L/∂h‖':>10} {'‖∇θ‖':>10} {'‖θ‖':>10} {'‖Δθ‖/‖θ‖':>10}"
        rows = [head, "-" * len(head)]
        idx = range(len(self))
        if max_rows is not None and len(self) > max_rows:
            half = max_rows // 2
            idx = list(range(half)) + [-1] + list(range(len(self) - half, len(self)))
        for i in idx:
            if i == -1:
                rows.append(f"{'…':>3}")
                continue
            name = self.names[i] if len(self.names[i]) <= 28 else "…" + self.names[i][-27:]
            rows.append(
                f"{i:>3}  {name:<28} {self.kinds[i][:12]:<12} {_fmt(self.output_grad_norm[i], self.has_output_grad[i])} "
                f"{_fmt(self.grad_norm[i], self.has_grad[i])} {_fmt(self.weight_norm[i])} "
                f"{_fmt(self.update_ratio[i], not np.isnan(self.update_ratio[i]))}"
            )
        return "\n".join(rows)


def _fmt(x: float, measured: bool = True) -> str:
    """'—' for a value that was not measured; a measured NaN/Inf is printed as such, never hidden."""
    if not measured:
        return f"{'—':>10}"
    return f"{x:>10.3g}"


class Trace:
    """Bounded in-memory history of recorded steps.

    Memory policy: at most ``max_steps`` :class:`LayerFlow` records are kept. When a new record would
    exceed that, every other retained record is dropped and the keep-stride doubles, so the trace
    always spans the whole run at an even stride (1, 2, 4, … recorded steps) and memory stays
    ``O(max_steps × layers)`` on runs of any length. The run log (``Probe(log_dir=...)``) keeps every
    step. ``max_steps=None`` keeps everything (used when reading a run log back).

    >>> t = Trace(max_steps=4)
    >>> for s in range(10):
    ...     t.append(LayerFlow.from_arrays(["a"], grad_norm=[float(s)], step=s))
    >>> t.steps.tolist(), t.stride
    ([0, 4, 8], 4)
    """

    def __init__(self, max_steps: int | None = 10_000):
        if max_steps is not None and max_steps < 2:
            raise ConfigError(f"Trace(max_steps={max_steps}) must keep at least 2 steps (or None for unbounded)")
        self.max_steps = max_steps
        self.stride = 1
        self._records: list[tuple[int, LayerFlow]] = []
        self._count = 0
        self._names: dict[str, None] = {}

    def append(self, flow: LayerFlow) -> None:
        """Add one recorded step (it is kept or thinned according to the memory policy)."""
        i = self._count
        self._count += 1
        for n in flow.names:
            self._names.setdefault(n, None)
        if i % self.stride:
            return
        self._records.append((i, flow))
        if self.max_steps is not None and len(self._records) > self.max_steps:
            self.stride *= 2
            self._records = [(j, f) for j, f in self._records if j % self.stride == 0]

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[LayerFlow]:
        return (f for _, f in self._records)

    def __getitem__(self, i: int) -> LayerFlow:
        return self._records[i][1]

    @property
    def recorded(self) -> int:
        """How many steps were appended in total (including thinned ones)."""
        return self._count

    @property
    def last(self) -> LayerFlow:
        if not self._records:
            raise IndexError("the trace is empty: no step has been recorded yet")
        return self._records[-1][1]

    @property
    def names(self) -> tuple[str, ...]:
        """Every layer name seen, in order of first appearance."""
        return tuple(self._names)

    @property
    def steps(self) -> np.ndarray:
        return np.array([f.step if f.step is not None else j for j, f in self._records], dtype=np.int64)

    @property
    def losses(self) -> np.ndarray:
        return np.array([np.nan if f.loss is None else f.loss for f in self], dtype=np.float64)

    def matrix(self, quantity: str) -> np.ndarray:
        """``(S, L)`` array of ``quantity`` over retained steps × :attr:`names`; NaN where a layer is absent."""
        if quantity not in QUANTITIES:
            raise ConfigError(f"unknown quantity {quantity!r}; choose one of {QUANTITIES}")
        names = self.names
        col = {n: k for k, n in enumerate(names)}
        out = np.full((len(self), len(names)), np.nan)
        for s, f in enumerate(self):
            cols = [col[n] for n in f.names]
            out[s, cols] = getattr(f, quantity)
        return out


@dataclass(frozen=True, eq=False)
class TemporalFlow:
    """``‖∂E/∂h_k‖`` for every step ``k`` of one recurrent layer and direction.

    Attributes:
        name: layer (and direction) name, e.g. ``"lstm.l1.reverse"``, or a :func:`mark_state` name.
        per_sequence: ``(B, T)`` float64, ``‖∂E/∂h_k[b]‖₂`` over the hidden units, time order. ``E`` is
            the scalar the user back-propagated (a mean-reduced loss gives gradients of the mean).
        cell_per_sequence: ``(B, T)`` the same for the LSTM cell state ``c_k`` (``None`` otherwise).
        reverse: the reverse direction of a bidirectional layer (processes ``T−1 … 0``).
        lengths: ``(B,)`` valid steps per sequence (packed input); steps ``≥ lengths[b]`` hold 0.
            ``None`` for padded input (every step is processed, padding included).
    """

    name: str
    per_sequence: np.ndarray
    cell_per_sequence: np.ndarray | None = None
    reverse: bool = False
    lengths: np.ndarray | None = None

    @property
    def steps(self) -> int:
        return self.per_sequence.shape[1]

    @property
    def grad_norm(self) -> np.ndarray:
        """``(T,)`` ``‖∂E/∂h_k‖₂`` over the whole batch (norm over ``(B, H)``), time order."""
        return np.sqrt((self.per_sequence**2).sum(0))

    @property
    def cell_norm(self) -> np.ndarray | None:
        """``(T,)`` ``‖∂E/∂c_k‖₂`` over the batch for an LSTM; ``None`` for other cells."""
        if self.cell_per_sequence is None:
            return None
        return np.sqrt((self.cell_per_sequence**2).sum(0))

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


@dataclass(frozen=True, eq=False)
class UnitStats:
    """Per activation module (forward order): ``saturated_fraction`` / ``dead_fraction`` (NaN where not applicable)."""

    names: tuple[str, ...]
    kinds: tuple[str, ...]
    saturated_fraction: np.ndarray
    dead_fraction: np.ndarray
    n_units: np.ndarray

    def __len__(self) -> int:
        return len(self.names)


@dataclass(frozen=True)
class ModelFacts:
    """What the diagnosis may want to know about a model's building blocks (found by module type).

    Functional activations (``torch.sigmoid`` inside ``forward``) are invisible here; rules treat
    these facts as hints for ranking remedies, never as evidence.
    """

    saturating: tuple[str, ...]
    relu_family: tuple[str, ...]
    normalization: tuple[str, ...]
    recurrent: tuple[str, ...]
    attention: tuple[str, ...]
    n_layers: int
