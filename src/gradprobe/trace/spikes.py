"""Gradient spikes during training: the events a spike watch found, and the flight record before each.

The watch (:class:`gradprobe.probe.SpikeWatch`) keeps the per-layer gradient norms, their total and the
loss of every step on the device and compares each step with a robust rolling statistic; what it found
is a :class:`SpikeLog`, saved to the run log as the run-level note ``"spikes"`` (:data:`NOTE_KEY`), so
the diagnosis (verdict ``exploding_in_training``) and the report are rebuilt from the run log alone.

The note, as plain JSON (``SpikeLog.as_dict()``; every key is always present, ``null`` where unknown)::

    {"version": 1,
     "config":  {"window": W, "k": k, "min_jump": r, "min_history": h, "refresh": R, "flight": N,
                 "on_spike": "warn" | "skip" | "raise" | null, "clip": {"source": "threshold" | "clipper" | null,
                 "max_norm": float | null}, ...},            # the watch's settings (SpikeWatch.config())
     "through": step,        # every step up to this one has been checked (events after it are unknown)
     "dropped": n,           # events beyond the watch's max_events (counted, not kept)
     "events": [             # in step order, one per run of flagged steps (see SpikeEvent)
        {"step": s, "last_step": s2, "flagged_steps": n, "kind": "jump" | "non_finite" | "remote",
         "total": {"value": ‖∇θ‖, "median": m, "jump": ‖∇θ‖/m, "z": z, "threshold": t, "spiked": bool},
         "loss":  {...same keys...} | null,
         "layers": [names of the layers that spiked, in backward order],
         "first_layer": name | null, "largest_layer": name | null, "largest_jump": float | null,
         "peak_jump": float, "clipped": bool | null, "max_norm": float | null, "clip_rate": float | null,
         "action": "recorded" | "warned" | "skipped" | "raised", "skipped_steps": n,
         "confirmed": bool,  # an alarm (false: a spike the loss did not confirm, confirm="loss")
         "loss_setback": float | null,  # confirm="loss": (loss − median) / (reference − median)
         "flight": {"steps": [N ints], "layers": [L names], "grad_norm": [N × L], "total": [N],
                    "loss": [N], "total_median": [N], "total_threshold": [N], "loss_median": [N],
                    "loss_threshold": [N], "flagged": [N bools], "clipped": [N bools] | null,
                    # the full flight recorder only ({} otherwise):
                    "quantities": {"output_grad_norm": [N × L], "update_ratio": [N × L], ...},
                    "tables": {"units": {"sites": [U], "kinds": [U],
                                         "columns": {"saturated_fraction": [N × U], ...}}, ...},
                    "profiles": {"temporal.h": {"GRU.l0": [N rows of T floats ([] : not measured)]}, ...},
                    "not_recorded": [recorder names], "world_size": W, "rank": r,
                    "rank_local": [keys of quantities/tables/profiles that hold this rank's samples only]}},
        ...]}

Flight-record numbers are the values the watch saw (NaN where a quantity was not measured, was 0, or
was not finite: ``flagged`` and the event's ``kind`` say which); ``*_median`` is the rolling median in
force at that step and ``*_threshold`` the value above which that step would have been a spike.

>>> log = SpikeLog(config={"window": 128}, through=9, events=(SpikeEvent(step=7, kind="jump"),))
>>> SpikeLog.from_dict(log.as_dict()) == log, log.steps
(True, [7])
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from gradprobe.errors import RunLogError

__all__ = ["SpikeEvent", "SpikeLog", "FlightRecord", "FlightTable", "ChannelJump", "NOTE_KEY", "ACTIONS", "KINDS"]

#: the run-log note that holds a run's :class:`SpikeLog`
NOTE_KEY = "spikes"
#: what happened to a flagged step: only noted, a warning, the update skipped, training stopped
ACTIONS = ("recorded", "warned", "skipped", "raised")
#: a jump above the rolling statistic; a NaN/Inf gradient or loss; another rank's spike (distributed)
KINDS = ("jump", "non_finite", "remote")


def _num(x):
    return None if x is None else float(x)


def _same(a, b) -> bool:
    """Equality that treats NaN as equal to NaN (records compare equal after a JSON round trip)."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _rows(rows) -> tuple[tuple[float, ...], ...]:
    return tuple(tuple(float(x) for x in r) for r in rows)


@dataclass(frozen=True, eq=False)
class FlightTable:
    """One table of the full flight record over its sites (e.g. the activation modules of the ``"units"``
    table): ``columns[c][i][j]`` is column ``c`` at ``steps[i]`` of the record and site ``sites[j]``
    (``kinds[j]`` its kind), NaN where that site was not measured at that step."""

    sites: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ()
    columns: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"sites": list(self.sites), "kinds": list(self.kinds),
                "columns": {c: [list(r) for r in v] for c, v in self.columns.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> FlightTable:
        return cls(tuple(d["sites"]), tuple(d["kinds"]), {c: _rows(v) for c, v in d["columns"].items()})

    def __eq__(self, other) -> bool:
        return isinstance(other, FlightTable) and _same(self.as_dict(), other.as_dict())

    __hash__ = None


@dataclass(frozen=True, eq=False)
class ChannelJump:
    """One watched channel (the total gradient norm or the loss) at the spike step.

    ``value``: what was measured; ``median``: the rolling median ``exp(m)`` of the channel (see
    :class:`gradprobe.probe.SpikeWatch`); ``jump = value / median``; ``z = (ln value − m) / s``, ``s``
    the scaled MAD of the log values; ``threshold``: the value above which the step is a spike;
    ``spiked``: this channel was flagged.
    """

    value: float
    median: float
    jump: float
    z: float
    threshold: float
    spiked: bool

    def as_dict(self) -> dict:
        return {"value": self.value, "median": self.median, "jump": self.jump, "z": self.z,
                "threshold": self.threshold, "spiked": self.spiked}

    @classmethod
    def from_dict(cls, d: dict | None) -> ChannelJump | None:
        if d is None:
            return None
        return cls(float(d["value"]), float(d["median"]), float(d["jump"]), float(d["z"]), float(d["threshold"]),
                   bool(d["spiked"]))

    def __eq__(self, other) -> bool:
        return isinstance(other, ChannelJump) and _same(list(self.as_dict().values()), list(other.as_dict().values()))

    __hash__ = None


@dataclass(frozen=True, eq=False)
class FlightRecord:
    """The last ``N`` steps up to and including a spike's first step (every step, whatever the schedule
    recorded): ``grad_norm[i][l]`` is ‖∇θ_l‖₂ of layer ``layers[l]`` at ``steps[i]``, ``total[i]`` the
    total norm √Σ_l ‖∇θ_l‖², ``loss[i]`` the loss (NaN when none was given); the ``*_median`` and
    ``*_threshold`` rows are the detection band in force at each step; ``flagged[i]``: the step was a
    spike; ``clipped[i]``: clipping scaled that step down (``None`` when the threshold is unknown).

    With the full flight recorder (``SpikeWatch(full_flight=True)``, ``Probe(model, spikes="full")``) it
    also holds what every other built-in recorder of the probe measured at each of those steps, whatever
    the schedule recorded: ``quantities[q][i][l]`` is the per-layer quantity ``q`` (``output_grad_norm``
    ‖∂L/∂h_l‖, ``activation_norm``, ``weight_norm``, ``update_ratio`` ‖θ_l(t) − θ_l(t−1)‖/‖θ_l(t−1)‖ over
    that one step) at ``steps[i]`` and layer ``layers[l]`` (NaN: not measured), and ``tables`` the
    recorders' tables as :class:`FlightTable` (e.g. ``"units"``: ``saturated_fraction``,
    ``dead_fraction``). Empty for the watcher-only flight record (the default).

    ``profiles[key][site][i]``: a recorder's per-site array column at ``steps[i]`` (``key`` =
    ``"table.column"``), e.g. ``profiles["temporal.h"]["GRU.l0"][i]`` the ``(T,)`` BPTT profile
    ``‖∂E/∂h_k‖`` of that step (``()``: not measured at that step). ``not_recorded``: the probe's
    recorders whose quantities are not in the record (a user recorder without a flight twin,
    :meth:`gradprobe.probe.Recorder.flight_twin`).

    Data parallelism (``world_size`` > 1; ``rank`` is the process that wrote the record): ``grad_norm``,
    ``total``, parameter quantities (``weight_norm``, ``update_ratio``) are of the global batch (the same
    on every rank); the keys of ``quantities`` / ``tables`` / ``profiles`` named in ``rank_local`` hold
    this rank's own samples only, the others were combined over the ranks at the spike (see
    :class:`gradprobe.probe.SpikeWatch`)."""

    steps: tuple[int, ...] = ()
    layers: tuple[str, ...] = ()
    grad_norm: tuple[tuple[float, ...], ...] = ()
    total: tuple[float, ...] = ()
    loss: tuple[float, ...] = ()
    total_median: tuple[float, ...] = ()
    total_threshold: tuple[float, ...] = ()
    loss_median: tuple[float, ...] = ()
    loss_threshold: tuple[float, ...] = ()
    flagged: tuple[bool, ...] = ()
    clipped: tuple[bool, ...] | None = None
    quantities: dict = field(default_factory=dict)
    tables: dict = field(default_factory=dict)
    profiles: dict = field(default_factory=dict)
    not_recorded: tuple[str, ...] = ()
    world_size: int = 1
    rank: int = 0
    rank_local: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.steps)

    @property
    def full(self) -> bool:
        """Whether this is a full flight record (more than the watcher's own quantities)."""
        return bool(self.quantities or self.tables or self.profiles)

    def as_dict(self) -> dict:
        return {"steps": list(self.steps), "layers": list(self.layers), "grad_norm": [list(r) for r in self.grad_norm],
                "total": list(self.total), "loss": list(self.loss), "total_median": list(self.total_median),
                "total_threshold": list(self.total_threshold), "loss_median": list(self.loss_median),
                "loss_threshold": list(self.loss_threshold), "flagged": list(self.flagged),
                "clipped": None if self.clipped is None else list(self.clipped),
                "quantities": {q: [list(r) for r in v] for q, v in self.quantities.items()},
                "tables": {k: t.as_dict() for k, t in self.tables.items()},
                "profiles": {k: {site: [list(r) for r in rows] for site, rows in v.items()} for k, v in self.profiles.items()},
                "not_recorded": list(self.not_recorded), "world_size": self.world_size, "rank": self.rank,
                "rank_local": list(self.rank_local)}

    @classmethod
    def from_dict(cls, d: dict | None) -> FlightRecord | None:
        if d is None:
            return None
        floats = lambda k: tuple(float(x) for x in d[k])  # noqa: E731
        return cls(tuple(int(s) for s in d["steps"]), tuple(d["layers"]),
                   tuple(tuple(float(x) for x in row) for row in d["grad_norm"]), floats("total"), floats("loss"),
                   floats("total_median"), floats("total_threshold"), floats("loss_median"), floats("loss_threshold"),
                   tuple(bool(x) for x in d["flagged"]),
                   None if d.get("clipped") is None else tuple(bool(x) for x in d["clipped"]),
                   {q: _rows(v) for q, v in (d.get("quantities") or {}).items()},
                   {k: FlightTable.from_dict(t) for k, t in (d.get("tables") or {}).items()},
                   {k: {site: _rows(rows) for site, rows in v.items()} for k, v in (d.get("profiles") or {}).items()},
                   tuple(d.get("not_recorded") or ()), int(d.get("world_size", 1)), int(d.get("rank", 0)),
                   tuple(d.get("rank_local") or ()))

    def __eq__(self, other) -> bool:
        return isinstance(other, FlightRecord) and _same(list(self.as_dict().values()), list(other.as_dict().values()))

    __hash__ = None


@dataclass(frozen=True, eq=False)
class SpikeEvent:
    """One run of flagged steps (consecutive flagged steps at most the watch's ``merge`` steps apart).

    The evidence is that of its first step ``step`` (where it started): ``total`` / ``loss`` (the
    two run-level channels, :class:`ChannelJump`), ``layers`` that spiked in backward order (the order
    the backward pass reached them: the first is where the explosion entered), ``largest_layer``
    with the largest ratio to its own rolling median (``largest_jump``). ``last_step`` and
    ``flagged_steps`` span the whole run; ``peak_jump`` is its largest total-norm jump. ``clipped``:
    norm clipping scaled the first step down (``None``: no threshold known); ``clip_rate``: the
    fraction of clipped steps in the flight record before it. ``action`` is what the guard did at the
    first step, ``skipped_steps`` how many of the run's updates it skipped. ``confirmed``: the event is an
    alarm (the guard acts on it, the verdict counts it); always true unless the watch confirms by the loss
    (``SpikeWatch(confirm="loss")``), where a gradient spike whose loss did not spike (or rose by less than
    the watch's ``setback`` share of the progress the loss had made) is recorded with ``confirmed=False``
    and ``action="recorded"``, and merges only with other unconfirmed steps; ``loss_setback`` is that
    share, (loss − median) / (reference − median), the reference being the largest rolling median of the
    loss so far (``inf`` when the loss has made no progress; ``None`` without ``confirm``).
    """

    step: int
    kind: str = "jump"
    last_step: int | None = None
    flagged_steps: int = 1
    total: ChannelJump | None = None
    loss: ChannelJump | None = None
    layers: tuple[str, ...] = ()
    first_layer: str | None = None
    largest_layer: str | None = None
    largest_jump: float | None = None
    peak_jump: float = math.nan
    clipped: bool | None = None
    max_norm: float | None = None
    clip_rate: float | None = None
    action: str = "recorded"
    skipped_steps: int = 0
    flight: FlightRecord | None = None
    confirmed: bool = True
    loss_setback: float | None = None

    def __post_init__(self):
        if self.last_step is None:
            object.__setattr__(self, "last_step", self.step)
        object.__setattr__(self, "layers", tuple(self.layers))

    @property
    def layer(self) -> str | None:
        """Where the spike started: the first spiking layer in backward order, else the largest jump."""
        return self.first_layer or self.largest_layer

    def as_dict(self) -> dict:
        return {"step": self.step, "last_step": self.last_step, "flagged_steps": self.flagged_steps, "kind": self.kind,
                "total": None if self.total is None else self.total.as_dict(),
                "loss": None if self.loss is None else self.loss.as_dict(),
                "layers": list(self.layers), "first_layer": self.first_layer, "largest_layer": self.largest_layer,
                "largest_jump": self.largest_jump, "peak_jump": self.peak_jump, "clipped": self.clipped,
                "max_norm": self.max_norm, "clip_rate": self.clip_rate, "action": self.action,
                "skipped_steps": self.skipped_steps, "flight": None if self.flight is None else self.flight.as_dict(),
                "confirmed": self.confirmed, "loss_setback": self.loss_setback}

    @classmethod
    def from_dict(cls, d: dict) -> SpikeEvent:
        return cls(int(d["step"]), d["kind"], int(d["last_step"]), int(d["flagged_steps"]),
                   ChannelJump.from_dict(d.get("total")), ChannelJump.from_dict(d.get("loss")), tuple(d["layers"]),
                   d.get("first_layer"), d.get("largest_layer"), _num(d.get("largest_jump")), float(d["peak_jump"]),
                   d.get("clipped"), _num(d.get("max_norm")), _num(d.get("clip_rate")), d["action"],
                   int(d.get("skipped_steps", 0)), FlightRecord.from_dict(d.get("flight")), bool(d.get("confirmed", True)),
                   _num(d.get("loss_setback")))

    def __eq__(self, other) -> bool:
        if not isinstance(other, SpikeEvent):
            return False
        return all(_same(getattr(self, f.name), getattr(other, f.name)) for f in fields(self))

    __hash__ = None

    def sentence(self) -> str:
        """One line for logs and warnings."""
        if self.kind == "non_finite":
            what = "a non-finite gradient or loss"
        elif self.kind == "remote":
            what = "a spike on another rank"
        else:
            what = f"the total gradient norm at {self.total.jump:.3g}× its rolling median" if self.total else "a spike"
        where = f", starting at layer {self.layer!r}" if self.layer else ""
        unconfirmed = "" if self.confirmed else " (not confirmed by the loss, so no alarm)"
        return f"gradient spike at step {self.step}: {what}{where}{unconfirmed}"


@dataclass(frozen=True, eq=False)
class SpikeLog:
    """Every spike a watch found (``events``, step order), the steps checked (``through``), the watch's
    ``config`` and how many events were ``dropped`` beyond its bound. Saved as the note :data:`NOTE_KEY`."""

    events: tuple[SpikeEvent, ...] = ()
    through: int | None = None
    config: dict = field(default_factory=dict)
    dropped: int = 0

    def __post_init__(self):
        object.__setattr__(self, "events", tuple(self.events))

    def __len__(self) -> int:
        return len(self.events)

    @property
    def steps(self) -> list[int]:
        return [e.step for e in self.events]

    @property
    def alarms(self) -> tuple[SpikeEvent, ...]:
        """The confirmed events (all of them unless the watch confirms by the loss, ``confirm="loss"``)."""
        return tuple(e for e in self.events if e.confirmed)

    def until(self, step: int | None) -> SpikeLog:
        """The events that started at or before ``step`` (all of them for ``None``)."""
        if step is None:
            return self
        through = step if self.through is None else min(step, self.through)
        return SpikeLog(tuple(e for e in self.events if e.step <= step), through, self.config, self.dropped)

    def as_dict(self) -> dict:
        return {"version": 1, "config": dict(self.config), "through": self.through, "dropped": self.dropped,
                "events": [e.as_dict() for e in self.events]}

    @classmethod
    def from_dict(cls, d: dict) -> SpikeLog:
        """Inverse of :meth:`as_dict` (raises :class:`~gradprobe.errors.RunLogError` for a malformed note)."""
        try:
            if int(d.get("version", 1)) != 1:
                raise ValueError(f"unknown spike-log version {d.get('version')!r}")
            return cls(tuple(SpikeEvent.from_dict(e) for e in d["events"]), d.get("through"), dict(d.get("config") or {}),
                       int(d.get("dropped", 0)))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise RunLogError(f"the spike log saved in this run log is malformed: {exc!r}") from exc

    def __eq__(self, other) -> bool:
        return (isinstance(other, SpikeLog) and self.events == other.events and self.through == other.through
                and self.config == other.config and self.dropped == other.dropped)

    __hash__ = None
