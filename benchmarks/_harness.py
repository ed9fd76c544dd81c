"""Paired, interleaved timing of step functions (shared by every benchmark in this folder).

Why paired ratios: on a shared 2-core machine the speed of *everything* drifts by several percent
over a minute (other processes, thermal state, allocator state). Overheads of a few percent are
invisible in absolute times measured minutes apart. We therefore run every configuration once per
*round*, in a rotating order (ABC, BCA, CAB, ...), and compare each candidate with the baseline
*of the same round*: ``ratio_r = t_candidate(r) / t_baseline(r)``. Drift common to a round cancels;
the median over rounds is robust to the odd round hit by a burst of foreign load; a bootstrap
confidence interval of that median and the inter-quartile range of the ratios give the spread.

Only the standard library and numpy are used here, so the harness can time anything callable.

>>> stats = measure({"base": lambda: sum(range(100_000)), "twice": lambda: sum(range(200_000))},
...                 baseline="base", rounds=7, steps_per_round=3, warmup_steps=1)
>>> 1.5 < stats["twice"].median_ratio < 2.5
True
"""
from __future__ import annotations

import gc
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

__all__ = ["PairedStats", "measure", "markdown_table", "bootstrap_median_ci", "paired_between"]


@dataclass(frozen=True)
class PairedStats:
    """Timing of one configuration against the baseline, over ``rounds`` rounds.

    ``step_s[r]`` is the mean time of one step in round ``r`` (seconds); ``ratio[r]`` the paired
    ratio ``step_s[r] / baseline.step_s[r]`` (1.0 for the baseline itself).
    """

    name: str
    step_s: np.ndarray
    ratio: np.ndarray
    wall_s: np.ndarray | None = None  # the same blocks on the wall clock (when the primary is CPU time)
    wall_ratio: np.ndarray | None = None
    ci_level: float = 0.95
    ci: tuple[float, float] = (float("nan"), float("nan"))
    extra: dict = field(default_factory=dict)

    @property
    def median_ms(self) -> float:
        return float(np.median(self.step_s) * 1e3)

    @property
    def median_ratio(self) -> float:
        return float(np.median(self.ratio))

    @property
    def overhead_pct(self) -> float:
        """Median paired overhead in percent: ``100 · (median ratio − 1)``."""
        return 100.0 * (self.median_ratio - 1.0)

    @property
    def median_wall_ms(self) -> float:
        return float(np.median(self.wall_s) * 1e3) if self.wall_s is not None else float("nan")

    @property
    def median_wall_ratio(self) -> float:
        return float(np.median(self.wall_ratio)) if self.wall_ratio is not None else float("nan")

    @property
    def iqr(self) -> tuple[float, float]:
        q1, q3 = np.percentile(self.ratio, [25, 75])
        return float(q1), float(q3)


def bootstrap_median_ci(x: np.ndarray, level: float = 0.95, n_boot: int = 4000, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of the median of ``x`` (1-D)."""
    x = np.asarray(x, dtype=np.float64)
    if x.size < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    meds = np.median(x[rng.integers(0, x.size, size=(n_boot, x.size))], axis=1)
    lo, hi = np.percentile(meds, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def measure(
    step_fns: Mapping[str, Callable[[], object]],
    *,
    baseline: str,
    rounds: int = 30,
    steps_per_round: int | Mapping[str, int] = 10,
    warmup_steps: int = 5,
    clock: Callable[[], int] = time.process_time_ns,
    wall_clock: Callable[[], int] | None = time.perf_counter_ns,
    collect_between_rounds: bool = True,
    on_round: Callable[[int], None] | None = None,
) -> dict[str, PairedStats]:
    """Time ``{name: step_fn}`` in interleaved rounds; return paired statistics per name.

    Every function is first called ``warmup_steps`` times (caches, allocator, lazy init, autograd
    graph shapes). Then, for ``rounds`` rounds, each function runs ``steps_per_round`` consecutive
    steps, timed as one block; the order of the functions rotates by one position each round so
    that no configuration always runs first (or right after the same neighbour). ``steps_per_round``
    may be a ``{name: steps}`` mapping (missing names: the baseline's count), so a configuration
    that is orders of magnitude slower runs shorter blocks; times are per step either way, and every
    ratio still pairs blocks of the same round.

    ``clock`` (nanoseconds) is the primary clock: by default the process CPU time, which on a
    one-thread CPU run counts only our own work and so ignores time slices lost to other processes
    on a shared machine (it still sees their cache and memory-bandwidth pressure). ``wall_clock`` is
    recorded alongside for the same blocks (set it to ``None`` to skip). On GPU, or with several
    intra-op threads, use the wall clock as the primary one.

    ``collect_between_rounds`` runs ``gc.collect()`` before each round (outside the timed blocks), so
    a collection triggered by one configuration's garbage is less likely to land in another's block;
    the garbage collector stays enabled inside the blocks because real training runs with it.
    """
    names = list(step_fns)
    if baseline not in step_fns:
        raise ValueError(f"baseline {baseline!r} is not one of {names}")
    if isinstance(steps_per_round, Mapping):
        default = int(steps_per_round.get(baseline, 10))
        steps = {name: int(steps_per_round.get(name, default)) for name in names}
    else:
        steps = {name: int(steps_per_round) for name in names}
    if rounds < 1 or min(steps.values()) < 1:
        raise ValueError("rounds and steps_per_round must be positive")
    for name in names:
        for _ in range(warmup_steps):
            step_fns[name]()
    times = {name: np.empty(rounds) for name in names}
    walls = {name: np.empty(rounds) for name in names}
    wall = wall_clock or (lambda: 0)
    for r in range(rounds):
        if collect_between_rounds:
            gc.collect()
        k = r % len(names)
        for name in names[k:] + names[:k]:
            fn = step_fns[name]
            w0, t0 = wall(), clock()
            for _ in range(steps[name]):
                fn()
            t1, w1 = clock(), wall()
            times[name][r] = (t1 - t0) / 1e9 / steps[name]
            walls[name][r] = (w1 - w0) / 1e9 / steps[name]
        if on_round is not None:
            on_round(r)
    base = times[baseline]
    out: dict[str, PairedStats] = {}
    for name in names:
        ratio = times[name] / base
        w = (walls[name], walls[name] / walls[baseline]) if wall_clock is not None else (None, None)
        out[name] = PairedStats(name, times[name], ratio, *w, ci=bootstrap_median_ci(ratio), extra={"steps": steps[name]})
    return out


def paired_between(a: PairedStats, b: PairedStats) -> tuple[float, tuple[float, float]]:
    """Median over rounds of ``t_a / t_b`` (two candidates of the same run, paired by round) and its
    95% bootstrap CI: e.g. whether one tool is cheaper than another without going through the baseline."""
    r = a.step_s / b.step_s
    return float(np.median(r)), bootstrap_median_ci(r)


def markdown_table(stats: Mapping[str, PairedStats], extra_columns: Mapping[str, Callable[[PairedStats], str]] | None = None) -> str:
    """Markdown table: median ms/step, median paired ratio, 95% bootstrap CI and IQR, overhead %."""
    extra_columns = dict(extra_columns or {})
    head = ["config", "CPU ms/step (median)", "ratio vs plain (median)", "95% CI of median", "IQR", "overhead", "wall ms/step", "wall ratio"]
    head += list(extra_columns)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in stats.values():
        q1, q3 = s.iqr
        row = [
            f"`{s.name}`",
            f"{s.median_ms:.2f}",
            f"{s.median_ratio:.3f}",
            f"[{s.ci[0]:.3f}, {s.ci[1]:.3f}]",
            f"[{q1:.3f}, {q3:.3f}]",
            f"{s.overhead_pct:+.1f}%",
            f"{s.median_wall_ms:.2f}",
            f"{s.median_wall_ratio:.3f}",
        ]
        row += [fn(s) for fn in extra_columns.values()]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)
