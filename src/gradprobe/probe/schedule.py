"""When each recorder records: a fixed cadence, or one that keeps the probe inside an overhead budget.

Every recorder ``r`` records on the steps ``t`` with ``(t − t₀) mod p_r = 0``, its *period* ``p_r`` a
power of two. Powers of two nest, so the steps share one grid: a step that records a slow recorder
records every faster one too, and every ``max(p)`` steps one record holds everything (a *full* record).

:class:`FixedSchedule` (``every=N``, or ``budget=None``): every recorder has period ``N``.

:class:`BudgetSchedule` (``budget=0.03``: 3 % of the training step): the probe times itself, and counts
*all* of its cost per step ``t``:

* ``c_r``: recorder ``r``'s own work on the steps it records: its hooks (:attr:`Recorder.seconds`), its
  ``collect`` and the ``finish`` of its deferred numbers;
* ``R``: building one record: the device→host copy, merging the contributions into a
  :class:`~gradprobe.trace.LayerFlow` and every sink's ``write`` (the trace, the run log), per record;
* ``F``: what ``step()`` costs on *every* step, recorded or not (arming, resetting, the spike watch,
  this bookkeeping).

The step's *training* time is the interval between two ``step()`` calls minus all of that. Both are read
on one clock, by default the calling thread's CPU time (``clock="thread"``, ``time.thread_time``): on a
machine shared with other processes the wall clock counts the time slices lost to them as part of the
step (2–4× its CPU time on a loaded 2-core machine), so a wall-clock budget of 3 % spends 6–12 % of the
CPU step. The thread clock rather than the process clock (``clock="process"``): with several intra-op
threads the process clock adds every worker thread's time (their spin-waits included) to the step, while
the probe's Python runs on one thread, so a budget on it would let the probe spend several times its
share of the wall time; the calling thread takes part in every parallel region, so its CPU time follows
the step's wall time without the other processes' share. Caveats, where the thread clock sees less than
the step and the budget is therefore *conservative* (the probe records less often than it could, never
more): CUDA runs backward on autograd's device threads and waits for kernels (blocking waits cost no CPU
time), and data parallelism (DDP, FSDP) waits for its collectives on communication threads. On a
dedicated accelerator machine ``clock="wall"`` (``time.perf_counter``) budgets against the wall time.
Short sections (hooks, a recorder's ``collect``) are timed with ``time.perf_counter`` whatever the clock
(a thread-clock read is a system call, ≈ 1 µs, and a hook runs dozens of times per step); the clock's
difference enters the always-on cost ``F``.

A calibration factor κ ≥ 1 folds in what direct timing cannot see (autograd's dispatch of tensor hooks,
cache effects): κ = (median interval on full-record steps − base) / (their measured cost). The base step
time is the median training time on steps where only the essential recorders ran. The plan chooses
periods such that

    κ · (F + R / min_r p_r + Σ_r c_r / p_r) ≤ budget · base,

(a record is built on every step some recorder records: one in ``min p`` on the nested grid), keeping
*essential* recorders (gradient norms: the cheap non-finite and explosion check) at period 1 while any
other recorder can still slow down, and otherwise doubling the period of the recorder with the largest
cost share. ``F`` cannot be thinned: if it alone exceeds the budget every recorder ends at
``max_period``. After a warm-up of ``warmup`` full steps the plan is made, and remade every ``replan``
steps (``deterministic=True``: made once, then fixed, so runs with the same costs repeat).
"""
from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterable

import numpy as np

from gradprobe.errors import ConfigError

__all__ = ["FixedSchedule", "BudgetSchedule", "Schedule", "CLOCKS"]

#: the clocks a budget can be kept on (seconds as float): see the module docstring
CLOCKS = {"thread": time.thread_time, "process": time.process_time, "wall": time.perf_counter}


class Schedule:
    """The cadence contract: ``period(name)`` and ``armed(name, t)`` for step index ``t`` (from the
    session's first step); ``observe`` feeds measurements; ``cadence`` is the current plan."""

    def period(self, name: str) -> int:
        raise NotImplementedError

    def armed(self, name: str, t: int) -> bool:
        return t % self.period(name) == 0

    def observe(self, t: int, interval: float | None, costs: dict[str, float], armed: Iterable[str], *,
                fixed: float = 0.0, record: float = 0.0, records: int = 0) -> bool:
        """Take one step's measurements; True when the plan changed.

        ``interval``: the step's time (training and probe) since the end of the previous ``step()``;
        ``costs``: each armed recorder's own cost; ``fixed``: the probe's always-on cost of this step;
        ``record``: the cost of building the ``records`` records fetched at this step."""
        return False

    @property
    def cadence(self) -> dict[str, int]:
        raise NotImplementedError

    def config(self) -> dict:
        return {}


class FixedSchedule(Schedule):
    """Every recorder records one step in ``every`` (or the explicit periods in ``cadence``)."""

    def __init__(self, names: Iterable[str], every: int = 1, cadence: dict[str, int] | None = None):
        if int(every) < 1:
            raise ConfigError(f"Probe(every={every}) must be a positive number of steps")
        self._period = {n: int(every) for n in names}
        for n, p in (cadence or {}).items():
            if n not in self._period:
                raise ConfigError(f"cadence names an unknown recorder {n!r}; recorders are {sorted(self._period)}")
            if int(p) < 1:
                raise ConfigError(f"cadence[{n!r}] = {p} must be a positive number of steps")
            self._period[n] = int(p)

    def period(self, name: str) -> int:
        return self._period[name]

    @property
    def cadence(self) -> dict[str, int]:
        return dict(self._period)

    def config(self) -> dict:
        return {"kind": "fixed", "cadence": self.cadence}


class BudgetSchedule(Schedule):
    """Periods chosen to keep the probe's measured cost within ``budget`` × the training step."""

    def __init__(self, names: Iterable[str], budget: float, *, essential: Iterable[str] = (), warmup: int = 8,
                 replan: int = 64, max_period: int = 1024, deterministic: bool = False, window: int = 256,
                 clock: str = "thread"):
        budget = float(budget)
        if not 0 < budget < 1:
            raise ConfigError(f"Probe(budget={budget}) must be a fraction of the training step in (0, 1), e.g. 0.03")
        if warmup < 2:
            raise ConfigError(f"warmup={warmup} must be at least 2 steps")
        if max_period < 1 or max_period & (max_period - 1):
            raise ConfigError(f"max_period={max_period} must be a power of two")
        if clock not in CLOCKS:
            raise ConfigError(f"budget_clock={clock!r} must be one of {sorted(CLOCKS)} (see gradprobe.probe.schedule)")
        self.clock = clock
        #: the clock function (seconds) intervals and the probe's own cost are read on
        self.now = CLOCKS[clock]
        self.names = list(names)
        self.budget = budget
        self.essential = set(essential)
        self.warmup, self.replan, self.max_period = int(warmup), int(replan), int(max_period)
        self.deterministic = bool(deterministic)
        self._period = {n: 1 for n in self.names}
        self._cost = {n: deque(maxlen=window) for n in self.names}  # directly timed seconds per recorded step
        self._fixed: deque[float] = deque(maxlen=window)  # the always-on cost of every step
        self._record: deque[float] = deque(maxlen=window)  # building one record (fetch, merge, sinks)
        self._full: deque[tuple[float, float]] = deque(maxlen=window)  # (interval, probe cost) of full steps
        self._base: deque[float] = deque(maxlen=window)  # intervals of essential-only steps, minus the probe's cost
        self._planned = False
        self.kappa = 1.0
        self.base_seconds = math.nan
        self.planned_overhead = math.nan
        self.history: list[tuple[int, dict[str, int]]] = [(0, dict(self._period))]

    def period(self, name: str) -> int:
        return self._period[name]

    @property
    def cadence(self) -> dict[str, int]:
        return dict(self._period)

    def config(self) -> dict:
        return {"kind": "budget", "budget": self.budget, "warmup": self.warmup, "replan": self.replan,
                "max_period": self.max_period, "deterministic": self.deterministic,
                "essential": sorted(self.essential), "clock": self.clock}

    def observe(self, t: int, interval: float | None, costs: dict[str, float], armed: Iterable[str], *,
                fixed: float = 0.0, record: float = 0.0, records: int = 0) -> bool:
        armed = set(armed).intersection(self._cost)
        for n, c in costs.items():
            if n in self._cost:
                self._cost[n].append(c)
        fixed = max(float(fixed), 0.0)  # (sections timed on another clock than the whole: never negative)
        self._fixed.append(fixed)
        if records:
            self._record.append(record / records)
        if interval is not None and interval > 0:
            spent = sum(costs.values()) + fixed + record
            if len(armed) == len(self.names):  # (armed ⊆ names)
                self._full.append((interval, spent))
            elif armed <= self.essential:
                self._base.append(interval - spent)
        due = (t + 1 == self.warmup) if not self._planned else (not self.deterministic and (t + 1) % self.replan == 0)
        if due and self._estimate():
            return self._plan(t + 1)
        return False

    def _estimate(self) -> bool:
        """Base step time and κ from the measurements; False if there are not enough yet."""
        if not self._full:
            return False
        full = np.array(self._full)
        if self._base:
            base = float(np.median(self._base))
        else:  # warm-up: every step was full; use the intervals minus the timed cost
            base = float(np.median(full[:, 0] - full[:, 1]))
        if not base > 0:
            return False
        excess = np.median(full[:, 0]) - base
        timed = np.median(full[:, 1])
        self.kappa = float(np.clip(excess / timed, 1.0, 4.0)) if timed > 0 else 1.0
        self.base_seconds = base
        return True

    def _costs(self) -> tuple[dict[str, float], float, float]:
        """κ-scaled ``({recorder: c_r}, F, R)`` from the medians of the measurements."""
        k = self.kappa
        cost = {n: k * float(np.median(self._cost[n])) if self._cost[n] else 0.0 for n in self.names}
        fixed = k * float(np.median(self._fixed)) if self._fixed else 0.0
        record = k * float(np.median(self._record)) if self._record else 0.0
        return cost, fixed, record

    @staticmethod
    def _total(period: dict[str, int], cost: dict[str, float], fixed: float, record: float) -> float:
        """``F + R / min p + Σ c_r / p_r`` (seconds per step, on average over the grid)."""
        if not period:
            return fixed
        return fixed + record / min(period.values()) + sum(cost[n] / p for n, p in period.items())

    def _plan(self, t: int) -> bool:
        allowed = self.budget * self.base_seconds
        cost, fixed, record = self._costs()
        period = {n: 1 for n in self.names}

        def total() -> float:
            return self._total(period, cost, fixed, record)

        while total() > allowed:
            # slow the heaviest non-essential recorder first; essential ones only when nothing else can move
            movable = [n for n in self.names if period[n] < self.max_period and n not in self.essential]
            if not movable:
                movable = [n for n in self.names if period[n] < self.max_period]
            if not movable:
                break
            worst = max(movable, key=lambda n: cost[n] / period[n])
            period[worst] *= 2
        self._planned = True
        #: the plan's cost as a fraction of the base step, when it was made (≤ budget unless nothing
        #: could slow down further)
        self.planned_overhead = total() / self.base_seconds
        changed = period != self._period
        if changed:
            self._period = period
            self.history.append((t, dict(period)))
        return changed

    def impose(self, t: int, cadence: dict[str, int]) -> bool:
        """Adopt ``cadence`` from step ``t`` on (the plan every rank of a data-parallel run agreed on:
        ranks time themselves apart, but must record the same steps); True if it changed the plan."""
        period = {n: int(cadence[n]) for n in self.names}
        if period == self._period:
            return False
        self._period = period
        self.history.append((t, dict(period)))
        return True

    def expected_overhead(self) -> float:
        """The current plan's cost as a fraction of the base step, on the measurements now (NaN before the
        first plan; :attr:`planned_overhead` is the same when the plan was made)."""
        if not self._planned:
            return math.nan
        return self._total(self._period, *self._costs()) / self.base_seconds
