"""The full flight recorder: every step's full record, for the last few steps, in a ring on the device.

A session's recorders record at the schedule's cadence (with an overhead budget the costly ones skip
most steps). When a gradient spike fires, the steps that led up to it are what one wants to see at full
detail; they cannot be had afterwards. :class:`FullFlight` (``SpikeWatch(full_flight=True)``,
``Probe(model, spikes="full")``) runs a private *twin* of each recorder of the session on every
step:

=====================  ===========================================================================
session recorder       its twin records every step
=====================  ===========================================================================
``WeightRecorder``     ``weight_norm`` ‖θ_l‖₂ and (if the session tracks updates) ``update_ratio``
                       ‖θ_l(t) − θ_l(t−1)‖₂ / ‖θ_l(t−1)‖₂ over *that one step* (its own snapshot)
``OutputRecorder``     ``output_grad_norm`` ‖∂L/∂h_l‖₂ and ``activation_norm`` ‖h_l‖₂ (own hooks)
``UnitRecorder``       the ``"units"`` table: ``saturated_fraction``, ``dead_fraction`` (own hooks)
``TemporalRecorder``   the BPTT profiles ``‖∂E/∂h_k‖₂`` (and ``‖∂E/∂c_k‖₂``) of every recurrent layer
                       and time step ``k`` (Pascanu et al. 2013;
                       :class:`~gradprobe.probe.temporal.TemporalFlightTwin`), in the record's
                       ``profiles["temporal.h"][series]``
a user's recorder      what its :meth:`~gradprobe.probe.Recorder.flight_twin` returns (see below)
=====================  ===========================================================================

(the parameter-gradient norms ‖∇θ_l‖ are the watch's own). Every recorder, built-in or not, gives its
twin through :meth:`~gradprobe.probe.Recorder.flight_twin` (the built-in ones: those above). A twin has
its own hooks and its own state (its own parameter snapshot, its own record of the layers' forward and
backward order), so the session's records are exactly what they are without the flight recorder: same
steps, same numbers, same layer order, and the session's update ratio still spans its own recorded steps.
The twins' numbers stay device tensors (each step's :class:`~gradprobe.probe.Deferred`); the host copies
them only when a spike is found, for the steps of its flight record. With a loss scaler
(``Probe(scaler=...)``) the backward's scale is divided out of every quantity a twin declares an
``"output_grad"`` norm (:attr:`~gradprobe.probe.Recorder.norm_of`), as in the session's records.

**A user's recorder** provides its twin by overriding :meth:`Recorder.flight_twin` to return a fresh,
uninstalled recorder of the same quantities (often ``type(self)(...)`` with the same settings); the
flight installs it with its own :class:`~gradprobe.probe.Context` (``deferred=True``: its ``finish`` runs
when a spike is found, steps later) and arms it every step. Its per-layer quantities go to the record's
``quantities``, its tables' one-dimensional numeric columns to ``tables`` and its per-site array columns
(a tuple of 1-D float arrays, one per site) to ``profiles``. A recorder without a twin (the default
``None``) is named in the record's ``not_recorded``, never silently missing.

>>> import numpy as np, torch
>>> from torch import nn
>>> from gradprobe.probe import Contribution, Recorder, Session
>>> class MaxAbsGrad(Recorder):  # the largest |gradient| entry per layer
...     name = "max_abs_grad"
...     def install(self, ctx):
...         self.layers = ctx.layers
...     def collect(self, advance):
...         return Contribution(layers={"max_abs_grad": np.array(
...             [max(p.grad.abs().max().item() for p in l.params) for l in self.layers])})
...     def flight_twin(self):
...         return MaxAbsGrad()
>>> torch.manual_seed(0) and None
>>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
>>> with Session(net, recorders=[MaxAbsGrad()], spikes="full", every=10) as s:
...     for step in range(40):
...         net.zero_grad()
...         (net(torch.randn(16, 4)).pow(2).mean() * (1000.0 if step == 30 else 1.0)).backward()  # a spike at 30
...         if step == 30:
...             peak = max(p.grad.abs().max().item() for p in net[2].parameters())
...         _ = s.step()
...     flight = s.spike_log().events[0].flight
>>> flight.steps[-1], flight.quantities["max_abs_grad"][-1][1] == peak, flight.not_recorded
(30, True, ())

**Reuse.** On a step the schedule arms a session recorder whose twin would measure exactly the same
(``OutputRecorder``, ``UnitRecorder``, ``TemporalRecorder``, and a user's recorder whose class sets
``flight_reuse = True``: its ``Deferred.finish`` must then be a pure function of the host copies), the
flight takes that recorder's own contribution of the step (the same device tensors and ``finish``: bit for
bit the session's numbers) and its twin sits the step out (its hooks are off the model for it). The
weights twin's update ratio spans one step, the session's its own cadence: the weights twin sits out only
the steps where the session records the weights and recorded them the step before (a session recording
them every step: every step), and when it runs again it continues from the session's snapshot of the step
before. ``SpikeWatch(flight_reuse=False)`` runs every twin on every step (measured against reuse in
``BENCHMARKS.md``); ``flight_reuse=["outputs", ...]`` lets only the named twins reuse.

**Cost of the temporal twin.** On a fused ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` the twin needs the
unrolled replica on every step, where the session's temporal recorder pays it only on its recorded steps:
on the ``nn.LSTM(32, 128)`` of ``BENCHMARKS.md`` (T = 100) that is about 2.5× the step, as much as
recording the temporal profile on every step. Leave it out with ``SpikeWatch(full_flight=["weights",
"outputs", "units"])``.

**Data parallelism.** The twins' hook quantities are this rank's own samples. When the spike decision is
collective (a guard, ``on_spike``: every rank is in the guard's collective at the spike step), the ranks'
flights are combined then (one ``all_gather_object`` per guarded spike step, :func:`combine_ranks`):
``‖∂L/∂h_l‖ = √(Σ_r ‖∂L_r/∂h_l^(r)‖²) / W`` (and the temporal profiles likewise, per time step), ``‖h_l‖ =
√(Σ_r ‖h_l^(r)‖²)``, for ``L = (1/W) Σ_r L_r`` the loss whose gradient DDP's averaged gradients are; the
weight quantities are the same on every rank; the units table is that of the global batch, exactly (its
saturated entries summed over the ranks, a unit dead iff dead on every rank: for that the units twins of
such a run keep every unit's dead flag, not only their count, and run on every step, as the session's units
tables hold only fractions; :func:`~gradprobe.probe.units.combine_unit_tables`). Without a guard each
rank's host decides alone when to look, so nothing is combined. Either way the record says what it holds:
``FlightRecord.world_size``, ``rank`` and ``rank_local`` (the keys that hold this rank's own samples).
With ``Probe(distributed=False)`` (the session does not combine its records) the flight combines nothing
either and lists every key, the weight quantities too, as the rank's own.

**Memory bound.** The ring holds ``K = N + check_every − 1`` steps (the host looks at the flags every
``check_every`` steps, and a spike's ``N`` steps must still be in the ring then). Per step the twins
keep on the device ``P_w + P_u`` float64 norms (weights and updates of the ``P_w`` parameter tensors,
``P_u`` of them tracked; the previous step's weight norms are a view of the step before), ``2·C``
output-hook norms in the outputs' dtype (``C`` hooked layer calls: ``L`` for a model that calls each
layer once) and ``S`` int64 unit counts (one per saturating or rectifying activation call), in four
small tensors::

    ring = K · (8·(P_w + P_u) + 2·C·itemsize + 8·S) + 8·(P_w + P_u)  bytes

(a temporal twin adds ``8·Σ_series T·(1 + has_c)`` bytes per step; on a step it reuses the session's
temporal recorder, that recorder's per-sequence norms, ``B`` times more; in a guarded data-parallel run
the units twins keep one bool per unit of each rectifying call instead of its int64 count: ``8·S`` becomes
``8·S_sat + U``, ``S_sat`` saturating calls and ``U`` the units of the rectifying calls, for that MLP 4,864
instead of 152 bytes per step, a ring of 357,472 bytes) and the update-ratio twin's snapshot, one copy of every tracked floating parameter (``Σ numel ·
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

import torch

from gradprobe.errors import ConfigError
from gradprobe.functional.transfer import to_host
from gradprobe.probe.amp import divide_scale
from gradprobe.probe.params import GradRecorder, WeightRecorder
from gradprobe.probe.recorder import Context, Contribution, Deferred, LayerOrder, Recorder
from gradprobe.probe.units import PER_UNIT_COLUMNS, UnitRecorder, combine_unit_tables, is_per_unit
from gradprobe.trace import FlightTable, Table

__all__ = ["FullFlight", "flight_twins", "combine_ranks"]


def flight_twins(recorders: Sequence[Recorder]) -> tuple[list[tuple[Recorder, Recorder]], list[str]]:
    """``([(session recorder, its fresh uninstalled twin)], [names of recorders without one])``: what each
    recorder's :meth:`~gradprobe.probe.Recorder.flight_twin` returns (the built-in recorders' twins: the
    table in the module docstring). Unscheduled helpers and the gradient recorder (whose ‖∇θ_l‖ the watch
    keeps itself) need none and are not listed."""
    pairs, missing = [], []
    for r in recorders:
        if not r.scheduled or type(r) is GradRecorder:
            continue
        twin = r.flight_twin()
        if twin is None:
            missing.append(r.name)
            continue
        if not isinstance(twin, Recorder):
            raise ConfigError(f"recorder {r.name!r}: flight_twin() must return a gradprobe.probe.Recorder or None; "
                              f"got {type(twin).__name__}")
        if twin.name != r.name:
            twin.name = r.name  # the flight lists a twin under its recorder's name
        pairs.append((r, twin))
    return pairs, missing


class _Step:
    """One step in the ring: its index and each twin's contribution (finished once, on demand)."""

    __slots__ = ("t", "parts", "done", "scaler")

    def __init__(self, t: int, parts: list, scaler=None):
        self.t, self.parts, self.done, self.scaler = t, parts, None, scaler


class FullFlight:
    """The twins of a session's recorders, armed every step (but for the steps where the session's own
    recorder records and its numbers are reused), and the ring of their last ``capacity`` steps.

    ``pairs``: ``(session recorder, twin)`` (:func:`flight_twins`); ``not_recorded``: the names of the
    recorders without a twin; ``reuse``: on a step a session recorder records, take its contribution
    instead of arming its twin (for the recorders whose twin would measure exactly the same)."""

    def __init__(self, pairs: Sequence[tuple[Recorder, Recorder]], capacity: int, not_recorded: Sequence[str] = (),
                 reuse: bool | Sequence[str] = True, per_unit: bool = False):
        # per_unit: the units twins keep every unit's dead flag, so that the ranks' tables can be combined
        # exactly (combine_ranks); the session's units tables hold only fractions: not reused then
        for _, twin in pairs:
            if isinstance(twin, UnitRecorder):
                twin.per_unit = bool(per_unit)
        self.pairs = [(src, twin, bool(src.flight_reuse)
                       and (reuse if isinstance(reuse, bool) else twin.name in reuse)
                       and not (per_unit and isinstance(twin, UnitRecorder)))
                      for src, twin in pairs]
        for src, _, reuse in self.pairs:
            if reuse and isinstance(src, WeightRecorder):
                src.late_finish = True  # its contributions are finished again here, after the optimizer step
        self.twins = [twin for _, twin, _ in self.pairs]
        self.not_recorded = tuple(not_recorded)
        self.capacity = int(capacity)
        self._ring: deque[_Step] = deque(maxlen=self.capacity)
        self._installed: list[Recorder] = []
        self._tracked: list = []
        self._order: LayerOrder | None = None
        #: steps each twin ran itself and steps it took the session recorder's numbers (``{name: count}``)
        self.ran: dict[str, int] = {}
        self.reused: dict[str, int] = {}
        self._next = 0  # the coming step
        self._last: dict[int, int] = {}  # id(session recorder) -> the last step it contributed

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.twins]

    def install(self, ctx: Context) -> None:
        # deferred: the twins' numbers are finished steps later, so they keep no strong reference to a .grad;
        # their own layer order: the session's forward and backward order stay what its own hooks saw
        self._order = LayerOrder(len(ctx.layers))
        own = Context(ctx.model, ctx.layers, self._order, deferred=True)
        try:
            for src, r, reuse in self.pairs:
                r.install(own)
                self._installed.append(r)
                r.arm(not self._sits_out(src, r, reuse))
        except BaseException:
            self.remove()
            raise
        self._tracked = [p for layer in ctx.layers for p in layer.params]

    def _sits_out(self, src: Recorder, twin: Recorder, reuse: bool) -> bool:
        """Whether ``twin`` sits the coming step out, its session recorder ``src`` measuring the same: ``src``
        records it, and for the weights, its update ratio spans that one step (it recorded the step before,
        or neither has a snapshot yet: both ratios are then unmeasured)."""
        if not (reuse and src.armed):
            return False
        if isinstance(src, WeightRecorder) and src.track_updates:
            last = self._last.get(id(src))
            return last == self._next - 1 or (last is None and not twin.has_snapshot)
        return True

    def follow(self) -> None:
        """After the session armed its recorders for the coming step: arm each reusing twin exactly when
        its session recorder's numbers of that step are what the twin would measure."""
        for src, r, reuse in self.pairs:
            if reuse and r in self._installed:
                want = not self._sits_out(src, r, reuse)
                if want != r.armed:
                    if want and isinstance(r, WeightRecorder):
                        r.continue_from(src)  # (the session recorded the step before: its snapshot is of it)
                    if want and not r.idle_reset:
                        r.reset()
                        r.seconds = 0.0
                    r.arm(want)

    def take(self, t: int, scaler=None, parts=()) -> None:
        """Collect this step from every twin (device tensors, no host copy) into the ring (``scaler``: the
        step's :class:`~gradprobe.probe.amp.ScalerSnapshot`, whose loss scale is divided out of the hook
        gradients' norms when the step is finished; ``parts``: the session's ``(recorder, contribution)``
        of this step, reused for the twins that sit it out)."""
        own = {id(r): c for r, c in parts}
        out = []
        self._next = t + 1
        for src, r, reuse in self.pairs:
            if id(src) in own:
                self._last[id(src)] = t
            if r.armed:
                c = r.collect(True)
                self.ran[r.name] = self.ran.get(r.name, 0) + 1
            elif reuse and id(src) in own:
                c = own[id(src)]  # the same device tensors and finish (a recorder's numbers are not changed after
                # collect; a weights recorder's overflow re-read checks the parameter's version: late_finish)
                self.reused[r.name] = self.reused.get(r.name, 0) + 1
            else:
                continue
            if c is not None:
                out.append((r, c))
        self._ring.append(_Step(t, out, scaler))

    def reset(self) -> None:
        for r in self._installed:
            if r.armed or r.idle_reset:
                r.reset()
                r.seconds = 0.0
        if self._order is not None:
            self._order.reset()

    def remove(self) -> None:
        for r in reversed(self._installed):
            r.remove()
        for src, _, _ in self.pairs:
            vars(src).pop("late_finish", None)  # the session's recorders as they were
        self._installed = []
        self._ring.clear()

    def clear(self) -> None:
        self._ring.clear()

    # ------------------------------------------------------------------ host side
    def kinds(self) -> dict[str, str]:
        """What each key of the flight is (``{key: kind}``): a kind of :data:`~gradprobe.probe.recorder.NORM_KINDS`
        the twin declares, or ``"param"`` for the weight quantities (the same on every data-parallel rank)."""
        out = {}
        for r in self.twins:
            if isinstance(r, WeightRecorder):
                out.update({"weight_norm": "param", "update_ratio": "param"})
            out.update(r.norm_of)
        return out

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
            # the hooks saw ∂(scale·L)/∂h: divide the backward's loss scale out of what a twin declares an
            # output gradient, and the scale still in .grad out of parameter gradients (weights and updates
            # carry none)
            scale = s.scaler.resolve() if s.scaler is not None else None
            for r, c in s.parts:
                if isinstance(c, Deferred):
                    c = c.finish([next(host) for _ in c.tensors])
                if not isinstance(c, Contribution):
                    continue
                part = {q: np.asarray(v, dtype=np.float64) for q, v in c.layers.items()}
                part_tables = dict(c.tables)
                if scale is not None:
                    divide_scale(scale, r.norm_of, part, part_tables)
                for q, v in part.items():
                    values[q] = v
                    m = c.measured.get(q)
                    measured[q] = ~np.isnan(v) if m is None else np.asarray(m, dtype=bool)
                tables.update(part_tables)
            s.done = (values, measured, tables)
            s.parts = []  # the device tensors are no longer needed
        return {s.t: s.done for s in items}

    def flight(self, steps: Sequence[int], n_layers: int, group=None, world_size: int = 1) -> dict:
        """The full flight record's fields over ``steps``: ``quantities``, ``tables``, ``profiles`` (NaN or
        ``()`` where a step is no longer in the ring or a value was not measured) and ``rank_local``.

        ``world_size > 1``: every rank of ``group`` calls this together (one ``all_gather_object``), and the
        quantities of the global batch are combined from the ranks' own (:func:`combine_ranks`); otherwise,
        with data parallelism, the hook quantities are this rank's own (listed in ``rank_local``)."""
        recs = self.records(steps)
        per_step = [recs.get(t) for t in steps]
        kinds = self.kinds()
        rank_local: list[str] = []
        if world_size > 1:
            per_step, rank_local = combine_ranks(per_step, kinds, group, world_size)
        names = list(dict.fromkeys(q for r in per_step if r is not None for q in r[0]))  # first-seen order
        quantities = {}
        for q in names:
            rows = []
            for r in per_step:
                if r is None or q not in r[0]:
                    rows.append((np.nan,) * n_layers)
                    continue
                v = np.where(r[1][q], r[0][q], np.nan)
                rows.append(tuple(float(x) for x in v))
            quantities[q] = tuple(rows)
        tables = [r[2] if r is not None else {} for r in per_step]
        return {"quantities": quantities, "tables": _tables(tables), "profiles": _profiles(tables),
                "rank_local": tuple(rank_local)}

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


def combine_ranks(per_step: list, kinds: dict, group=None, world_size: int = 2) -> tuple[list, list[str]]:
    """The flight's steps of the global batch from every rank's own (one ``all_gather_object``; every rank
    of ``group`` calls it with the same steps).

    With ``W`` ranks, rank ``r`` back-propagating the loss ``L_r`` of its own samples and DDP averaging the
    gradients (the optimizer sees the gradient of ``L = (1/W) Σ_r L_r``), a quantity that is the norm over
    the rank's rows of a batch-split tensor combines as

    * ``"output_grad"`` (``‖∂L/∂h_l‖``, the temporal profiles ``‖∂E/∂h_k‖``): ``√(Σ_r v_r²) / W``;
    * ``"activation"`` (``‖h_l‖``): ``√(Σ_r v_r²)``;

    (with each ``L_r`` the mean over ``n`` local samples, the numbers of one process training on the global
    batch of ``W·n`` samples with the mean loss; ranks that did not measure a value add nothing). Weight
    quantities (``"param"``) are the same on every rank and are kept. A units table with the per-unit
    columns (``UnitRecorder(per_unit=True)``) is combined by :func:`~gradprobe.probe.units.combine_unit_tables`
    (a unit is dead over the global batch iff it is dead on every rank). Everything else (a units table of
    fractions only, which do not tell which units are dead; undeclared quantities; profiles whose lengths
    differ over the ranks) stays this rank's own: its keys are returned as ``rank_local``.
    """
    dist = torch.distributed
    combinable = {q for q, k in kinds.items() if k in ("output_grad", "activation")}
    mine = []
    for r in per_step:
        if r is None:
            mine.append(None)
            continue
        values, measured, tables = r
        layer = {q: (values[q], measured[q]) for q in values if q in combinable}
        prof = {}
        for name, tab in tables.items():
            for col, v in tab.columns.items():
                key = f"{name}.{col}"
                if key in combinable and isinstance(v, tuple):
                    prof[key] = {site: (None if a is None else np.asarray(a, dtype=np.float64)) for site, a in zip(tab.sites, v)}
        units = {name: (tab.sites, tab.kinds, dict(tab.columns)) for name, tab in tables.items()
                 if is_per_unit(tab)}
        mine.append((layer, prof, units))
    everyone: list = [None] * world_size
    dist.all_gather_object(everyone, mine, group=group)
    local: set[str] = set()
    out = []
    for i, r in enumerate(per_step):
        if r is None:
            out.append(None)
            continue
        values, measured, tables = dict(r[0]), dict(r[1]), dict(r[2])
        ranks = [e[i] for e in everyone if e[i] is not None]
        for q in list(values):
            kind = kinds.get(q)
            if kind == "param":
                continue
            if q not in combinable or any(q not in rk[0] for rk in ranks):
                local.add(q)
                continue
            sq = sum(np.where(rk[0][q][1], rk[0][q][0] ** 2, 0.0) for rk in ranks)
            seen = np.logical_or.reduce([rk[0][q][1] for rk in ranks])
            values[q] = np.sqrt(sq) / (world_size if kind == "output_grad" else 1.0)
            measured[q] = seen
        for name, tab in list(tables.items()):
            if is_per_unit(tab):
                parts = [rk[2].get(name) for rk in ranks]
                both = (combine_unit_tables([Table(*x, frozenset(PER_UNIT_COLUMNS)) for x in parts])
                        if all(x is not None for x in parts) else None)
                if both is None:
                    local.add(name)
                else:
                    tables[name] = both
                continue
            cols = dict(tab.columns)
            for col, v in tab.columns.items():
                key = f"{name}.{col}"
                if not isinstance(v, tuple) or key not in combinable:
                    a = np.asarray(v) if not isinstance(v, tuple) else None
                    if a is not None and a.ndim == 1 and np.issubdtype(a.dtype, np.number) and col not in tab.transient:
                        local.add(name)
                    continue
                combined = []
                for site, a in zip(tab.sites, v):
                    parts = [rk[1].get(key, {}).get(site) for rk in ranks]
                    parts = [p for p in parts if p is not None]
                    if a is None:  # (e.g. no cell state: nothing measured, nothing to combine)
                        combined.append(None)
                        continue
                    if len(parts) != len(ranks) or len({p.shape for p in parts}) != 1:
                        local.add(key)
                        combined.append(a)
                        continue
                    s2 = sum(p ** 2 for p in parts)
                    combined.append(np.sqrt(s2) / (world_size if kinds[key] == "output_grad" else 1.0))
                cols[col] = tuple(combined)
            tables[name] = Table(tab.sites, tab.kinds, cols, tab.transient)
        out.append((values, measured, tables))
    return out, sorted(local)


def local_keys(flight: dict, kinds: dict) -> tuple[str, ...]:
    """The keys of a flight (:meth:`FullFlight.flight`) that hold this rank's own samples when nothing was
    combined: every quantity but the weight ones, every table, every profile."""
    keys = [q for q in flight["quantities"] if kinds.get(q) != "param"]
    return tuple(sorted(keys + list(flight["tables"]) + list(flight["profiles"])))


def _profiles(per_step: list[dict]) -> dict[str, dict[str, tuple]]:
    """Per-site array columns of the steps' tables (a tuple of 1-D float arrays, one per site; e.g. the
    temporal profiles): ``{"table.column": {site: rows}}``, ``()`` where a step did not have the site."""
    keys: list[tuple[str, str]] = []
    for tabs in per_step:
        for name, t in tabs.items():
            for c, v in t.columns.items():
                if c in t.transient or not isinstance(v, tuple) or (name, c) in keys:
                    continue
                if any(a is not None and np.asarray(a).ndim == 1 and np.issubdtype(np.asarray(a).dtype, np.floating)
                       for a in v):
                    keys.append((name, c))
    out = {}
    for name, c in keys:
        sites = list(dict.fromkeys(site for tabs in per_step if (t := tabs.get(name)) is not None and c in t.columns
                                   for site in t.sites))  # first-seen order
        series = {}
        for site in sites:
            rows = []
            for tabs in per_step:
                t = tabs.get(name)
                a = None
                if t is not None and isinstance(t.columns.get(c), tuple) and site in t.sites:
                    a = t.columns[c][t.sites.index(site)]
                rows.append(() if a is None else tuple(float(x) for x in np.asarray(a, dtype=np.float64)))
            series[site] = tuple(rows)
        out[f"{name}.{c}"] = series
    return out


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
        if columns:  # (a table of array columns only is in the profiles)
            out[k] = FlightTable(tuple(s for s, _ in sites), tuple(kd for _, kd in sites), columns)
    return out
