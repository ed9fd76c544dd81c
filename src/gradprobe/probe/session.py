"""The probe session: a thin owner of recorders (what is measured), a schedule (when) and sinks (where to).

Per training step the session arms each recorder or not (its :mod:`schedule <gradprobe.probe.schedule>`:
a fixed cadence, or one that keeps the probe inside an overhead budget), and at :meth:`Session.step`
asks every armed recorder for its :class:`~gradprobe.probe.Contribution`. Device tensors are copied to
the host together — one copy per device, every ``fetch_every`` recorded steps (16 under a budget: the
records of a batch are built at once, see :class:`Session`) — and merged into one
:class:`~gradprobe.trace.LayerFlow` per step in forward execution order, which goes to every sink: the
in-memory :class:`~gradprobe.trace.Trace`, the SQLite run log (``log_dir=``) and any the user passes.
The session names no recorder or sink beyond building the defaults from its options.

Two corrections apply to the quantities recorders declare in :attr:`~gradprobe.probe.Recorder.norm_of`:
a loss scaler's factor is divided out (``scaler=``, see :mod:`gradprobe.probe.amp`), and under data
parallelism the per-rank hook norms are combined over ranks (see :mod:`gradprobe.probe.distributed`).
"""
from __future__ import annotations

import operator
import os
import threading
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from time import perf_counter

import numpy as np
import torch
from torch import nn

from gradprobe.errors import ConfigError, GradprobeError, ProbeStateError
from gradprobe.functional.transfer import to_host
from gradprobe.probe.amp import ScalerSnapshot, check_scaler, divide_scale, snapshot_scaler
from gradprobe.probe.distributed import all_reduce_host, local_part, world
from gradprobe.probe.layers import Layer, find_layers, model_facts, param_entries
from gradprobe.probe.outputs import OrderRecorder, OutputRecorder
from gradprobe.probe.params import GradRecorder, WeightRecorder
from gradprobe.probe.recorder import Context, Contribution, Deferred, LayerOrder, Recorder
from gradprobe.probe.schedule import CLOCKS, BudgetSchedule, FixedSchedule, Schedule
from gradprobe.probe.spikes import SpikeWatch
from gradprobe.probe.temporal import TemporalRecorder
from gradprobe.probe.units import UnitRecorder
from gradprobe.runlog import MODES, RunLog, plain_json, versions
from gradprobe.trace import LayerFlow, ModelFacts, RunHeader, Sink, Table, TemporalFlow, Trace
from gradprobe.trace.spikes import NOTE_KEY as SPIKES_NOTE

__all__ = ["Session", "default_recorders", "DEFAULT_BUDGET", "DEFAULT_PEER_CAP"]

#: the default overhead budget, a fraction of the training step (see :mod:`gradprobe.probe.schedule`)
DEFAULT_BUDGET = 0.03
#: the default peer cap: at most this fraction of what one norm per parameter gradient costs per step
DEFAULT_PEER_CAP = 0.8
#: recorded steps per batched device→host copy when the model lives on an accelerator
ACCELERATOR_FETCH_EVERY = 16
#: recorded steps per batch of records on the CPU under an overhead budget (a recorded step's fixed Python
#: is then ≈ 0.66× that of one record per step on a narrow MLP: see BENCHMARKS.md, "Fixed Python")
BUDGET_FETCH_EVERY = 16


_F64, _BOOL = np.dtype(np.float64), np.dtype(bool)
#: recorders whose contributions _merge takes without its per-array checks (exact types: a subclass may
#: override collect)
_TRUSTED = frozenset({GradRecorder, WeightRecorder})
_UNFIRED = (None, None)  # LayerOrder.capture() of a step on which no layer hook fired
_GRAD, _VERSION = operator.attrgetter("grad"), operator.attrgetter("_version")


def _owned(a: np.ndarray) -> bool:
    """Read-only and owning its data: nothing can write it (LayerFlow's own rule for taking an array)."""
    return a.base is None and not a.flags.writeable


def _frozen(a: np.ndarray) -> np.ndarray:
    if a.base is not None:  # (records own their arrays: LayerFlow.trusted takes them as they are)
        a = a.copy()
    a.setflags(write=False)  # a fresh array (fancy indexing copies): records take it without a copy
    return a


def default_recorders(*, hooks: bool = True, update_ratio: bool = True, units: bool = True,
                      saturation: float = 0.05, temporal: bool = False) -> list[Recorder]:
    """The built-in recorders a session's options stand for (see :class:`Session`)."""
    recs: list[Recorder] = [GradRecorder(), WeightRecorder(update_ratio=update_ratio),
                            OutputRecorder() if hooks else OrderRecorder()]
    if hooks and units:
        recs.append(UnitRecorder(saturation=saturation))
    if temporal:
        recs.append(TemporalRecorder())
    return recs


class _Pending:
    """One armed step whose numbers are still (partly) device tensors (``scaler``: the loss scaler's
    state at the step; ``peek``: measured by ``flow()`` between steps, not recorded)."""

    __slots__ = ("step", "parts", "loss", "full", "scaler", "peek", "fired")

    def __init__(self, step: int, parts: list, loss, full: bool = False, scaler: ScalerSnapshot | None = None,
                 peek: bool = False, fired: tuple = (None, None)):
        self.step, self.parts, self.loss, self.full = step, parts, loss, full
        self.scaler, self.peek = scaler, peek
        self.fired = fired  # the step's forward and backward firing order (LayerOrder.capture)


class Session:
    """Record per-layer gradient flow of any ``nn.Module``.

    Use it as a context manager (or call :meth:`close`); while open it owns forward hooks on every
    layer (a module owning parameters directly) and tensor hooks on their outputs. It never changes
    ``.grad``, never stores anything on the model or its tensors, and removes every hook on close.

    Args:
        model: any ``nn.Module`` (Sequential, branches, shared modules, RNNs, attention, ...).
        hooks: record ``‖∂L/∂h_l‖`` and ``‖h_l‖`` (tensor hooks on layer outputs). ``False`` keeps
            only parameter statistics (cheapest); forward order is then learnt from the first forward.
        update_ratio: keep a snapshot of the parameters to report ``‖Δθ‖/‖θ‖`` (one copy of the
            parameters in memory).
        units: with ``hooks``, also record saturated sigmoid/tanh and dead ReLU units of activation
            modules (:class:`~gradprobe.probe.UnitRecorder`); ``saturation`` is its threshold.
        temporal: record ``‖∂E/∂h_k‖`` for every time step of every recurrent layer (BPTT; see
            :class:`~gradprobe.probe.TemporalRecorder`).
        recorders: more recorders (:class:`~gradprobe.probe.Recorder`), e.g. your own.
        sinks: more sinks (:class:`~gradprobe.trace.Sink`), e.g. a TensorBoard writer.
        budget: the overhead the probe may add, as a fraction of the training step. The default
            ``"auto"`` is 3 % (``DEFAULT_BUDGET``) with a ``peer_cap`` of 0.8 (``DEFAULT_PEER_CAP``):
            never more than 80 % of what per-parameter gradient norms would cost. Each recorder records
            as often as the budget allows (gradient norms every step while
            possible; see :class:`~gradprobe.probe.schedule.BudgetSchedule`). The probe's whole cost
            counts: its hooks, every recorder's work, building and writing each record, and what
            ``step()`` costs on every step; on a model whose step takes a few milliseconds that alone can
            exceed 3 %, and even the gradient norms are then thinned. ``None``: every recorder every
            ``every`` steps.
        peer_cap: with a budget, also spend at most this fraction of what one norm per parameter
            gradient, read to the host, costs per step (``budget="auto"``: 0.8 unless given; a numeric
            ``budget``: no cap unless given): the least that users add without
            gradprobe (Lightning's ``grad_norm``, wandb's gradient logging), timed on this model on four
            steps of the warm-up. On models where those norms cost less than ``budget`` (an LSTM, a
            transformer: 0.5–1.5 % of the step), the cap is the tighter bound and the probe records less
            often; ``schedule.limit`` says which bound held, ``schedule.peer_seconds`` what the norms
            cost.
        every: a fixed schedule instead of a budget: every recorder records one step in ``every``.
        cadence: a fixed schedule with one period per recorder name, e.g. ``{"outputs": 4}``
            (unnamed recorders: ``every``, default 1). Periods should be powers of two to nest.
        deterministic: with a budget, derive the cadence once after the warm-up and keep it.
        budget_clock: the clock the budget measures the step and the probe's own cost on: ``"thread"``
            (default: the calling thread's CPU time, blind to other processes on a shared machine),
            ``"process"`` (the process's CPU time) or ``"wall"`` (``time.perf_counter``, e.g. on a
            dedicated accelerator machine, where the thread clock misses the device's time); see
            :mod:`gradprobe.probe.schedule` for the caveats (several threads, CUDA, data parallelism).
        fetch_every: recorded steps per batch: their numbers stay where they were measured (device
            tensors) and their records are built together, one device→host copy per batch. Default 16
            under a budget (the default ``Probe(model)``) and on accelerators; 1 with a fixed schedule
            (``every=``, ``cadence=``, ``budget=None``) on the CPU and under data parallelism. With
            batches, records arrive every ``fetch_every`` recorded steps: ``step()`` returns ``None``
            until then (then the batch's last record), and every reader fetches what is pending first:
            :meth:`flow`, :attr:`trace`, :meth:`last_full`, ``diagnose()``, ``run()``,
            :meth:`temporal_flow` and :meth:`close` (which ``with`` calls also when the block raises, so
            the run log gets every recorded step). A budget's first plan also fetches.
        max_steps: in-memory trace bound (see :class:`~gradprobe.trace.Trace`); the run log keeps all.
        log_dir: if given, every recorded step is also written to ``log_dir/<run_name>.sqlite``.
        run_name: file stem of the run log (default: ``run-<time>-<pid>``).
        mode: ``"new"`` (an existing run log is an error), ``"append"`` (continue it: steps are numbered
            on from its last one) or ``"overwrite"``.
        commit_every: run-log commit interval in recorded steps (and at close).
        scaler: the ``torch.amp.GradScaler`` of mixed-precision training. Every quantity is then
            reported unscaled (hook gradients are divided by the scale the backward ran with, ``.grad``
            norms by the scale still in ``.grad``: none after ``scaler.unscale_``), the step's scale and
            whether the scaler skips it (Inf/NaN in the scaled gradients) are in the ``"scaler"`` table
            (``flow.skipped``), and the diagnosis passes over skipped steps. Call :meth:`step` before
            ``scaler.update()``.
        distributed: combine the hook quantities over the ranks of a data-parallel run (DDP, FSDP2);
            default: whenever ``torch.distributed`` is initialised with more than one rank. Every rank
            measures, and every rank's trace holds the combined values; only rank 0 writes the run log
            and the sinks (those whose ``rank_zero_only`` is true, the default).
        spikes: watch every step for gradient spikes (``True``, or a configured
            :class:`~gradprobe.probe.SpikeWatch`); found spikes are the run-log note ``"spikes"``.
            ``"full"``: with the full flight recorder (every recorder's quantities at every step for
            the steps before a spike, :mod:`gradprobe.probe.flight`), ``SpikeWatch(full_flight=True)``.
        on_spike: the guard (implies ``spikes``): ``"warn"``, ``"skip"`` (the update of a spiking step
            is skipped: ``step()`` sets every ``.grad`` to ``None``) or ``"raise"``
            (:class:`~gradprobe.errors.GradientSpikeError`). Costs one host synchronisation per step.

    Data parallelism (``W`` ranks, rank ``r`` back-propagating its loss ``L_r`` over its own samples):
    DDP and FSDP2 average the parameter gradients, so the optimizer sees the gradient of
    ``L = (1/W) Σ_r L_r``, and that is the loss every quantity refers to. ``grad_norm`` is read from the
    all-reduced (DDP) or sharded-and-reduced (FSDP2) gradient; ``output_grad_norm`` becomes
    ``‖∂L/∂h_l‖ = √(Σ_r ‖∂L_r/∂h_l^(r)‖²) / W`` (rank ``r``'s samples are its own rows of ``h_l``),
    ``activation_norm`` ``√(Σ_r ‖h_l^(r)‖²)`` and the loss the mean over ranks. With each ``L_r`` the mean
    over ``n`` local samples these are exactly the numbers of one process training on the global batch of
    ``W·n`` samples with the mean loss. Tables (units, temporal profiles) stay rank-local. Ranks must
    record the same steps: with a budget they agree on the slowest cadence any of them plans (one small
    collective per step), and ``fetch_every`` defaults to 1. A :meth:`flow` peek before :meth:`step`
    combines nothing over ranks (only :meth:`step` does), except that sharded (FSDP2) parameter norms
    always need their collective: with sharded parameters, call ``flow()`` (and ``diagnose()``) on every
    rank or on none.

    Call :meth:`step` once per training step after ``loss.backward()`` and before
    ``optimizer.zero_grad()``. Several backward passes before one ``step()`` (gradient accumulation)
    add up: ``‖∂L/∂h_l‖`` is √(Σ_passes ‖·‖²), ``‖∇θ_l‖`` the norm of the accumulated ``.grad``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        hooks: bool = True,
        update_ratio: bool = True,
        units: bool = True,
        saturation: float = 0.05,
        temporal: bool = False,
        recorders: Sequence[Recorder] = (),
        sinks: Sequence[Sink] = (),
        budget: float | str | None = "auto",
        peer_cap: float | None = None,
        every: int | None = None,
        cadence: dict[str, int] | None = None,
        deterministic: bool = False,
        budget_clock: str = "thread",
        fetch_every: int | None = None,
        max_steps: int | None = 10_000,
        log_dir: str | os.PathLike | None = None,
        run_name: str | None = None,
        mode: str = "new",
        commit_every: int = 50,
        scaler=None,
        distributed: bool | None = None,
        spikes: bool | str | SpikeWatch = False,
        on_spike: str | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise ConfigError(f"Probe needs a torch.nn.Module; got {type(model).__name__}")
        if every is not None and int(every) < 1:
            raise ConfigError(f"Probe(every={every}) must be a positive number of steps")
        if mode not in MODES:
            raise ConfigError(f"Probe(mode={mode!r}) must be one of {MODES}")
        if budget_clock not in CLOCKS:
            raise ConfigError(f"Probe(budget_clock={budget_clock!r}) must be one of {sorted(CLOCKS)} "
                              "(see gradprobe.probe.schedule)")
        for r in recorders:
            if not isinstance(r, Recorder):
                raise ConfigError(f"recorders must be gradprobe.probe.Recorder instances; got {type(r).__name__}")
        for s in sinks:
            if not isinstance(s, Sink):
                raise ConfigError(f"sinks must be gradprobe.trace.Sink instances; got {type(s).__name__}")
        check_scaler(scaler)
        self.scaler = scaler
        self.rank, self.world_size = world()
        if distributed is False:
            self.world_size = 1
        elif distributed and not torch.distributed.is_initialized():
            raise ConfigError("Probe(distributed=True) needs torch.distributed initialised (init_process_group) first")
        self.model = model
        self.layers: list[Layer] = find_layers(model)
        if not self.layers:
            raise ConfigError(f"{type(model).__name__} has no parameters, so there is no gradient to probe")
        self.temporal = bool(temporal)
        #: the spike watch (``spikes=`` / ``on_spike=``), or ``None``
        self.spikes: SpikeWatch | None = SpikeWatch.from_options(spikes, on_spike, recorders)
        self.recorders: list[Recorder] = default_recorders(
            hooks=hooks, update_ratio=update_ratio, units=units, saturation=saturation, temporal=temporal
        ) + list(recorders) + ([self.spikes] if self.spikes is not None else [])
        if self.spikes is not None:
            # the full flight recorder's twins (spikes="full"), combined over ranks as the session's records are
            self.spikes.mirror(self.recorders, combine=self.world_size > 1)
        names = [r.name for r in self.recorders]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup or "" in names:
            raise ConfigError(f"every recorder needs a unique, non-empty name; duplicated or empty: {dup or ['']}")
        scheduled = [r.name for r in self.recorders if r.scheduled]
        if isinstance(budget, str):
            if budget != "auto":
                raise ConfigError(f"Probe(budget={budget!r}) must be a fraction of the training step, 'auto' or None")
            budget, peer_cap = DEFAULT_BUDGET, DEFAULT_PEER_CAP if peer_cap is None else peer_cap
        if every is not None or cadence is not None or budget is None:
            self.schedule: Schedule = FixedSchedule(scheduled, every or 1, cadence)
        else:
            self.schedule = BudgetSchedule(scheduled, budget, deterministic=deterministic, clock=budget_clock,
                                           essential=[r.name for r in self.recorders if r.scheduled and r.essential],
                                           peer_cap=peer_cap)
        # the budget's clock (None: a fixed schedule, which times nothing)
        self._now = self.schedule.now if isinstance(self.schedule, BudgetSchedule) else None
        self.facts: ModelFacts = model_facts(model)
        self.order = LayerOrder(len(self.layers))
        if fetch_every is None:
            on_cpu = all(p.device.type == "cpu" for p in self._params)
            # data parallel: every rank fetches (and runs the fetch's collective) inside step(); a fixed
            # schedule on the CPU: step() returns every record; a budget: records in batches
            if self.world_size > 1 or (on_cpu and isinstance(self.schedule, FixedSchedule)):
                fetch_every = 1
            else:
                fetch_every = BUDGET_FETCH_EVERY if on_cpu else ACCELERATOR_FETCH_EVERY
        if int(fetch_every) < 1:
            raise ConfigError(f"Probe(fetch_every={fetch_every}) must be a positive number of recorded steps")
        self.fetch_every = int(fetch_every)
        # a budget's first plan needs a record's cost measured: the step it plans at also fetches
        self._plan_step = (self.schedule.warmup + self.schedule.calibration - 1
                           if isinstance(self.schedule, BudgetSchedule) and self.fetch_every > 1 else -1)
        self._trace = Trace(max_steps=max_steps)
        self.runlog: RunLog | None = None
        if log_dir is not None and self.rank == 0:
            stem = run_name or f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
            self.runlog = RunLog(Path(log_dir) / f"{stem}.sqlite", commit_every=commit_every, mode=mode)
        writes = self.rank == 0
        self.sinks: list[Sink] = [self._trace] + ([self.runlog] if self.runlog is not None else []) + [
            s for s in sinks if writes or not s.rank_zero_only]
        self._first_step = self.runlog.next_step if self.runlog is not None else 0
        if self.world_size > 1 and log_dir is not None and mode == "append":
            # rank 0 alone knows where an appended run log goes on: every rank numbers its steps alike
            self._first_step = int(all_reduce_host(np.array([float(self._first_step)]))[0])
        self._step = self._first_step
        self._last: LayerFlow | None = None
        self._last_full: LayerFlow | None = None
        self._pending: list[_Pending] = []
        # forward order -> (order, index array, names, kinds, backward rank without output hooks)
        self._orders: dict[tuple, tuple] = {}
        self._order_last: tuple | None = None  # the entry of the last order list seen (keyed by identity)
        # without output hooks nothing marks a new backward pass: flow() compares .grad identities
        self._marks_needed = not hooks
        self._grad_marks: tuple | None = None  # .grad (weak refs, versions) at the last recorded step()
        self._mark = None  # (budget clock, perf_counter) at the end of the previous step()
        self._tail = 0.0  # the budget clock spent in the previous step() after its measurement was taken
        self._thread = None  # the thread that called the previous step() (the thread clock is per thread)
        self._closed = False
        #: every run-level note handed to the sinks, as the run log gives it back (JSON values)
        self.notes: dict = {}
        self.config = {
            "every": every, "budget": None if isinstance(self.schedule, FixedSchedule) else budget,
            "schedule": self.schedule.config(), "fetch_every": self.fetch_every,
            "max_steps": max_steps, "hooks": bool(hooks), "units": bool(units and hooks),
            "temporal": self.temporal, "commit_every": commit_every,
            "scaler": scaler is not None, "world_size": self.world_size,
            "recorders": [{"name": r.name, "class": f"{type(r).__module__}.{type(r).__qualname__}",
                           "scheduled": r.scheduled, **r.config()} for r in self.recorders],
        }
        self._scheduled = [r for r in self.recorders if r.scheduled]
        self._n_scheduled = len(self._scheduled)
        self._order_recorders = [r for r in self.recorders if isinstance(r, OrderRecorder)]
        self._install()  # last but the sinks: if anything raises, the model is left untouched
        header = RunHeader(type(model).__name__, tuple(l.name for l in self.layers), tuple(l.kind for l in self.layers),
                           self.facts, self.config, versions(), self._first_step)
        try:
            for s in self.sinks:
                s.open(header)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ hooks
    def _install(self) -> None:
        ctx = Context(self.model, tuple(self.layers), self.order, deferred=self.fetch_every > 1)
        done: list[Recorder] = []
        try:
            for r in self.recorders:
                r.install(ctx)
                done.append(r)
                r.arm(True)  # the first step records everything
        except BaseException:
            for r in reversed(done):
                r.remove()
            if self.runlog is not None:
                self.runlog.close()
            raise

    @property
    def _params(self) -> list:
        # read now, not at opening: a parameter may have been replaced (load_state_dict(..., assign=True))
        return param_entries(self.layers)

    def _armed(self) -> list[Recorder]:
        return [r for r in self._scheduled if r.armed]

    # ------------------------------------------------------------- measuring
    def _collect(self, advance: bool, costs: dict[str, float] | None = None, armed: list | None = None) -> list:
        """Every armed recorder's contribution; ``costs``: filled with each one's ``collect`` time (on the
        budget's clock)."""
        parts = []
        for r in self._armed() if armed is None else armed:
            if costs is None:
                try:
                    parts.append((r, r.collect(advance)))
                except GradprobeError as exc:  # say when: the step the user is recording
                    raise type(exc)(f"at step {self._step}: {exc}") from exc
                continue
            now = self._now
            start = now()
            try:
                parts.append((r, r.collect(advance)))
            except GradprobeError as exc:
                raise type(exc)(f"at step {self._step}: {exc}") from exc
            costs[r.name] = now() - start
        return parts

    def _order_info(self, fired_forward) -> tuple:
        """(forward order, its index array or None when it is discovery order, names, kinds, backward rank
        when no output hook fired), cached per order (``fired_forward``: a step's captured firing order)."""
        order = self.order.forward_order(fired_forward)
        cached = self._order_last
        if cached is None or cached[0] is not order:  # (the same list while the order does not change)
            key = tuple(order)
            cached = self._orders.get(key)
            if cached is None:
                o = None if order == list(range(len(order))) else np.asarray(order)
                # the backward rank when no output hook fired: reverse forward order (LayerOrder.backward_rank)
                rank = np.arange(len(order) - 1, -1, -1, dtype=np.int64)
                rank.setflags(write=False)
                cached = self._orders[key] = (order, o, tuple(self.layers[i].name for i in order),
                                              tuple(self.layers[i].kind for i in order), rank)
            cached = self._order_last = (order,) + cached[1:]
        return cached

    def _merge(self, step: int, parts: list, loss: float | None, scaler: ScalerSnapshot | None = None,
               combine: bool = False, fired: tuple = (None, None)) -> LayerFlow:
        """One record from the recorders' (finished) contributions, in forward order (``scaler``: divide
        out its loss scale; ``combine``: combine the hook quantities over data-parallel ranks; ``fired``:
        the step's :meth:`LayerOrder.capture`)."""
        order, o, names, kinds, rank = self._order_info(fired[0])
        values, measured, tables, norm_of = {}, {}, {}, {}
        n = len(self.layers)
        corrects = scaler is not None or combine  # (only the corrections read norm_of)
        for rec, c in parts:
            if corrects:
                norm_of.update(rec.norm_of)
            if c is None:
                continue
            # a built-in parameter recorder's contribution is float64 (L,) values, each with its bool (L,) mask,
            # by construction: taken without the per-array checks
            trusted = type(rec) in _TRUSTED and type(c) is Contribution
            if not trusted and not isinstance(c, Contribution):
                raise ConfigError(f"recorder {rec.name!r}.collect() returned {type(c).__name__}, not a Contribution")
            for q, v in c.layers.items():
                if q in values:
                    raise ConfigError(f"two recorders both measure the per-layer quantity {q!r} (the second is {rec.name!r})")
                if trusted:
                    values[q], measured[q] = v, c.measured[q]
                    continue
                if type(v) is not np.ndarray or v.dtype != _F64:  # (np.asarray's coercion is slow per call)
                    v = np.asarray(v, dtype=np.float64)
                if v.shape != (n,):
                    raise ConfigError(f"recorder {rec.name!r} gave {q!r} with shape {v.shape}; expected ({n},), "
                                      "one value per layer in ctx.layers order")
                values[q] = v  # discovery order until every correction is applied
                m = c.measured.get(q)
                if m is None:
                    m = ~np.isnan(v)
                elif type(m) is not np.ndarray or m.dtype != _BOOL:
                    m = np.asarray(m, dtype=bool)
                if m.shape != (n,):
                    raise ConfigError(f"recorder {rec.name!r} gave the mask of {q!r} with shape {m.shape}; "
                                      f"expected ({n},), one flag per layer in ctx.layers order")
                measured[q] = m
            for name, t in c.tables.items():
                if name in tables:
                    raise ConfigError(f"two recorders both produce the table {name!r} (the second is {rec.name!r})")
                tables[name] = t
        if scaler is not None:
            _unscale(scaler, norm_of, values, measured, tables, type(self.scaler).__name__)
        if combine:
            loss = self._combine_ranks(norm_of, values, measured, loss)
        if o is None:  # forward order is discovery order: a copy, not a gather, and none of a read-only
            # array that owns its data (what LayerFlow itself takes as it is)
            values = {q: v if _owned(v) else _frozen(v.copy()) for q, v in values.items()}
            measured = {q: m if _owned(m) else _frozen(m.copy()) for q, m in measured.items()}
        else:
            values = {q: _frozen(v[o]) for q, v in values.items()}
            measured = {q: _frozen(m[o]) for q, m in measured.items()}
        if fired[1]:  # some output hook fired in the step's backward
            rank = _frozen(np.asarray(self.order.backward_rank(order, fired[1]), dtype=np.int64))
        # every field is what LayerFlow.__post_init__ would make of it: fresh read-only arrays of the
        # right dtype and shape (checked above), tuples, a fresh tables dict
        return LayerFlow.trusted(names, kinds, values, measured, rank, step, None if loss is None else float(loss),
                                 tables, tuple(r.name for r, _ in parts))

    def _combine_ranks(self, norm_of: dict, values: dict, measured: dict, loss: float | None) -> float | None:
        """Hook quantities of the global batch from every rank's own (one collective; see the class docstring)."""
        qs = [(q, kind) for q, kind in norm_of.items() if q in values and kind in ("output_grad", "activation")]
        n = len(self.layers)
        buf = np.zeros(2 * n * len(qs) + 2)
        for i, (q, _) in enumerate(qs):
            m = measured[q]
            buf[2 * i * n : (2 * i + 1) * n] = np.where(m, values[q] ** 2, 0.0)
            buf[(2 * i + 1) * n : (2 * i + 2) * n] = m
        if loss is not None:
            buf[-2:] = (loss, 1.0)
        red = all_reduce_host(buf)
        for i, (q, kind) in enumerate(qs):
            m = red[(2 * i + 1) * n : (2 * i + 2) * n] > 0
            v = np.sqrt(red[2 * i * n : (2 * i + 1) * n]) / (self.world_size if kind == "output_grad" else 1.0)
            values[q] = np.where(m, v, np.nan)
            measured[q] = m
        return red[-2] / red[-1] if red[-1] > 0 else None

    def _finish(self, items: list[_Pending], finished: dict | None = None) -> list[LayerFlow]:
        """Copy every pending device tensor of ``items`` to the host at once and build their records.

        Several items (a batched fetch): the deferred numbers of a recorder that offers
        :attr:`Deferred.batch` are finished in one call for all of them. ``finished``: filled with
        ``{recorder: [seconds, steps]}``, each recorder's finish time (on the budget's clock) and how many
        steps' numbers it finished."""
        tensors = []
        for it in items:
            for _, c in it.parts:
                if isinstance(c, Deferred):
                    tensors.extend(c.tensors)
            if isinstance(it.loss, torch.Tensor):
                tensors.append(it.loss)
        host = to_host(tensors) if tensors else []
        now = self._now if finished is not None else None
        batched = len(items) > 1
        groups: dict = {}  # (recorder, its batch function) -> (recorder, function, deferreds, hosts, where)
        done = []
        pos = 0
        for i, it in enumerate(items):
            parts = []
            for r, c in it.parts:
                if isinstance(c, Deferred):
                    k = len(c.tensors)
                    h, pos = host[pos : pos + k], pos + k
                    if batched and c.batch is not None:
                        g = groups.get((id(r), c.batch))
                        if g is None:
                            g = groups[(id(r), c.batch)] = (r, c.batch, [], [], [])
                        g[2].append(c)
                        g[3].append(h)
                        g[4].append((i, len(parts)))
                        parts.append(None)  # (filled in below)
                        continue
                    if now is None:
                        c = c.finish(h)
                    else:
                        start = now()
                        c = c.finish(h)
                        _add(finished, r.name, now() - start, 1)
                parts.append((r, c))
            loss = it.loss
            if isinstance(loss, torch.Tensor):
                loss, pos = float(host[pos].reshape(-1)[0]), pos + 1
            done.append((parts, loss))
        for r, batch, deferreds, hosts, where in groups.values():
            start = None if now is None else now()
            contributions = batch(deferreds, hosts)
            if now is not None:
                _add(finished, r.name, now() - start, len(deferreds))
            if len(contributions) != len(deferreds):
                raise ConfigError(f"recorder {r.name!r}'s Deferred.batch returned {len(contributions)} contributions "
                                  f"for {len(deferreds)} steps")
            for (i, j), c in zip(where, contributions):
                done[i][0][j] = (r, c)
        combine = self.world_size > 1
        if not batched or combine:
            return [self._merge(it.step, parts, loss, it.scaler, combine and not it.peek, it.fired)
                    for it, (parts, loss) in zip(items, done)]
        flows = []
        for it, (parts, loss) in zip(items, done):
            # a step that only the gradient norms recorded, no hook fired, nothing to unscale: its record is
            # GradRecorder's contribution as it is (fresh dicts, owned read-only arrays: what _merge makes of it)
            if len(parts) == 1 and it.scaler is None and it.fired == _UNFIRED:
                r, c = parts[0]
                if (type(r) is GradRecorder and type(c) is Contribution and _owned(c.layers["grad_norm"])
                        and _owned(c.measured["grad_norm"])):
                    _, o, names, kinds, rank = self._order_info(None)
                    if o is None:
                        flows.append(LayerFlow.trusted(names, kinds, c.layers, c.measured, rank, it.step,
                                                       None if loss is None else float(loss), c.tables, (r.name,)))
                        continue
            flows.append(self._merge(it.step, parts, loss, it.scaler, False, it.fired))
        return flows

    def _fetch(self, finished: dict | None = None) -> list[LayerFlow]:
        """Finish every pending step and hand its record to the sinks (``finished``: see :meth:`_finish`)."""
        if not self._pending:
            return []
        items, self._pending = self._pending, []
        flows = self._finish(items, finished)
        failure = None
        for it, flow in zip(items, flows):
            for s in self.sinks:
                try:
                    s.write(flow)
                except Exception as exc:  # noqa: BLE001 - every sink gets every step (a full disk must not
                    failure = failure or exc  # cost the in-memory trace its records); the first failure is raised
            self._last = flow
            if it.full and not flow.skipped:  # the step a diagnosis rests on (not an fp16 overflow)
                self._last_full = flow
        if failure is not None:
            raise failure
        return flows

    def _agree_cadence(self, t: int) -> bool:
        """Every rank adopts the slowest period any rank planned (ranks time themselves apart, but the
        fetch's collectives need them to record the same steps)."""
        names = sorted(self.schedule.cadence)
        mine = np.array([float(self.schedule.cadence[n]) for n in names])
        agreed = all_reduce_host(mine, op="max")
        if np.array_equal(agreed, mine):
            return False
        return self.schedule.impose(t, {n: int(p) for n, p in zip(names, agreed)})

    # ------------------------------------------------------------ public API
    def step(self, loss: torch.Tensor | float | None = None) -> LayerFlow | None:
        """Close the current training step: record it (if any recorder is armed) and re-arm the hooks.

        Call after ``loss.backward()`` and before ``optimizer.zero_grad()``. ``loss`` (tensor or float)
        is stored with the step. Returns the recorded :class:`LayerFlow`, or ``None`` on a step that
        records nothing (or whose numbers are still on the device, with ``fetch_every > 1``).
        """
        if self._closed:
            self._check_open("step")
        now = self._now
        t = self._step - self._first_step
        if now is not None:  # a budget: the interval since the previous step() and the probe's own cost
            peer = None
            if self.schedule.measures_peer(t):  # what a per-parameter norm logger would cost here (peer cap)
                p0, w0 = now(), perf_counter()
                _peer_norms(self._params)
                peer, peer_wall = now() - p0, perf_counter() - w0
            start, wall = now(), perf_counter()
            thread = threading.get_ident()
            gap = None if self._mark is None or thread != self._thread else start - self._mark[0]
            if gap is not None and peer is not None:  # (the peer's timing is neither training nor probe)
                gap -= peer
            # the hooks ran in the training step: their perf_counter time × its clock / wall ratio
            rho_gap = 1.0 if gap is None else _ratio(gap, wall - self._mark[1] - (peer_wall if peer is not None else 0.0))
            self._thread = thread
        armed = self._armed()
        costs: dict | None = {} if now is not None else None
        finished: dict | None = {} if now is not None else None
        finishing = 0.0  # the recorders' finish of a fetched batch (in `finished`)
        flow, failure = None, None
        parts = self._collect(True, costs, armed) if armed else []
        snap = None if self.scaler is None else snapshot_scaler(self.scaler)
        watched = None if self.spikes is None else self.spikes.observe(self._step, loss, parts, snap)
        if watched is not None:
            self.note(SPIKES_NOTE, self.spikes.log().as_dict())
        record, records = 0.0, 0
        if armed or parts:  # parts without armed recorders: the guard's record of a spiking step
            if isinstance(loss, torch.Tensor):
                if loss.is_meta:  # a meta loss has no value
                    loss = None
                elif loss.is_cpu:  # reading it is no device synchronisation
                    loss = float(loss.detach().reshape(-1)[0]) if loss.dim() else loss.item()
                else:  # copied to the host with the recorders' numbers
                    loss = loss.detach().reshape(-1)[:1]
            elif loss is not None:
                loss = float(loss)
            full = len(armed) == self._n_scheduled
            pending = self._pending
            pending.append(_Pending(self._step, parts, loss, full, snap, fired=self.order.capture()))
            if self._marks_needed:
                self._grad_marks = self._grad_state()
            if len(pending) >= self.fetch_every or t == self._plan_step:
                records = len(pending)
                if costs is not None:
                    fetch_start = now()
                try:
                    flow = self._fetch(finished)[-1]
                except Exception as exc:  # noqa: BLE001 - a sink failed: the step still closes, then it is raised
                    failure = exc
                if costs is not None:
                    # the copy, the merge and the sinks (the recorders' finish() go to `finished`)
                    finishing = sum(f[0] for f in finished.values())
                    record = now() - fetch_start - finishing
        hooks = [(r.name, r.seconds) for r in armed] if now is not None else ()
        for r in self.recorders:
            if r.armed or r.idle_reset:
                r.reset()
                r.seconds = 0.0
        self.order.reset()
        self._step += 1
        nxt = t + 1
        changed = False
        if now is not None:
            mid = now()
            # collect, finish and the record are timed on the budget's clock itself (a handful of reads per
            # step: a thread-clock read costs ≈ 0.7 µs of CPU). Rescaling perf_counter sections by the call's
            # clock / wall ratio moved the cost of a long section (the weights' snapshot) into the always-on
            # cost on a loaded machine, whose median then dropped it. Hooks run dozens of times per step: they
            # keep perf_counter, rescaled by the training step's ratio (κ scales these to what they cost)
            hook_costs = {name: rho_gap * spent for name, spent in hooks}
            # always-on: this call so far and the previous call's tail, less what is attributed above
            fixed = (mid - start) + self._tail - sum(costs.values()) - finishing - record
            interval = None if gap is None else gap + (mid - start) + self._tail
            changed = self.schedule.observe(t, interval, costs, [r.name for r in armed],
                                            fixed=fixed, record=record, records=records, hooks=hook_costs, peer=peer,
                                            finished=finished)
        if self.world_size > 1 and isinstance(self.schedule, BudgetSchedule):
            changed = self._agree_cadence(nxt) or changed
        if changed:
            self.note("cadence", {"step": self._step, "periods": self.schedule.cadence})
        armed_at = self.schedule.armed
        for r in self._scheduled:
            on = armed_at(r.name, nxt)
            if on != r.armed:  # only when the schedule turns it on or off
                if on and not r.idle_reset:  # (it skipped its resets while disarmed)
                    r.reset()
                    r.seconds = 0.0
                r.arm(on)
        if self.spikes is not None:  # the full flight recorder's twins sit out the steps their recorder records
            self.spikes.follow()
        if self._order_recorders and self.order.known:
            # the forward order is known: order-only hooks are no longer needed
            for r in self._order_recorders:
                r.remove()
                self.recorders.remove(r)
            self._order_recorders = []
        if now is not None:
            self._mark = (now(), perf_counter())
            self._tail = self._mark[0] - mid
        if failure is not None:
            raise failure
        if watched is not None and watched.error is not None:
            raise watched.error
        return flow

    @property
    def skipped(self) -> bool:
        """The guard skipped this step's update (``on_spike="skip"``): its ``.grad`` are ``None``."""
        return self.spikes is not None and self.spikes.skipped

    def spike_log(self):
        """Every gradient spike found so far (:class:`~gradprobe.trace.SpikeLog`; checks the pending
        steps first, one host copy; after :meth:`close` the final log). Needs ``Probe(spikes=True)``
        or ``on_spike=``."""
        if self.spikes is None:
            raise ProbeStateError("spike_log() needs Probe(model, spikes=True) (or on_spike=...)")
        if not self._closed and self.spikes.check():
            self.note(SPIKES_NOTE, self.spikes.log().as_dict())
        return self.spikes.log()

    def flow(self) -> LayerFlow:
        """The per-layer flow of the most recent backward pass.

        If a backward pass happened since the last :meth:`step`, it is measured now from the
        pending hook data and the current ``.grad`` (by the recorders armed this step); otherwise it
        is the last recorded step. Without ``step()`` the pending data keeps adding up over backward
        passes (bounded memory: folded into per-layer sums), so call ``step()`` once per training step.
        """
        self._check_open("flow")
        self._fetch()
        # a forward pass alone (hooks fired, no backward yet) is not a backward pass to report
        backward_seen = self.order.backward_seen or any(p.grad is not None for p in self._params)
        dirty = any(getattr(r, "dirty", False) for r in self.recorders)
        if self._armed() and backward_seen and (dirty or self._last is None or self._grads_changed()):
            return self._finish([_Pending(self._step, self._collect(False), None, scaler=snapshot_scaler(self.scaler),
                                          peek=True, fired=self.order.capture())])[0]
        if self._last is None:
            raise ProbeStateError(
                "no backward pass has been observed yet: run loss.backward() while the probe is open, then call flow()"
            )
        return self._last

    @property
    def trace(self) -> Trace:
        """The in-memory :class:`~gradprobe.trace.Trace` of every recorded step, pending ones fetched first
        (with ``fetch_every > 1`` records arrive in batches: reading this property fetches what is
        pending; a reference kept from earlier holds what was fetched up to its last read or step)."""
        if self._pending and not self._closed:
            self._fetch()
        return self._trace

    @property
    def recording(self) -> bool:
        """Whether the current step will be recorded (some recorder is armed for it)."""
        return bool(self._armed())

    def is_full(self, flow: LayerFlow) -> bool:
        """``flow`` was measured by every scheduled recorder of this session."""
        return set(flow.recorders) >= {r.name for r in self.recorders if r.scheduled}

    def last_full(self) -> LayerFlow:
        """The most recent record that holds every quantity the probe measures (with a budget, the
        slower recorders record on fewer steps; this is the step a diagnosis rests on)."""
        self._check_open("last_full")
        self._fetch()
        if self._last_full is None:
            raise ProbeStateError("no step has been recorded yet: call step() after loss.backward()")
        return self._last_full

    def _grad_state(self) -> tuple[list, list]:
        # weak references, so a freed .grad whose id is reused by a new one is not mistaken for it (this runs
        # on every recorded step with hooks=False)
        params = self._params
        grads = list(map(_GRAD, params))
        try:
            return list(map(weakref.ref, grads)), list(map(_VERSION, grads))
        except TypeError:  # some .grad is None (no weak reference to None)
            return ([None if g is None else weakref.ref(g) for g in grads],
                    [None if g is None else g._version for g in grads])

    def _grads_changed(self) -> bool:
        """A backward pass since the last recorded step changed some ``.grad`` (new tensor or written in
        place). Needed with ``hooks=False``, where no tensor hook marks the probe dirty."""
        if self._grad_marks is None:
            return False
        refs, versions = self._grad_marks
        params = self._params
        if len(params) != len(refs):
            return True
        for p, ref, version in zip(params, refs, versions):
            g = p.grad
            if (ref is None) != (g is None) or (g is not None and (ref() is not g or version != g._version)):
                return True
        return False

    def temporal_flow(self) -> dict[str, TemporalFlow]:
        """``{recurrent layer: TemporalFlow}`` of the most recent backward pass (``Probe(temporal=True)``).

        Names are ``"<module>.l<layer>"`` (``".reverse"`` for the reverse direction of a bidirectional
        layer) or the names given to :func:`gradprobe.mark_state`. With a budget, the temporal
        recorder may not have recorded the latest step: this is then its most recent record.
        """
        self._check_open("temporal_flow")
        if not self.temporal:
            raise ProbeStateError("temporal_flow() needs Probe(model, temporal=True)")
        flow = self.flow()
        if flow.temporal is None:
            recent = next((f for f in reversed(list(self.trace)) if f.temporal is not None), None)
            flow = recent if recent is not None else flow
        return dict(flow.temporal or {})

    @property
    def cadence(self) -> dict[str, int]:
        """The current period (in steps) of every scheduled recorder."""
        return self.schedule.cadence

    def refresh_facts(self) -> ModelFacts:
        """Measure the model facts again (weight statistics change in training) and note them to the sinks."""
        self._check_open("refresh_facts")
        self.facts = model_facts(self.model)
        self.note("facts", self.facts.as_dict())
        return self.facts

    def note(self, key: str, value) -> None:
        """Hand a run-level result (plain JSON values) to every sink, e.g. the diagnosis or a test accuracy.

        The run log keeps it in its ``meta`` (``load_run(...).meta[key]``); :attr:`notes` keeps it here.
        A later note with the same key replaces the earlier one. The header's keys (``model``,
        ``config``, ... :data:`gradprobe.runlog.HEADER_KEYS`) cannot be noted.
        """
        value = plain_json(key, value)
        self.notes[key] = value
        for s in self.sinks:
            s.note(key, value)

    @property
    def step_count(self) -> int:
        """Number of :meth:`step` calls so far in this session."""
        return self._step - self._first_step

    @property
    def current_step(self) -> int:
        """The number the next recorded step gets (it continues an appended run log's numbering)."""
        return self._step

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise ProbeStateError(f"Probe.{what}() called after the probe was closed")

    def close(self) -> None:
        """Fetch what is pending, remove every hook, free the parameter snapshot, save the final model
        facts and cadence, and close the sinks. Idempotent."""
        if self._closed:
            return
        errors = []
        try:
            self._fetch()
        except Exception as exc:  # noqa: BLE001 - closing must release every hook and sink; re-raised below
            errors.append(exc)
        if self.spikes is not None:
            try:
                self.spikes.check()
                self.note(SPIKES_NOTE, self.spikes.log().as_dict())
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)
        self._closed = True
        for r in reversed(self.recorders):
            r.remove()
        try:
            self.facts = model_facts(self.model)
            self.notes["facts"] = plain_json("facts", self.facts.as_dict())
            for s in self.sinks:
                s.note("facts", self.notes["facts"])
            self.notes["cadence_history"] = plain_json(
                "cadence_history", getattr(self.schedule, "history", [(0, self.schedule.cadence)]))
            for s in self.sinks:
                s.note("cadence_history", self.notes["cadence_history"])
        except Exception as exc:  # noqa: BLE001 - closing must release every sink; the error is re-raised below
            errors.append(exc)
        for s in self.sinks:
            try:
                s.close()
            except Exception as exc:  # noqa: BLE001 - every sink is closed; the first failure is re-raised
                errors.append(exc)
        if errors:
            raise errors[0]

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"step {self._step}"
        return f"{type(self).__name__}({type(self.model).__name__}, {len(self.layers)} layers, {state})"


@torch.no_grad()
def _peer_norms(params) -> list[float]:
    """What a per-parameter gradient-norm logger computes every step (Lightning's ``grad_norm``, wandb's
    gradient logging): one 2-norm per parameter gradient, each read to the host; the peer cap's yardstick
    (:mod:`gradprobe.probe.schedule`). Sharded gradients (DTensor) are read through their local shard."""
    return [float(torch.linalg.vector_norm(local_part(g)[0])) for p in params
            if (g := p.grad) is not None and not g.is_meta and not g.is_sparse]


def _add(finished: dict, name: str, seconds: float, steps: int) -> None:
    f = finished.get(name)
    if f is None:
        finished[name] = [seconds, steps]
    else:
        f[0] += seconds
        f[1] += steps


def _ratio(clock: float, wall: float) -> float:
    """The budget clock's time per wall second over one section (≤ 1; 1 when nothing was measured)."""
    return min(clock / wall, 1.0) if wall > 0 and clock >= 0 else 1.0


def _unscale(snap: ScalerSnapshot, norm_of: dict, values: dict, measured: dict, tables: dict, kind: str) -> None:
    """Divide out the loss scale of the quantities ``norm_of`` declares and add the ``"scaler"`` table."""
    scale = snap.resolve()
    divide_scale(scale, norm_of, values, tables)
    skipped = scale.found_inf
    if skipped is None:  # not unscaled yet: the scaler will find exactly the non-finite gradients
        skipped = any(bool((measured[q] & ~np.isfinite(values[q])).any())
                      for q, what in norm_of.items() if what == "param_grad" and q in values)
    tables["scaler"] = Table(("loss_scale",), (kind,),
                             {"scale": np.array([scale.backward]), "skipped": np.array([bool(skipped)])})
