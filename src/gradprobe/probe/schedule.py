"""When each recorder records: a fixed cadence, or one that keeps the probe inside an overhead budget.

Every recorder ``r`` records on the steps ``t`` with ``(t − t₀) mod p_r = 0``, its *period* ``p_r`` a
power of two. Powers of two nest, so the steps share one grid: a step that records a slow recorder
records every faster one too, and every ``max(p)`` steps one record holds everything (a *full* record).

:class:`FixedSchedule` (``every=N``, or ``budget=None``): every recorder has period ``N``.

:class:`BudgetSchedule` (``budget=0.03``: 3 % of the training step): the probe times itself. A
recorder's cost per recorded step is the time spent in its hooks and in its ``collect`` (measured with
``time.perf_counter``), scaled by a calibration factor κ ≥ 1 that folds in what direct timing cannot see
(autograd's dispatch of tensor hooks, cache effects): κ = (median interval between ``step()`` calls on
full-record steps − base) / (their directly timed cost). The base step time is the median interval on
steps where only the essential recorders ran, minus their cost. The plan chooses periods such that

    Σ_r κ·c_r / p_r ≤ budget · base,

keeping *essential* recorders (gradient norms: the cheap non-finite and explosion check) at period 1
while any other recorder can still slow down, and otherwise doubling the period of the recorder with the
largest cost share. After a warm-up of ``warmup`` full steps the plan is made, and remade every
``replan`` steps (``deterministic=True``: made once, then fixed, so runs with the same costs repeat).
"""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable

import numpy as np

from gradprobe.errors import ConfigError

__all__ = ["FixedSchedule", "BudgetSchedule", "Schedule"]


class Schedule:
    """The cadence contract: ``period(name)`` and ``armed(name, t)`` for step index ``t`` (from the
    session's first step); ``observe`` feeds measurements; ``cadence`` is the current plan."""

    def period(self, name: str) -> int:
        raise NotImplementedError

    def armed(self, name: str, t: int) -> bool:
        return t % self.period(name) == 0

    def observe(self, t: int, interval: float | None, costs: dict[str, float], armed: Iterable[str]) -> bool:
        """Take one step's measurements; True when the plan changed."""
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
                 replan: int = 64, max_period: int = 1024, deterministic: bool = False, window: int = 256):
        budget = float(budget)
        if not 0 < budget < 1:
            raise ConfigError(f"Probe(budget={budget}) must be a fraction of the training step in (0, 1), e.g. 0.03")
        if warmup < 2:
            raise ConfigError(f"warmup={warmup} must be at least 2 steps")
        if max_period < 1 or max_period & (max_period - 1):
            raise ConfigError(f"max_period={max_period} must be a power of two")
        self.names = list(names)
        self.budget = budget
        self.essential = set(essential)
        self.warmup, self.replan, self.max_period = int(warmup), int(replan), int(max_period)
        self.deterministic = bool(deterministic)
        self._period = {n: 1 for n in self.names}
        self._cost = {n: deque(maxlen=window) for n in self.names}  # directly timed seconds per recorded step
        self._full: deque[tuple[float, float]] = deque(maxlen=window)  # (interval, timed cost) of full steps
        self._base: deque[float] = deque(maxlen=window)  # intervals of essential-only steps, minus their cost
        self._planned = False
        self.kappa = 1.0
        self.base_seconds = math.nan
        self.history: list[tuple[int, dict[str, int]]] = [(0, dict(self._period))]

    def period(self, name: str) -> int:
        return self._period[name]

    @property
    def cadence(self) -> dict[str, int]:
        return dict(self._period)

    def config(self) -> dict:
        return {"kind": "budget", "budget": self.budget, "warmup": self.warmup, "replan": self.replan,
                "max_period": self.max_period, "deterministic": self.deterministic,
                "essential": sorted(self.essential)}

    def observe(self, t: int, interval: float | None, costs: dict[str, float], armed: Iterable[str]) -> bool:
        armed = set(armed)
        for n, c in costs.items():
            if n in self._cost:
                self._cost[n].append(c)
        if interval is not None and interval > 0:
            timed = sum(costs.values())
            if armed >= set(self.names):
                self._full.append((interval, timed))
            elif armed <= self.essential or not armed:
                self._base.append(interval - sum(costs.get(n, 0.0) for n in armed))
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

    def _plan(self, t: int) -> bool:
        allowed = self.budget * self.base_seconds
        cost = {n: self.kappa * float(np.median(self._cost[n])) if self._cost[n] else 0.0 for n in self.names}
        period = {n: 1 for n in self.names}

        def total() -> float:
            return sum(cost[n] / period[n] for n in self.names)

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
        """The planned cost as a fraction of the base step (NaN before the first plan)."""
        if not self._planned:
            return math.nan
        cost = {n: self.kappa * float(np.median(self._cost[n])) if self._cost[n] else 0.0 for n in self.names}
        return sum(cost[n] / self._period[n] for n in self.names) / self.base_seconds
