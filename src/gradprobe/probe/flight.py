"""The full flight recorder: every step's full record, for the last few steps, in a ring on the device.

A session's recorders record at the schedule's cadence (with an overhead budget the costly ones skip
most steps). When a gradient spike fires, the steps that led up to it are what one wants to see at full
detail; they cannot be had afterwards. :class:`FullFlight` (``SpikeWatch(full_flight=True)``,
``Probe(model, spikes="full")``) runs a private *twin* of each built-in recorder of the session on
every step:

=====================  ===========================================================================
session recorder       its twin records every step
=====================  ===========================================================================
``WeightRecorder``     ``weight_norm`` ‖θ_l‖₂ and (if the session tracks updates) ``update_ratio``
                       ‖θ_l(t) − θ_l(t−1)‖₂ / ‖θ_l(t−1)‖₂ over *that one step* (its own snapshot)
``OutputRecorder``     ``output_grad_norm`` ‖∂L/∂h_l‖₂ and ``activation_norm`` ‖h_l‖₂ (own hooks)
``UnitRecorder``       the ``"units"`` table: ``saturated_fraction``, ``dead_fraction`` (own hooks)
=====================  ===========================================================================

(the parameter-gradient norms ‖∇θ_l‖ are the watch's own). A twin has its own hooks and its own state
(its own parameter snapshot, its own record of the layers' forward and backward order), so the
session's records are exactly what they are without the flight recorder: same steps, same numbers,
same layer order, and the session's update ratio still spans its own recorded steps. The twins' numbers stay
device tensors (each step's :class:`~gradprobe.probe.Deferred`); the host copies them only when a spike
is found, for the steps of its flight record. The temporal recorder (per-time-step BPTT profiles) and
user recorders have no twin. Under data parallelism the twins' hook quantities (‖∂L/∂h_l‖, ‖h_l‖, unit
statistics) are this rank's own, not combined over ranks as the session's records are. With a loss
scaler (``Probe(scaler=...)``) the backward's scale is divided out of ‖∂L/∂h_l‖ as in the session's
records (the parameter quantities carry none).

**Memory bound.** The ring holds ``K = N + check_every − 1`` steps (the host looks at the flags every
``check_every`` steps, and a spike's ``N`` steps must still be in the ring then). Per step the twins
keep on the device ``P_w + P_u`` float64 norms (weights and updates of the ``P_w`` parameter tensors,
``P_u`` of them tracked; the previous step's weight norms are a view of the step before), ``2·C``
output-hook norms in the outputs' dtype (``C`` hooked layer calls: ``L`` for a model that calls each
layer once) and ``S`` int64 unit counts (one per saturating or rectifying activation call), in four
small tensors::

    ring = K · (8·(P_w + P_u) + 2·C·itemsize + 8·S) + 8·(P_w + P_u)  bytes

and the update-ratio twin's snapshot, one copy of every tracked floating parameter (``Σ numel ·
itemsize``: what the session's own ``update_ratio=True`` costs once more). For the 20-layer MLP of
``BENCHMARKS.md`` (20 Linear layers, 40 parameter tensors, 19 ReLUs, 1,252,618 float32 parameters) with
``N = 32``, ``check_every = 32``: ``K = 63`` steps of 952 bytes, a ring of 60,616 bytes, and a 5,010,472
byte snapshot, as :meth:`FullFlight.nbytes` measures them (``tests/test_spikes_flight.py``; a small
tensor on an accelerator occupies at least the allocator's block, 512 bytes with CUDA's caching
allocator, so there count ``4·K`` blocks). On the host, each event holds ``N·(4L + 3S′)`` more numbers
(``S′`` activation modules).
"""
from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import numpy as np

from gradprobe.functional.transfer import to_host
from gradprobe.probe.outputs import OutputRecorder
from gradprobe.probe.params import WeightRecorder
from gradprobe.probe.recorder import Context, Contribution, Deferred, LayerOrder, Recorder
from gradprobe.probe.units import UnitRecorder
from gradprobe.trace import FlightTable, Table

__all__ = ["FullFlight", "flight_twins"]


def flight_twins(recorders: Sequence[Recorder]) -> list[Recorder]:
    """A fresh, uninstalled twin of each built-in recorder in ``recorders`` that has one (see the table in
    the module docstring), configured like it."""
    twins: list[Recorder] = []
    for r in recorders:
        if type(r) is WeightRecorder:
            twins.append(WeightRecorder(update_ratio=r.track_updates))
        elif type(r) is OutputRecorder:
            twins.append(OutputRecorder())
        elif type(r) is UnitRecorder:
            twins.append(UnitRecorder(saturation=r.saturation))
    return twins


class _Step:
    """One step in the ring: its index and each twin's contribution (finished once, on demand)."""

    __slots__ = ("t", "parts", "done", "scaler")

    def __init__(self, t: int, parts: list, scaler=None):
        self.t, self.parts, self.done, self.scaler = t, parts, None, scaler


class FullFlight:
    """The twins of a session's recorders, armed every step, and the ring of their last ``capacity`` steps."""

    def __init__(self, twins: Sequence[Recorder], capacity: int):
        self.twins = list(twins)
        self.capacity = int(capacity)
        self._ring: deque[_Step] = deque(maxlen=self.capacity)
        self._installed: list[Recorder] = []
        self._tracked: list = []
        self._order: LayerOrder | None = None

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.twins]

    def install(self, ctx: Context) -> None:
        # deferred: the twins' numbers are finished steps later, so they keep no strong reference to a .grad;
        # their own layer order: the session's forward and backward order stay what its own hooks saw
        self._order = LayerOrder(len(ctx.layers))
        own = Context(ctx.model, ctx.layers, self._order, deferred=True)
        try:
            for r in self.twins:
                r.install(own)
                self._installed.append(r)
                r.arm(True)
        except BaseException:
            self.remove()
            raise
        self._tracked = [p for layer in ctx.layers for p in layer.params]

    def take(self, t: int, scaler=None) -> None:
        """Collect this step from every twin (device tensors, no host copy) into the ring (``scaler``: the
        step's :class:`~gradprobe.probe.amp.ScalerSnapshot`, whose loss scale is divided out of the hook
        gradients' norms when the step is finished)."""
        parts = []
        for r in self._installed:
            c = r.collect(True)
            if c is not None:
                parts.append((r, c))
        self._ring.append(_Step(t, parts, scaler))

    def reset(self) -> None:
        for r in self._installed:
            r.reset()
            r.seconds = 0.0
        if self._order is not None:
            self._order.reset()

    def remove(self) -> None:
        for r in reversed(self._installed):
            r.remove()
        self._installed = []
        self._ring.clear()

    def clear(self) -> None:
        self._ring.clear()

    # ------------------------------------------------------------------ host side
    def records(self, steps: Sequence[int]) -> dict[int, tuple[dict, dict, dict]]:
        """``{t: (values, measured, tables)}`` for the steps of ``steps`` still in the ring (one host copy
        for all of them; a step is finished once and kept finished)."""
        want = set(steps)
        items = [s for s in self._ring if s.t in want]
        todo = [s for s in items if s.done is None]
        tensors = [x for s in todo for _, c in s.parts if isinstance(c, Deferred) for x in c.tensors]
        host = iter(to_host(tensors)) if tensors else iter(())
        for s in todo:
            values, measured, tables = {}, {}, {}
            # the hooks saw ∂(scale·L)/∂h: divide the backward's loss scale out (the parameter quantities
            # of the twins are weights and updates, which carry no scale)
            backward_scale = s.scaler.resolve().backward if s.scaler is not None else 1.0
            for r, c in s.parts:
                if isinstance(c, Deferred):
                    c = c.finish([next(host) for _ in c.tensors])
                if not isinstance(c, Contribution):
                    continue
                for q, v in c.layers.items():
                    values[q] = np.asarray(v, dtype=np.float64)
                    if backward_scale != 1.0 and r.norm_of.get(q) == "output_grad":
                        values[q] = values[q] / backward_scale
                    m = c.measured.get(q)
                    measured[q] = ~np.isnan(values[q]) if m is None else np.asarray(m, dtype=bool)
                tables.update(c.tables)
            s.done = (values, measured, tables)
            s.parts = []  # the device tensors are no longer needed
        return {s.t: s.done for s in items}

    def flight(self, steps: Sequence[int], n_layers: int) -> tuple[dict, dict]:
        """``(quantities, tables)`` of a :class:`~gradprobe.trace.FlightRecord` over ``steps`` (NaN where a
        step is no longer in the ring or a value was not measured)."""
        recs = self.records(steps)
        names: list[str] = []
        for t in steps:
            for q in recs.get(t, ({}, {}, {}))[0]:
                if q not in names:
                    names.append(q)
        quantities = {}
        for q in names:
            rows = []
            for t in steps:
                r = recs.get(t)
                if r is None or q not in r[0]:
                    rows.append((np.nan,) * n_layers)
                    continue
                v = np.where(r[1][q], r[0][q], np.nan)
                rows.append(tuple(float(x) for x in v))
            quantities[q] = tuple(rows)
        return quantities, _tables([recs.get(t, ({}, {}, {}))[2] for t in steps])

    def nbytes(self) -> dict[str, int]:
        """Device bytes held now: ``"ring"`` (the twins' pending numbers of the steps in the ring, each
        storage counted once) and ``"snapshot"`` (the update-ratio twin's copy of the parameters)."""
        seen, ring = set(), 0
        for s in self._ring:
            for _, c in s.parts:
                if isinstance(c, Deferred):
                    for x in c.tensors:
                        st = x.untyped_storage()
                        if st.data_ptr() not in seen:
                            seen.add(st.data_ptr())
                            ring += st.nbytes()
        snap = 0
        if any(type(r) is WeightRecorder and r.track_updates for r in self._installed):
            snap = sum(p.numel() * p.element_size() for p in self._tracked if p.is_floating_point() or p.is_complex())
        return {"ring": ring, "snapshot": snap}


def _tables(per_step: list[dict]) -> dict[str, FlightTable]:
    """The steps' tables as :class:`FlightTable` s: sites (site, kind) in first-seen order, every dense
    one-dimensional numeric column, NaN where a step did not have the site."""
    out = {}
    names: list[str] = []
    for tabs in per_step:
        for k in tabs:
            if k not in names:
                names.append(k)
    for k in names:
        sites: list[tuple[str, str]] = []
        cols: list[str] = []
        for tabs in per_step:
            t: Table | None = tabs.get(k)
            if t is None:
                continue
            for key in zip(t.sites, t.kinds):
                if key not in sites:
                    sites.append(key)
            for c, v in t.columns.items():
                if c not in cols and c not in t.transient and not isinstance(v, tuple) and np.asarray(v).ndim == 1 \
                        and np.issubdtype(np.asarray(v).dtype, np.number):
                    cols.append(c)
        pos = {key: j for j, key in enumerate(sites)}
        columns = {}
        for c in cols:
            grid = np.full((len(per_step), len(sites)), np.nan)
            for i, tabs in enumerate(per_step):
                t = tabs.get(k)
                if t is None or c not in t.columns or isinstance(t.columns[c], tuple):
                    continue
                v = np.asarray(t.columns[c], dtype=np.float64)
                for key, x in zip(zip(t.sites, t.kinds), v):
                    grid[i, pos[key]] = x
            columns[c] = tuple(tuple(float(x) for x in row) for row in grid)
        out[k] = FlightTable(tuple(s for s, _ in sites), tuple(kd for _, kd in sites), columns)
    return out
