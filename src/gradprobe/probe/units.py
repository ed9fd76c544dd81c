"""Unit statistics of activation modules: saturated sigmoid/tanh units and dead ReLU units.

Recorded on the outputs of activation *modules* (``nn.Sigmoid``, ``nn.Tanh``, ``nn.Hardtanh``,
``nn.ReLU``, ``nn.ReLU6``); activations called as functions inside ``forward`` are invisible.

* A unit is *saturated* on a sample when its local derivative is below ``saturation`` times its
  largest possible value: ``σ'(a)/σ'(0) = 4·s(1−s) < saturation`` for sigmoid (s the output),
  ``1 − t² < saturation`` for tanh, and output at a bound for hard-tanh/ReLU6 upper bound.
  ``saturated_fraction`` is the fraction of (sample, unit) entries saturated (where σ(·) is close to 0
  or 1, σ'(·) is close to 0; Glorot & Bengio 2010 observe sigmoid top layers stuck at 0).
* A ReLU unit is *dead* on a batch when its output is 0 for every sample (and every position);
  ``dead_fraction`` is the fraction of such units ("dying ReLUs": Maas, Hannun & Ng 2013; Lu et al. 2019).

Units are dim 1 for 2-D, 4-D and 5-D outputs (features, conv channels) and the last dim for 3-D
outputs (sequence models, ``(B, T, F)``).
"""
from __future__ import annotations

import math
from time import perf_counter

import numpy as np
import torch
from torch import nn

from gradprobe.probe.owned import ForwardHooks
from gradprobe.probe.recorder import Context, Contribution, Deferred, Recorder, clock, eager_hook, standalone_call
from gradprobe.trace import Table, UnitStats

__all__ = ["UnitRecorder", "UnitStats", "SATURATING_KINDS", "RECTIFIER_KINDS", "PER_UNIT_COLUMNS", "is_per_unit",
           "combine_unit_tables"]

_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor

SATURATING_KINDS = (nn.Sigmoid, nn.Tanh, nn.Hardtanh)
RECTIFIER_KINDS = (nn.ReLU, nn.ReLU6)


def _unit_dim(t: torch.Tensor) -> int:
    return t.dim() - 1 if t.dim() == 3 else (1 if t.dim() >= 2 else 0)


def saturated_count(module: nn.Module, out: torch.Tensor, saturation: float) -> torch.Tensor:
    """0-d tensor: how many entries of ``out`` have a local derivative below ``saturation``·max.

    Written as a distance from the centre (one subtraction, one comparison) rather than evaluating
    φ' elementwise: sigmoid ``4s(1−s) < ε ⇔ |s − ½| > ½√(1−ε)``; tanh ``1 − t² < ε ⇔ |t| > √(1−ε)``.
    """
    if isinstance(module, nn.Sigmoid):
        flat = (out - 0.5).abs_() > 0.5 * math.sqrt(1.0 - saturation)
    elif isinstance(module, nn.Tanh):
        flat = out.abs() > math.sqrt(1.0 - saturation)
    elif isinstance(module, nn.Hardtanh):  # includes ReLU6: flat outside [min_val, max_val]
        flat = (out <= module.min_val) | (out >= module.max_val)
    else:
        raise TypeError(type(module).__name__)
    return flat.sum()


def unit_peaks(out: torch.Tensor) -> torch.Tensor:
    """``(units,)``: the largest output of every unit over every sample and position (max over every dim
    but the unit dim; a NaN entry makes its unit's peak NaN)."""
    if out.dim() == 2:  # (B, F): the common case, no tuple building
        return out.amax(0)
    d = _unit_dim(out)
    others = tuple(i for i in range(out.dim()) if i != d)
    # (0-d and 1-D outputs: a copy, so that an in-place op after the hook does not change the peak)
    return out.amax(dim=others) if others else out.reshape(-1).clone()


def dead_count(out: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(0-d tensor: units whose output is ≤ 0 on every sample and position, number of units).

    One reduction (max over every dim but the unit dim, :func:`unit_peaks`) and one comparison.
    """
    peak = unit_peaks(out)
    return (peak <= 0).sum(), peak.numel()


#: pending peaks per recorder before they are counted (bounds memory without a step)
_FOLD_AT = 1024


def _dead_from_peaks(peaks: list[torch.Tensor]) -> torch.Tensor:
    """``(len(peaks),)`` int64: units with peak ≤ 0 in each call, on the first peak's device.

    ``dead_count`` of every call at once: the hook only takes the peak (the reduction that must see the
    output as the call left it); comparing and summing per call were two more small kernels each, about
    as costly as the peak itself on a 256-wide layer. Peaks of one size (the common case) are stacked
    and counted in one comparison and one sum."""
    dev = peaks[0].device
    n = peaks[0].numel()
    if all(p.numel() == n and p.device == dev for p in peaks):
        return (torch.stack(peaks) <= 0).sum(1)
    return torch.stack([(p <= 0).sum().to(dev) for p in peaks])


def _dead_masks(peaks: list[torch.Tensor]) -> torch.Tensor:
    """``(Σ units,)`` bool: every unit of every call whose peak is ≤ 0 (the calls concatenated in order)."""
    dev = peaks[0].device
    n = peaks[0].numel()
    if all(p.numel() == n and p.device == dev for p in peaks):
        return (torch.stack(peaks) <= 0).reshape(-1)
    return torch.cat([(p <= 0).reshape(-1).to(dev) for p in peaks])


def _stats(names, kinds, counts: np.ndarray, totals: np.ndarray, n_units) -> UnitStats:
    """The fractions of ``(sites, 2)`` counts over totals (saturated entries, dead units), NaN where no total."""
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(totals > 0, counts / totals, np.nan)
    return UnitStats(tuple(names), tuple(kinds), frac[:, 0].copy(), frac[:, 1].copy(), np.asarray(n_units))


#: the transient columns of a ``per_unit`` units table (``UnitRecorder(per_unit=True)``): the ``(sites, 2)``
#: saturated / dead counts and totals, and each site's per-unit dead flags (a tuple of bool arrays, or None)
PER_UNIT_COLUMNS = ("unit_counts", "unit_totals", "dead_flags")


def is_per_unit(table: Table) -> bool:
    """Whether ``table`` is a units table with the per-unit columns (:data:`PER_UNIT_COLUMNS`), which
    :func:`combine_unit_tables` can combine over data-parallel ranks."""
    return all(c in table.columns for c in PER_UNIT_COLUMNS)


def combine_unit_tables(tables: list[Table]) -> Table | None:
    """The ``"units"`` table of the global batch from the tables of data-parallel ranks (each rank's own
    samples, made with ``UnitRecorder(per_unit=True)``), or ``None`` when they do not allow it exactly (a
    table without the per-unit columns, different sites or calls).

    Saturation counts (sample, unit) entries: the global count and total are the sums over the ranks. A unit
    is dead on a call over the global batch iff it is dead on that call on every rank (its peak over all the
    samples is the largest of the ranks' peaks): the AND of the ranks' flags, counted; the total (units ×
    calls) is every rank's. The fractions are then those of one process on the global batch, bit for bit
    (integer counts in float64).
    """
    first = tables[0]
    if any(not is_per_unit(t) or t.sites != first.sites or t.kinds != first.kinds
           for t in tables):
        return None
    flags = [t.columns["dead_flags"] for t in tables]
    totals = [np.asarray(t.columns["unit_totals"]) for t in tables]
    if any(not np.array_equal(tt[:, 1], totals[0][:, 1]) for tt in totals):
        return None
    counts = np.zeros((len(first.sites), 2))
    total = np.zeros((len(first.sites), 2))
    total[:, 1] = totals[0][:, 1]
    joined: list = []
    for k in range(len(first.sites)):
        site = [f[k] for f in flags]
        if any(a is None for a in site):
            if any(a is not None for a in site):
                return None
            joined.append(None)
            continue
        if len({np.asarray(a).shape for a in site}) != 1:
            return None
        both = np.logical_and.reduce([np.asarray(a, dtype=bool) for a in site])
        counts[k, 1] = float(both.sum())
        joined.append(both)
    for t, tt in zip(tables, totals):
        counts[:, 0] += np.asarray(t.columns["unit_counts"])[:, 0]
        total[:, 0] += tt[:, 0]
    st = _stats(first.sites, first.kinds, counts, total, first.column("n_units"))
    t = st.to_table()
    return Table(t.sites, t.kinds, {**t.columns, "unit_counts": counts, "unit_totals": total,
                                    "dead_flags": tuple(joined)}, frozenset(PER_UNIT_COLUMNS))


class UnitRecorder(Recorder):
    """Forward hooks on activation modules: a :class:`~gradprobe.probe.Recorder` of the ``"units"`` table
    (one row per activation module in forward order), or used standalone.

    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
    >>> with torch.no_grad():
    ...     _ = net[0].bias.fill_(-100.0)
    >>> rec = UnitRecorder(net).install()
    >>> _ = net(torch.randn(16, 4))
    >>> rec.stats().dead_fraction.tolist()
    [1.0]
    >>> rec.remove()
    """

    name = "units"
    idle_reset = False  # its hooks record nothing while disarmed

    def __init__(self, model: nn.Module | None = None, saturation: float = 0.05, per_unit: bool = False):
        super().__init__()
        self.saturation = float(saturation)
        #: keep every rectifier call's per-unit dead flags (not only their count) until ``finish``, and put the
        #: table's counts in transient columns: what :func:`combine_unit_tables` needs to combine ranks exactly
        self.per_unit = bool(per_unit)
        self.model = model
        self.modules: list = []
        self._hooks = ForwardHooks()  # on the modules only while armed (see ForwardHooks.set)
        # one entry per (call, statistic): module index, 0 = saturated / 1 = dead, total; the saturated
        # counts are 0-d tensors, the dead ones come from per-unit peaks (see _dead_from_peaks)
        self._sat_idx: list[int] = []
        self._sat_count: list[torch.Tensor] = []
        self._sat_total: list[int] = []
        self._dead_idx: list[int] = []
        self._dead_total: list[int] = []
        self._peaks: list[torch.Tensor] = []  # (units,) max over samples/positions, per call, not yet counted
        self._dead_done: list[torch.Tensor] = []  # counts of peaks already reduced (bounded memory)
        self._first: dict[int, int] = {}
        self._units: dict[int, int] = {}

    #: on its recorded steps its table is its flight twin's (the twin sits out; not with ``per_unit`` twins,
    #: whose per-unit flags the session's fractions do not hold)
    flight_reuse = True

    def flight_twin(self) -> UnitRecorder:
        """The full flight recorder's twin: the ``"units"`` table from its own hooks, at the same saturation
        threshold (:mod:`gradprobe.probe.flight` sets its ``per_unit`` for a data-parallel run)."""
        return UnitRecorder(saturation=self.saturation)

    def config(self) -> dict:
        return {"saturation": self.saturation}

    def install(self, ctx: Context | None = None) -> UnitRecorder:
        model = ctx.model if ctx is not None else self.model
        if model is None:
            raise TypeError("UnitRecorder.install() needs a model: UnitRecorder(model) or a session context")
        self.modules = [
            (name, m) for name, m in model.named_modules() if isinstance(m, SATURATING_KINDS + RECTIFIER_KINDS)
        ]
        for i, (_, m) in enumerate(self.modules):
            self._hooks.add(m, self._hook(i))
        self._hooks.set(self.armed)
        return self

    def arm(self, on: bool) -> None:
        super().arm(on)
        if len(self._hooks):  # installed and not removed
            self._hooks.set(on)

    def _hook(self, i: int):
        module = self.modules[i][1]
        saturating = isinstance(module, SATURATING_KINDS)
        rectifier = isinstance(module, RECTIFIER_KINDS)

        def hook(mod, args, out):
            if not self.armed or not torch.is_grad_enabled():
                return None
            compiling = torch.compiler.is_compiling()
            if (not isinstance(out, torch.Tensor) or not out.is_floating_point() or out.is_nested
                    or out.layout != torch.strided or out.is_meta or (not compiling and _is_wrapped(out))):
                return None  # (nested, sparse, meta outputs and torch.func calls: no unit statistics)
            start = 0.0 if compiling else perf_counter()  # (clock(), without asking twice)
            o = out.detach() if out.requires_grad else out
            try:
                # taken now, while the output holds this call's values (a later in-place op may change it)
                sat = saturated_count(module, o, self.saturation) if saturating else None
                peak = unit_peaks(o) if rectifier else None
            except Exception:  # noqa: BLE001 - never break the user's forward: this call has no statistics
                self.seconds += clock() - start
                return None
            self._first.setdefault(i, len(self._first))
            if sat is not None:
                self._sat_idx.append(i)
                self._sat_count.append(sat)
                self._sat_total.append(o.numel())
            if peak is not None:
                self._dead_idx.append(i)
                self._dead_total.append(peak.numel())
                self._peaks.append(peak)
                if len(self._peaks) >= _FOLD_AT:
                    self._dead_done.append(_dead_masks(self._peaks) if self.per_unit else _dead_from_peaks(self._peaks))
                    self._peaks = []
            self._units[i] = o.shape[_unit_dim(o)] if o.dim() else 1
            self.seconds += clock() - start
            return None

        return eager_hook(hook)

    def _counts(self) -> list[torch.Tensor]:
        """The pending counts, saturated entries first, then dead ones (the order of :meth:`_freeze`), as
        1-D tensors: the dead counts of every call in one batched comparison and sum."""
        parts = []
        if self._sat_count:
            dev = self._sat_count[0].device
            parts.append(torch.stack([c.to(dev) for c in self._sat_count]))
        if self.per_unit:  # (stats() of a per_unit recorder: the flags of each call counted)
            masks = self._dead_done + ([_dead_masks(self._peaks)] if self._peaks else [])
            if masks:
                dev = masks[0].device
                flat = torch.cat([m.to(dev) for m in masks])
                parts.append(torch.stack([m.sum() for m in torch.split(flat, self._dead_total)]))
            return parts
        parts += self._dead_done
        if self._peaks:
            parts.append(_dead_from_peaks(self._peaks))
        return parts

    def collect(self, advance=standalone_call) -> Deferred | UnitStats | None:
        """The ``"units"`` table of this step (a :class:`Deferred`); ``None`` if no activation ran.

        Called without arguments (the standalone use of gradprobe 0.1) it returns :meth:`stats`, with a
        DeprecationWarning."""
        if advance is standalone_call:
            standalone_call.warn("UnitRecorder.collect()", "UnitRecorder.stats()")
            return self.stats()
        if not self._first:
            return None
        if self.per_unit:
            return self._collect_per_unit()
        build = self._freeze()
        parts = self._counts()
        if not parts:
            return Contribution(tables={"units": build(None).to_table()})
        dev = parts[0].device
        counts = parts[0] if len(parts) == 1 else torch.cat([c.to(dev) for c in parts])
        return Deferred([counts], lambda host: Contribution(tables={"units": build(host[0]).to_table()}))

    def _collect_per_unit(self) -> Deferred:
        """``per_unit``: the saturated counts (int64, one per saturating call) and the dead flags of every
        unit of every rectifier call (bool, concatenated in call order) on the device; the table's per-site
        counts and totals and each site's flags (in call order) as transient columns."""
        build = self._freeze()
        dev = (self._sat_count or self._peaks or self._dead_done)[0].device
        sat = torch.stack([c.to(dev) for c in self._sat_count]) if self._sat_count else None
        masks = self._dead_done + ([_dead_masks(self._peaks)] if self._peaks else [])
        mask = (masks[0] if len(masks) == 1 else torch.cat([m.to(dev) for m in masks])) if masks else None
        tensors = [x for x in (sat, mask) if x is not None]
        ends = np.cumsum(self._dead_total)[:-1]
        order = sorted(self._first, key=self._first.__getitem__)
        position = {site: k for k, site in enumerate(order)}  # (a dict: order.index per call is quadratic in the sites)
        site_of_call = [position[i] for i in self._dead_idx]

        def finish(host: list[np.ndarray]) -> Contribution:
            it = iter(host)
            sat_h = np.asarray(next(it)).reshape(-1) if sat is not None else np.zeros(0)
            calls = np.split(np.asarray(next(it)).reshape(-1) > 0.5, ends) if mask is not None else []
            counts = np.concatenate([sat_h, [float(c.sum()) for c in calls]])
            stats, sums, totals = build(counts, sums=True)
            flags: list = [None] * len(order)
            for k, c in zip(site_of_call, calls):
                flags[k] = c if flags[k] is None else np.concatenate([flags[k], c])
            t = stats.to_table()
            table = Table(t.sites, t.kinds, {**t.columns, "unit_counts": sums, "unit_totals": totals,
                                             "dead_flags": tuple(flags)}, frozenset(PER_UNIT_COLUMNS))
            return Contribution(tables={"units": table})

        return Deferred(tensors, finish)

    def stats(self) -> UnitStats | None:
        """Stats of the forward passes since the last :meth:`reset` (counts pooled over calls: the
        fraction of all entries / units seen); ``None`` if none ran."""
        if not self._first:
            return None
        parts = self._counts()
        host = torch.cat([c.to("cpu") for c in parts]).double().numpy() if parts else None
        return self._freeze()(host)

    def _freeze(self):
        """A function of the host copy of the counts giving the :class:`UnitStats` of the step as it is now."""
        order = sorted(self._first, key=self._first.__getitem__)
        pos = {i: k for k, i in enumerate(order)}
        rows = np.array([pos[i] for i in self._sat_idx + self._dead_idx], dtype=np.int64)
        what = np.array([0] * len(self._sat_idx) + [1] * len(self._dead_idx), dtype=np.int64)
        total = np.array(self._sat_total + self._dead_total, dtype=float)
        names = tuple(self.modules[i][0] for i in order)
        kinds = tuple(type(self.modules[i][1]).__name__ for i in order)
        n_units = np.array([self._units[i] for i in order])

        def build(host, sums: bool = False):
            counts = np.zeros((len(order), 2))
            totals = np.zeros((len(order), 2))
            if host is not None:
                np.add.at(counts, (rows, what), np.asarray(host, dtype=np.float64).reshape(-1))
                np.add.at(totals, (rows, what), total)
            stats = _stats(names, kinds, counts, totals, n_units)
            return (stats, counts, totals) if sums else stats

        return build

    def reset(self) -> None:
        for buf in (self._sat_idx, self._sat_count, self._sat_total, self._dead_idx, self._dead_total):
            buf.clear()
        self._peaks = []
        self._dead_done = []
        self._first.clear()
        self._units.clear()

    def remove(self) -> None:
        self._hooks.remove()
        self.reset()
