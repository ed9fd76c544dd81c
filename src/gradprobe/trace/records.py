"""What one recorded step holds: :class:`LayerFlow` (per-layer quantities) and :class:`Table` (per-site values).

Every recorder (``gradprobe.probe``) contributes named per-layer quantities and/or tables to the step's
record; nothing here knows which recorder made what, so a quantity a user's own recorder measures is
stored, saved to the run log and read back exactly like a built-in one.

Built-in per-layer quantities (a *layer* is a module that owns parameters directly; containers are not layers):

============================  =====================================================================
``grad_norm``                 ‖∇_θ L‖₂ over the layer's own parameters (as accumulated in ``.grad``)
``output_grad_norm``          ‖∂L/∂h_l‖₂, h_l the layer's output(s), summed over the batch (the
                              back-propagated signal). A module called several times in one step
                              reports √(Σ_calls ‖∂L/∂h_l^(call)‖²): the norm of all its outputs together.
``activation_norm``           ‖h_l‖₂ of the forward output(s), same convention.
``weight_norm``               ‖θ_l‖₂ over the layer's own parameters.
``update_ratio``              ‖θ_l(now) − θ_l(previous recorded step)‖₂ / ‖θ_l(previous)‖₂.
============================  =====================================================================

Well-known tables: ``"units"`` (:class:`UnitStats`), ``"temporal"`` (:class:`TemporalFlow`),
``"totals"`` (site ``"model"``: ``grad_norm``, the total ‖∇_θ L‖₂ over every distinct parameter, what
``clip_grad_norm_`` clips) and ``"scaler"`` (site ``"loss_scale"``: the loss ``scale`` and whether the
step was ``skipped``, see :attr:`LayerFlow.skipped`).

Every quantity comes with a boolean *measured* mask: NaN with the mask False means *not measured*
(no gradient reached that tensor, the recorder was off this step); a measured NaN or Inf is a real
non-finite value and is never confused with "not measured".
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

import numpy as np

from gradprobe._display import esc, html_table
from gradprobe.errors import ConfigError
from gradprobe.trace.table import Table, frozen_array as _frozen
from gradprobe.trace.views import TemporalFlow, UnitStats

__all__ = ["LayerFlow", "QUANTITIES", "MASKS", "MASK_OF", "LABELS"]

#: The built-in per-layer float quantities, in their canonical order.
QUANTITIES: tuple[str, ...] = (
    "grad_norm",
    "output_grad_norm",
    "activation_norm",
    "weight_norm",
    "update_ratio",
)
#: Names of the measured-masks of the built-in quantities that have one by name (``LayerFlow.has_grad`` ...).
MASK_OF: Mapping[str, str] = MappingProxyType(
    {"grad_norm": "has_grad", "output_grad_norm": "has_output_grad", "activation_norm": "has_output"}
)
MASKS: tuple[str, ...] = tuple(MASK_OF.values())
#: How people read the built-in quantities (a user recorder's quantity is shown by its name).
LABELS: Mapping[str, str] = MappingProxyType({
    "output_grad_norm": "‖∂L/∂h‖",
    "grad_norm": "‖∂L/∂θ‖",
    "activation_norm": "‖h‖",
    "weight_norm": "‖θ‖",
    "update_ratio": "‖Δθ‖/‖θ‖",
})

_EMPTY: Mapping = MappingProxyType({})


@dataclass(frozen=True, eq=False)
class LayerFlow:
    """Per-layer gradient flow of one step, aligned with ``names`` (forward execution order).

    ``values[q]`` and ``measured[q]`` are ``(L,)`` arrays for ``L`` layers (float64 and bool, read-only)
    for every per-layer quantity ``q`` recorded this step (the built-in ones are also attributes:
    ``flow.grad_norm``, ``flow.has_grad``, ...; any quantity is ``flow[q]``). ``backward_rank[i]`` is the
    position of layer ``i`` in backward order (0 = first reached by the backward pass); layers whose
    output gradient was not observed are ranked after the others, in reverse forward order.
    ``tables`` holds what recorders measured over other sites (see :class:`~gradprobe.trace.Table`);
    ``recorders`` names the recorders that recorded this step.

    >>> f = LayerFlow.from_arrays(["a", "b"], grad_norm=[1.0, 2.0])
    >>> f.names, f.grad_norm.tolist(), bool(np.isnan(f.update_ratio).all())
    (('a', 'b'), [1.0, 2.0], True)
    >>> f["grad_norm"] is f.grad_norm, "output_grad_norm" in f
    (True, False)
    """

    names: tuple[str, ...]
    kinds: tuple[str, ...]
    values: Mapping[str, np.ndarray]
    measured: Mapping[str, np.ndarray]
    backward_rank: np.ndarray
    step: int | None = None
    loss: float | None = None
    tables: Mapping[str, Table] = field(default_factory=lambda: _EMPTY)
    #: names of the recorders that recorded this step (with a budget, slower ones skip steps)
    recorders: tuple[str, ...] = ()

    def __post_init__(self):
        n = len(self.names)
        object.__setattr__(self, "names", tuple(self.names))
        kinds = tuple(self.kinds) if self.kinds is not None else ("",) * n
        if len(kinds) != n:
            raise ConfigError(f"LayerFlow has {n} names but {len(kinds)} kinds")
        object.__setattr__(self, "kinds", kinds)
        vals, masks = {}, {}
        for q, v in self.values.items():
            arr = v if _is_frozen(v, np.float64) else _frozen(v, np.float64)
            if arr.shape != (n,):
                raise ConfigError(f"LayerFlow quantity {q!r} has shape {arr.shape}, expected ({n},) to match names")
            vals[q] = arr
            m = self.measured.get(q)
            m = ~np.isnan(arr) if m is None else m
            m = m if _is_frozen(m, np.bool_) else _frozen(m, bool)
            if m.shape != (n,):
                raise ConfigError(f"LayerFlow mask of {q!r} has shape {m.shape}, expected ({n},)")
            masks[q] = m
        extra = set(self.measured) - set(vals)
        if extra:
            raise ConfigError(f"LayerFlow masks {sorted(extra)} have no values")
        object.__setattr__(self, "values", MappingProxyType(vals))
        object.__setattr__(self, "measured", MappingProxyType(masks))
        rank = self.backward_rank
        rank = np.arange(n)[::-1] if rank is None else rank
        object.__setattr__(self, "backward_rank", _frozen(rank, np.int64))
        if self.backward_rank.shape != (n,):
            raise ConfigError(f"backward_rank has shape {self.backward_rank.shape}, expected ({n},)")
        object.__setattr__(self, "tables", MappingProxyType(dict(self.tables)))
        object.__setattr__(self, "recorders", tuple(self.recorders))
        if self.loss is not None:
            object.__setattr__(self, "loss", float(self.loss))

    @classmethod
    def trusted(cls, names: tuple[str, ...], kinds: tuple[str, ...], values: dict, measured: dict,
                backward_rank: np.ndarray, step: int | None, loss: float | None, tables: dict,
                recorders: tuple[str, ...]) -> LayerFlow:
        """The record the constructor would build, without checking or copying anything: for a caller
        that already guarantees what :meth:`__post_init__` enforces (the probe session, once per step).

        Preconditions (not checked): ``names`` and ``kinds`` are tuples of equal length ``n``; every
        ``values[q]`` is a read-only float64 ``(n,)`` array owned by the record (``base is None``) and
        ``measured`` has exactly the same keys, each a read-only bool ``(n,)`` array; ``backward_rank``
        is a read-only int64 ``(n,)`` array; ``tables`` is a fresh dict of :class:`Table` s the caller
        does not keep; ``recorders`` a tuple; ``loss`` a float or ``None``. Under these the result equals
        ``LayerFlow(names, kinds, values, measured, backward_rank, step=..., loss=..., tables=...,
        recorders=...)`` field by field (a test holds the two apart on the probe's records).
        """
        self = object.__new__(cls)
        put = object.__setattr__
        put(self, "names", names)
        put(self, "kinds", kinds)
        put(self, "values", MappingProxyType(values))
        put(self, "measured", MappingProxyType(measured))
        put(self, "backward_rank", backward_rank)
        put(self, "step", step)
        put(self, "loss", loss)
        put(self, "tables", MappingProxyType(tables))
        put(self, "recorders", recorders)
        return self

    @classmethod
    def from_arrays(cls, names, kinds=None, *, step=None, loss=None, backward_rank=None, tables=None,
                    recorders=(), **arrays) -> LayerFlow:
        """Build a flow from plain sequences of the built-in quantities and masks (``has_grad=...``).

        Missing built-in quantities are NaN (not measured); a mask defaults to "measured where not NaN".
        """
        names = tuple(names)
        n = len(names)
        unknown = set(arrays) - set(QUANTITIES) - set(MASKS)
        if unknown:
            raise ConfigError(f"unknown LayerFlow fields {sorted(unknown)}; expected some of {QUANTITIES + MASKS}")
        values, measured = {}, {}
        for q in QUANTITIES:
            v = arrays.get(q)
            values[q] = np.full(n, np.nan) if v is None else np.asarray(v, dtype=np.float64)
            if q in MASK_OF and MASK_OF[q] in arrays:
                measured[q] = np.asarray(arrays[MASK_OF[q]], dtype=bool)
        return cls(names, kinds, values, measured, backward_rank, step=step, loss=loss, tables=tables or {},
                   recorders=recorders)

    # ----------------------------------------------------------------- access
    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, quantity: str) -> bool:
        return quantity in self.values and bool(self.measured[quantity].any())

    def __getitem__(self, quantity: str) -> np.ndarray:
        """``(L,)`` values of ``quantity`` (NaN where not measured); any recorded quantity, built-in or not."""
        try:
            return self.values[quantity]
        except KeyError:
            if quantity in QUANTITIES:
                return self._nan()
            raise ConfigError(f"no quantity {quantity!r} in this step; recorded: {sorted(self.values)}") from None

    def mask(self, quantity: str) -> np.ndarray:
        """``(L,)`` bool: where ``quantity`` was measured."""
        m = self.measured.get(quantity)
        return self._false() if m is None else m

    @property
    def quantities(self) -> tuple[str, ...]:
        """Every per-layer quantity this record holds (built-in first, in canonical order)."""
        return tuple(q for q in QUANTITIES if q in self.values) + tuple(q for q in self.values if q not in QUANTITIES)

    def _nan(self) -> np.ndarray:
        a = np.full(len(self), np.nan)
        a.setflags(write=False)
        return a

    def _false(self) -> np.ndarray:
        a = np.zeros(len(self), dtype=bool)
        a.setflags(write=False)
        return a

    grad_norm = property(lambda self: self["grad_norm"], doc="``(L,)`` ‖∂L/∂θ_l‖₂")
    output_grad_norm = property(lambda self: self["output_grad_norm"], doc="``(L,)`` ‖∂L/∂h_l‖₂")
    activation_norm = property(lambda self: self["activation_norm"], doc="``(L,)`` ‖h_l‖₂")
    weight_norm = property(lambda self: self["weight_norm"], doc="``(L,)`` ‖θ_l‖₂")
    update_ratio = property(lambda self: self["update_ratio"], doc="``(L,)`` ‖Δθ_l‖₂/‖θ_l‖₂")
    has_grad = property(lambda self: self.mask("grad_norm"), doc="``(L,)`` grad_norm measured")
    has_output_grad = property(lambda self: self.mask("output_grad_norm"), doc="``(L,)`` output_grad_norm measured")
    has_output = property(lambda self: self.mask("activation_norm"), doc="``(L,)`` activation_norm measured")

    @property
    def units(self):
        """Saturated / dead unit statistics of activation modules (:class:`UnitStats`), or ``None``."""
        t = self.tables.get("units")
        return None if t is None else UnitStats.from_table(t)

    @property
    def skipped(self) -> bool:
        """The optimizer skipped this step: a loss scaler found Inf/NaN in the scaled gradients (the
        ``"scaler"`` table of ``Probe(scaler=...)``). Its non-finite values are an fp16 overflow that the
        scaler handles, not an explosion of the model's gradients; the diagnosis passes over such steps."""
        t = self.tables.get("scaler")
        return t is not None and "skipped" in t.columns and bool(np.asarray(t.columns["skipped"]).any())

    @property
    def temporal(self):
        """``{recurrent layer: TemporalFlow}`` of this step (``Probe(temporal=True)``), or ``None``."""
        t = self.tables.get("temporal")
        return None if t is None else TemporalFlow.from_table(t)

    def with_(self, **changes) -> LayerFlow:
        """A copy with some fields replaced (``loss=...``, ``step=...``, ``tables=...``)."""
        return replace(self, **changes)

    def __repr__(self) -> str:
        extras = "".join(f", {k}" for k in self.tables)
        return f"LayerFlow(step={self.step}, loss={self.loss}, {len(self)} layers{extras})"

    def index(self, name: str) -> int:
        """Position of layer ``name`` (raises ``ConfigError`` listing the known names)."""
        try:
            return self.names.index(name)
        except ValueError:
            raise ConfigError(f"no layer named {name!r}; layers are {list(self.names)}") from None

    def nonfinite(self) -> np.ndarray:
        """Boolean ``(L,)``: a measured gradient, output-gradient or activation norm of the layer is NaN or ±Inf."""
        bad = np.zeros(len(self), dtype=bool)
        for q in MASK_OF:
            if q in self.values:
                bad |= self.measured[q] & ~np.isfinite(self.values[q])
        return bad

    def as_dict(self) -> dict:
        """Plain-Python view (lists, floats; NaN kept as float('nan')) for JSON-like serialisation."""
        d = {"step": self.step, "loss": self.loss, "names": list(self.names), "kinds": list(self.kinds)}
        for q in self.quantities:
            d[q] = self.values[q].tolist()
        for q, m in MASK_OF.items():
            d[m] = self.mask(q).tolist()
        d["measured"] = {q: m.tolist() for q, m in self.measured.items()}
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
        og, g, w, u = self.output_grad_norm, self.grad_norm, self.weight_norm, self.update_ratio
        mog, mg, mw, mu = self.has_output_grad, self.has_grad, self.mask("weight_norm"), self.mask("update_ratio")
        for i in idx:
            if i == -1:
                rows.append(f"{'…':>3}")
                continue
            name = self.names[i] if len(self.names[i]) <= 28 else "…" + self.names[i][-27:]
            rows.append(
                f"{i:>3}  {name:<28} {self.kinds[i][:12]:<12} {_fmt(og[i], mog[i])} "
                f"{_fmt(g[i], mg[i])} {_fmt(w[i], mw[i])} {_fmt(u[i], mu[i])}"
            )
        return "\n".join(rows)

    def __str__(self) -> str:
        return f"step {self.step}" + ("" if self.loss is None else f", loss {self.loss:.4g}") + "\n" + self.table(40)

    def _repr_html_(self) -> str:
        """A table for Jupyter: one row per layer (forward order), every quantity recorded this step
        (built-in ones first), ``—`` where a value was not measured."""
        qs = [q for q in self.quantities if bool(self.mask(q).any())]
        order = ("output_grad_norm", "grad_norm", "weight_norm", "update_ratio", "activation_norm")
        qs = [q for q in order if q in qs] + [q for q in qs if q not in order]
        rows = [[i, self.names[i], self.kinds[i]]
                + [float(self.values[q][i]) if self.measured[q][i] else None for q in qs] for i in range(len(self))]
        head = f"step {self.step}" + ("" if self.loss is None else f", loss {self.loss:.4g}") + f", {len(self)} layers"
        if self.tables:
            head += "; tables: " + ", ".join(f"{k} ({len(t)} sites)" for k, t in self.tables.items())
        return (f"<div><p>{esc(head)}</p>"
                + html_table(["#", "layer", "kind"] + [LABELS.get(q, q) for q in qs], rows) + "</div>")


def _is_frozen(a, dtype) -> bool:
    return isinstance(a, np.ndarray) and a.dtype == dtype and not a.flags.writeable and a.base is None


def _fmt(x: float, measured: bool = True) -> str:
    """'—' for a value that was not measured; a measured NaN/Inf is printed as such, never hidden."""
    if not measured:
        return f"{'—':>10}"
    return f"{x:>10.3g}"
