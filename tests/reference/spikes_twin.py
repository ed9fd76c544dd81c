"""A slow, obviously correct NumPy twin of the spike watch's documented rule (no code shared with it).

Given every step's per-layer gradient norms ``(T, L)`` and losses ``(T,)``, it replays the rule of
:mod:`gradprobe.probe.spikes` step by step in float64 with plain loops:

* channel values: the L layer norms, the total √Σ norm², the loss; ``x = ln v`` (a value ≤ 0 or a
  missing loss is "not used"; NaN/+Inf is non-finite);
* the statistic is recomputed at the steps ``r ≥ min_history`` with ``(r − min_history) % refresh == 0``
  from the finite ``x`` of steps ``max(0, r − W) … r − 1``: ``m`` = the lower median (``sorted[(n−1)//2]``),
  ``s = 1.4826 · lower median |x − m|``, threshold ``max(k s, ln r_min)`` when at least ``min_history``
  finite values, else none;
* step ``t`` spikes in a channel when ``x_t`` is NaN or +Inf, or ``x_t − m > threshold``; the step is
  flagged when the total or the loss spikes (or any channel with ``per_layer``).
"""
from __future__ import annotations

import math

import numpy as np


def lower_median(v: np.ndarray) -> float:
    v = np.sort(v)
    return float(v[(len(v) - 1) // 2])


def replay(grad_norms: np.ndarray, losses: np.ndarray | None, *, window=128, k=6.0, min_jump=3.0, min_history=16,
           refresh=8, per_layer=False):
    """``(flags (T,), channel flags (T, C), stats)``; ``stats[t] = (m, s, thr)`` arrays of the C channels in force at t."""
    g = np.asarray(grad_norms, dtype=np.float64)
    T, L = g.shape
    total = np.sqrt((g ** 2).sum(axis=1))
    loss = np.full(T, np.nan) if losses is None else np.asarray(losses, dtype=np.float64)
    v = np.concatenate([g, total[:, None], loss[:, None]], axis=1)  # (T, C)
    with np.errstate(divide="ignore", invalid="ignore"):
        x = np.where(v > 0, np.log(np.where(v > 0, v, 1.0)), -np.inf)
    x = np.where(np.isnan(v), np.nan, x)
    x = np.where(np.isposinf(v), np.inf, x)
    if losses is None:
        x[:, -1] = -np.inf
    C = L + 2
    m, s, thr = np.zeros(C), np.full(C, np.nan), np.full(C, np.inf)
    flags = np.zeros(T, dtype=bool)
    chan = np.zeros((T, C), dtype=bool)
    stats = []
    for t in range(T):
        if t >= min_history and (t - min_history) % refresh == 0:
            m, s, thr = np.zeros(C), np.full(C, np.nan), np.full(C, np.inf)
            for c in range(C):
                past = x[max(0, t - window):t, c]
                past = past[np.isfinite(past)]
                if len(past) == 0:
                    continue
                m[c] = lower_median(past)
                s[c] = 1.4826 * lower_median(np.abs(past - m[c]))
                if len(past) >= min_history:
                    thr[c] = max(k * s[c], math.log(min_jump))
        stats.append((m.copy(), s.copy(), thr.copy()))
        for c in range(C):
            xc = x[t, c]
            chan[t, c] = bool(np.isnan(xc) or np.isposinf(xc) or (np.isfinite(thr[c]) and xc - m[c] > thr[c]))
        flags[t] = chan[t].any() if per_layer else chan[t, L:].any()
    return flags, chan, stats
