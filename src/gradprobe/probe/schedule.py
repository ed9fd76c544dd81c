"""When each recorder records: a fixed cadence, or one that keeps the probe inside an overhead budget.

Every recorder ``r`` records on the steps ``t`` with ``(t − t₀) mod p_r = 0``, its *period* ``p_r`` a
power of two. Powers of two nest, so the steps share one grid: a step that records a slow recorder
records every faster one too, and every ``max(p)`` steps one record holds everything (a *full* record).

:class:`FixedSchedule` (``every=N``, or ``budget=None``): every recorder has period ``N``.

:class:`BudgetSchedule` (``budget=0.03``: 3 % of the training step): the probe times itself, and counts
*all* of its cost per step ``t``:

* ``c_r`` and ``h_r``: recorder ``r``'s own work on the steps it records: its ``collect`` and the
  ``finish`` of its deferred numbers (``c_r``: the median of each; a batched fetch finishes many steps
  at once and is charged per step it finished), and the time inside its hooks (``h_r``,
  :attr:`Recorder.seconds`);
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
A recorder's ``collect`` and ``finish`` and the record are timed on that clock (a handful of reads per
step; a thread-clock read costs ≈ 0.7 µs of CPU), hooks with ``time.perf_counter`` (they run dozens of
times per step) rescaled by the training step's clock-to-wall ratio.

A factor κ ≥ 1 turns the time measured inside a recorder's *hooks* into what they really cost the step:
it folds in what direct timing cannot see (autograd calling a Python tensor hook, the module call's slow
path once a forward hook is on it, the caches they disturb). It is estimated from neighbouring steps.
With ``u_t`` the interval of step ``t`` less everything the probe timed *outside* hooks (what is left:
the training step, the hooks and their dispatch) and ``h_r`` the median of recorder ``r``'s time inside
its hooks over the steps it records, over the steps ``t`` whose two neighbours have the same hooks
armed, and ``t`` more (or fewer) of them::

    κ = median over such t of ±(u_t − (u_{t−1} + u_{t+1}) / 2) / Σ_{r armed at t xor at t ± 1} h_r

The numerator is read on the budget's clock over whole steps (precise); the denominator is a median over
many steps, because the hook timer is noisy step by step on a loaded machine: hooks are timed with
``perf_counter`` (a thread-clock read is a system call, too slow for a hook) and rescaled by the step's
clock-to-wall ratio, which is right on average but, for sections much shorter than a time slice, low in
the median on a loaded machine (κ then also makes up for that). Neighbours see the
same machine, so a load that changes over seconds cancels in each triple (a steady drift exactly), and
the median passes over the triple a burst of foreign work landed in (a triple whose neighbours differ by
more than 25 %, or whose middle step is more than 3× or less than 1/3 of them, is not used: an evaluation
or a checkpoint between two ``step()`` calls). κ scales only ``h_r``: ``κ · h_r``
is the hooks' cost as the steps measure it; ``collect``, ``finish``, ``F`` and ``R`` are timed directly.

After a warm-up of ``warmup`` steps on which every recorder records, as many steps of *calibration*
alternate (every recorder on even steps, the essential ones alone on odd steps; the cadence history
shows it). They give the first such triples and the base step: the median interval, less all the probe
timed, of steps on which only essential recorders ran. Later triples come from the plan's own grid (a
recorder with period ``p > 1`` records between two steps on which it does not); while every recorder
with hooks records every step, κ keeps its last estimate. The plan chooses periods such that

    F + R / min_r p_r + Σ_r (c_r + κ · h_r) / p_r ≤ budget · base,

(a record is built on every step some recorder records: one in ``min p`` on the nested grid), keeping
*essential* recorders (gradient norms: the cheap non-finite and explosion check) at period 1 while any
other recorder can still slow down, and otherwise doubling the period of the recorder with the largest
cost share. ``F`` cannot be thinned: if it alone exceeds the budget every recorder ends at
``max_period``. After the warm-up and the calibration the plan is made, and remade every ``replan``
steps; while a remade plan equals the one before, the interval doubles (up to 8 · ``replan``: a replan
takes a few dozen medians over the measurement windows, ≈ 0.3–1 ms, which every 64 steps was a third of
an unrecorded step's cost), and a change sets it back to ``replan`` (``deterministic=True``: made once, then fixed, so runs with the same costs repeat).

*The peer cap* (``peer_cap=q``; the default ``Probe(model)`` uses it): the probe should never cost more
than what users add without it, and the cheapest thing they add is one norm per parameter gradient every
step, read to the host (Lightning's ``grad_norm``, wandb's gradient logging). A fixed fraction cannot
promise that: on an LSTM or a transformer step those norms cost 0.5–1.5 % of the step, on a narrow MLP
20 %. So on :attr:`PEER_SAMPLES` steps of the warm-up and calibration the session times exactly that
computation after the backward pass (``float(‖g‖)`` for every gradient ``g``, on this schedule's clock,
left out of the step's interval and of ``F``), and the plan keeps

    F + R / min_r p_r + Σ_r (c_r + κ · h_r) / p_r ≤ min(budget · base, q · P),

with ``P`` the median of those timings (:attr:`peer_seconds`; :attr:`limit` says which bound held).
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
    session's first step); ``observe`` feeds measurements; ``cadence`` is the current plan. The built-in
    schedules keep their plan in ``_period`` (``{recorder: period}``), which ``period`` and ``cadence``
    read; a schedule that plans otherwise overrides both."""

    _period: dict[str, int]

    def period(self, name: str) -> int:
        return self._period[name]

    def armed(self, name: str, t: int) -> bool:
        return t % self.period(name) == 0

    def observe(self, t: int, interval: float | None, costs: dict[str, float], armed: Iterable[str], *,
                fixed: float = 0.0, record: float = 0.0, records: int = 0,
                hooks: dict[str, float] | None = None, finished: dict[str, tuple[float, int]] | None = None) -> bool:
        """Take one step's measurements; True when the plan changed.

        ``interval``: the step's time (training and probe) since the end of the previous ``step()``;
        ``costs``: each armed recorder's own directly timed cost outside hooks (``collect``, and
        ``finish`` unless ``finished`` is given);
        ``hooks``: each armed recorder's time inside its hooks during the training step;
        ``fixed``: the probe's always-on cost of this step; ``record``: the cost of building the
        ``records`` records fetched at this step; ``finished``: ``{recorder: (seconds, steps)}``, the
        ``finish`` of the deferred numbers of ``steps`` recorded steps, all fetched at this step (a
        batched fetch: its cost per step is charged to the recorder)."""
        return False

    @property
    def cadence(self) -> dict[str, int]:
        return dict(self._period)

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

    def config(self) -> dict:
        return {"kind": "fixed", "cadence": self.cadence}


class BudgetSchedule(Schedule):
    """Periods chosen to keep the probe's measured cost within ``budget`` × the training step."""

    #: fewest steps against their neighbours (hooks armed on one, not on the others) κ is estimated from
    MIN_PAIRS = 3
    #: κ's bounds (a hook costs at least its own time; one whose dispatch costs ten times its work is not
    #: a probe's hook: beyond, the estimate is noise)
    MIN_KAPPA, MAX_KAPPA = 1.0, 10.0

    #: calibration steps on which the session times the peer's computation (one norm per parameter gradient)
    PEER_SAMPLES = 4
    #: the longest replan interval, in units of ``replan`` (it doubles while the plan stands)
    MAX_REPLAN = 8

    def __init__(self, names: Iterable[str], budget: float, *, essential: Iterable[str] = (), warmup: int = 8,
                 replan: int = 64, max_period: int = 1024, deterministic: bool = False, window: int = 256,
                 clock: str = "thread", peer_cap: float | None = None):
        budget = float(budget)
        if not 0 < budget < 1:
            raise ConfigError(f"Probe(budget={budget}) must be a fraction of the training step in (0, 1), e.g. 0.03")
        if peer_cap is not None and not 0 < float(peer_cap) <= 1:
            raise ConfigError(f"peer_cap={peer_cap} must be a fraction in (0, 1] of what the per-parameter "
                              "gradient norms cost")
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
        #: with a cap: at most this fraction of the measured peer cost per step (see :meth:`measures_peer`)
        self.peer_cap = None if peer_cap is None else float(peer_cap)
        self._peer: list[float] = []  # seconds of the peer's computation, one per sampled step
        #: the median of those (NaN until measured), and what bound the plan: "budget" or "peer"
        self.peer_seconds = math.nan
        self.limit = "budget"
        self._period = {n: 1 for n in self.names}  # the warm-up records everything
        # then ``warmup`` steps of calibration, unless every recorder is essential (see the module docstring)
        self.calibration = 0 if self.essential >= set(self.names) else self.warmup
        self._cost = {n: deque(maxlen=window) for n in self.names}  # timed seconds outside hooks per recorded step
        self._finish = {n: deque(maxlen=window) for n in self.names}  # a batched finish's seconds per step it finished
        self._hook = {n: deque(maxlen=window) for n in self.names}  # seconds inside its hooks per recorded step
        self._fixed: deque[float] = deque(maxlen=window)  # the always-on cost of every step
        self._record: deque[float] = deque(maxlen=window)  # building one record (fetch, merge, sinks)
        self._base: deque[float] = deque(maxlen=window)  # intervals of essential-only steps, minus the probe's cost
        # per step against its neighbours: (Δ step time less the probe's timed work outside hooks, recorders whose hooks differ)
        self._pairs: deque[tuple[float, frozenset]] = deque(maxlen=window)
        self._prev: deque[tuple[int, float, frozenset]] = deque(maxlen=2)  # (t, that time, recorders with hooks armed)
        self._hooked: set[str] = set()  # recorders whose hooks were seen to cost time
        self._planned = False
        self._every = self.replan  # the current replan interval (doubles while the plan stands)
        self._next_plan = 0  # the step the next replan is due at (after the first plan)
        #: the slow-down of a step with hooks armed over its neighbours without them, per second timed inside
        #: the hooks (see the module docstring); scales only the hook time of recorders with hooks
        self.kappa = 1.0
        self.base_seconds = math.nan
        self.planned_overhead = math.nan
        self.history: list[tuple[int, dict[str, int]]] = [(0, dict(self._period))]

    def config(self) -> dict:
        out = {"kind": "budget", "budget": self.budget, "warmup": self.warmup, "replan": self.replan,
               "max_period": self.max_period, "deterministic": self.deterministic,
               "essential": sorted(self.essential), "clock": self.clock}
        if self.peer_cap is not None:
            out["peer_cap"] = self.peer_cap
        return out

    def measures_peer(self, t: int) -> bool:
        """Whether the session should time the peer's computation on step ``t`` (with a ``peer_cap``: the
        first :attr:`PEER_SAMPLES` steps from the middle of the warm-up on, before the first plan)."""
        return (self.peer_cap is not None and not self._planned and t >= self.warmup // 2
                and len(self._peer) < self.PEER_SAMPLES)

    def observe(self, t: int, interval: float | None, costs: dict[str, float], armed: Iterable[str], *,
                fixed: float = 0.0, record: float = 0.0, records: int = 0,
                hooks: dict[str, float] | None = None, peer: float | None = None,
                finished: dict[str, tuple[float, int]] | None = None) -> bool:
        """Take step ``t``'s measurements (seconds on :attr:`now`); True if the cadence changed.

        ``peer``: what the peer's computation cost on this step (see :meth:`measures_peer`), timed apart
        and already left out of ``interval`` and ``fixed``; ``finished``: see :meth:`Schedule.observe`."""
        if peer is not None and peer >= 0:
            self._peer.append(float(peer))
        armed = set(armed).intersection(self._cost)
        spent = 0.0  # the finish of batched steps (in the interval, in no cost above)
        for n, (seconds, steps) in (finished or {}).items():
            spent += seconds
            if steps and n in self._finish:
                self._finish[n].append(seconds / steps)
        hooks = hooks or {}
        for n in armed:
            self._cost[n].append(costs.get(n, 0.0))
            h = max(float(hooks.get(n, 0.0)), 0.0)
            self._hook[n].append(h)
            if h > 0:
                self._hooked.add(n)
        fixed = max(float(fixed), 0.0)  # (sections timed on another clock than the whole: never negative)
        self._fixed.append(fixed)
        if records:
            self._record.append(record / records)
        if interval is not None and interval > 0:
            # the step less what the probe timed outside hooks: the training step and all its hooks cost
            untimed = interval - (sum(costs.values()) + fixed + record + spent)
            if armed <= self.essential:
                self._base.append(untimed - sum(hooks.get(n, 0.0) for n in armed))
            on = frozenset(armed & self._hooked)
            prev = self._prev
            if len(prev) == 2 and prev[0][0] == t - 2 and prev[1][0] == t - 1 and prev[0][2] == on:
                # a step whose hooks differ from both its neighbours' (the same): what arming them slowed
                # it by, against the mean of the two (a load changing steadily cancels)
                _, mid, hooked = prev[1]
                side = 0.5 * (prev[0][1] + untimed)
                d = mid - side
                if abs(prev[0][1] - untimed) > 0.25 * side or not side / 3 < mid < 3 * side:
                    pass  # neighbours that disagree, or a step with foreign work in it (an evaluation): no measure
                elif on < hooked:
                    self._pairs.append((d, hooked - on))
                elif hooked < on:
                    self._pairs.append((-d, on - hooked))
            prev.append((t, untimed, on))
        else:
            self._prev.clear()
        if not self._planned and self.calibration and t + 1 == self.warmup:
            # calibration: every recorder on even steps, the essential ones alone on odd steps (the base
            # step, and neighbours with and without hooks for κ)
            self._period = {n: 1 if n in self.essential else 2 for n in self.names}
            self.history.append((t + 1, dict(self._period)))
            return True
        if not self._planned:
            due = t + 1 == self.warmup + self.calibration
        else:
            due = not self.deterministic and t + 1 >= self._next_plan
        if due and self._estimate():
            changed = self._plan(t + 1)
            # (a plan that stands is re-checked less often; see the module docstring)
            self._every = self.replan if changed else min(2 * self._every, self.MAX_REPLAN * self.replan)
            self._next_plan = t + 1 + self._every
            return changed
        return False

    def _estimate(self) -> bool:
        """Base step time and κ from the measurements; False if there are not enough yet.

        κ from the steps against their neighbours (see the module docstring): steps next to each other see
        the same machine, so a load that changes over seconds cancels, and the
        median passes over the triple a burst of foreign work landed in. Fewer than :attr:`MIN_PAIRS`
        such steps (every recorder with hooks records every step): κ stays as it was."""
        if not self._base:
            return False
        base = float(np.median(self._base))
        if not base > 0:
            return False
        if len(self._pairs) >= self.MIN_PAIRS:
            # each step's slow-down against the hook time of the recorders that differ, taken as the median
            # over their recorded steps (a hook's perf_counter time is noisy on a loaded machine; the step's
            # interval on the thread clock is not)
            hook = self._hook_seconds()
            ratios = [d / h for d, diff in self._pairs if (h := sum(hook[n] for n in diff)) > 0]
            if len(ratios) >= self.MIN_PAIRS:
                self.kappa = float(np.clip(np.median(ratios), self.MIN_KAPPA, self.MAX_KAPPA))
        self.base_seconds = base
        return True

    def _hook_seconds(self) -> dict[str, float]:
        """``h_r``: the median of each recorder's hook time over its recorded steps (see the module docstring)."""
        return {n: float(np.median(self._hook[n])) if self._hook[n] else 0.0 for n in self.names}

    def _costs(self) -> tuple[dict[str, float], float, float]:
        """``({recorder: c_r}, F, R)`` from the medians of the measurements, κ applied to hook time only."""
        k, hook = self.kappa, self._hook_seconds()
        cost = {n: (float(np.median(self._cost[n])) if self._cost[n] else 0.0)
                + (float(np.median(self._finish[n])) if self._finish[n] else 0.0) + k * hook[n] for n in self.names}
        fixed = float(np.median(self._fixed)) if self._fixed else 0.0
        record = float(np.median(self._record)) if self._record else 0.0
        return cost, fixed, record

    @staticmethod
    def _total(period: dict[str, int], cost: dict[str, float], fixed: float, record: float) -> float:
        """``F + R / min p + Σ c_r / p_r`` (seconds per step, on average over the grid)."""
        if not period:
            return fixed
        return fixed + record / min(period.values()) + sum(cost[n] / p for n, p in period.items())

    def _plan(self, t: int) -> bool:
        allowed = self.budget * self.base_seconds
        self.limit = "budget"
        if self.peer_cap is not None and self._peer:
            self.peer_seconds = float(np.median(self._peer))
            if self.peer_cap * self.peer_seconds < allowed:
                allowed, self.limit = self.peer_cap * self.peer_seconds, "peer"
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
