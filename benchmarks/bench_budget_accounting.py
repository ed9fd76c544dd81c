"""Budget accounting: what the budgeted probe believes it spends against what it measurably costs.

Per model, a plain copy and a budgeted ``Probe(model)`` copy (same weights, own SGD) run the same
training step (``bench_probe_overhead.train_step``) in interleaved blocks of ``--block`` steps whose
order alternates. For every probe step the schedule's own view is captured (``BudgetSchedule.observe``
is wrapped: the directly timed costs, the always-on and record cost) together with the plan's per-step
estimate at that moment (``expected_overhead() × base_seconds``: κ and everything the plan counts). The
measured spend is the process CPU time of a probe step minus that of a plain step, paired by block
(median over blocks of the per-step difference, 95 % bootstrap CI); an A/A pair (two plain copies)
gives the resolution.

    python benchmarks/bench_budget_accounting.py --case transformer --blocks 40
    python benchmarks/bench_budget_accounting.py --case lstm --case transformer --alt before=/path/to/src
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import bootstrap_median_ci  # noqa: E402
from bench_probe_overhead import load_alt_probe  # noqa: E402
from peers import make_cases  # noqa: E402


class Run:
    def __init__(self, name, case, proto, probe_cls=None, **kw):
        self.name, self.case = name, case
        self.model = copy.deepcopy(proto)
        self.model.train()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3)
        self.probe = None
        self.seen: list[tuple] = []  # per probe step: (raw timed spend, plan's estimate per step)
        self._est = np.nan
        if probe_cls is not None:
            self.probe = probe_cls(self.model, **kw)
            sched = self.probe.schedule
            real = sched.observe

            def observe(t, interval, costs, armed, *, fixed=0.0, record=0.0, records=0, **extra):
                changed = real(t, interval, costs, armed, fixed=fixed, record=record, records=records, **extra)
                raw = sum(costs.values()) + max(fixed, 0.0) + record
                raw += sum((extra.get("hooks") or {}).values())  # time inside hooks, per recorder
                # a batched finish's seconds (paid once per batch, at this step)
                raw += sum(seconds for seconds, _ in (extra.get("finished") or {}).values())
                # the plan's estimate, re-read when the plan may have moved (a replan, every 64 steps): reading it
                # costs medians over the schedule's windows, which this wrapper would otherwise add to every step's
                # always-on cost (inside step(), on the probe's own clock)
                if not getattr(sched, "_planned", False):
                    est = np.nan
                elif changed or np.isnan(self._est) or t % 64 == 0:
                    est = self._est = sched.expected_overhead() * sched.base_seconds
                else:
                    est = self._est
                self.seen.append((raw, est, len(set(armed))))
                return changed

            sched.observe = observe

    def step(self):
        self.opt.zero_grad(set_to_none=True)
        out = self.model(self.case.x)
        loss = self.case.loss_fn(out, self.case.y)
        loss.backward()
        if self.probe is not None:
            self.probe.step(loss)
        self.opt.step()


def run(case, blocks: int, block: int, warmup: int, alts: dict, log=print):
    torch.manual_seed(0)
    proto = case.make_model()
    runs = [Run("plain", case, proto), Run("plain_again", case, proto)]
    for label, cls in alts.items():
        runs.append(Run(label, case, proto, cls))
    for r in runs:  # consecutive warm-up: a budgeted probe plans at 8 and replans at 64
        for _ in range(warmup):
            r.step()
    times = {r.name: [] for r in runs}
    marks = {r.name: [] for r in runs}
    for b in range(blocks):
        order = runs[b % len(runs):] + runs[:b % len(runs)]
        for r in order:
            marks[r.name].append(len(r.seen))
            t0 = time.process_time_ns()
            for _ in range(block):
                r.step()
            times[r.name].append((time.process_time_ns() - t0) / block / 1e9)
    plain = np.array(times["plain"])
    out = {"plain_ms": float(np.median(plain) * 1e3)}
    for r in runs[1:]:
        d = np.array(times[r.name]) - plain
        row = {"measured": float(np.median(d)), "ci": bootstrap_median_ci(d)}
        if r.probe is not None:
            seen = np.array(r.seen[warmup:], dtype=float)
            row["timed"] = float(np.mean(seen[:, 0]))
            row["planned"] = float(np.nanmedian(seen[:, 1]))
            s = r.probe.schedule
            row["kappa"] = getattr(s, "kappa", np.nan)
            row["cadence"] = dict(r.probe.cadence)
            row["planned_frac"] = getattr(s, "planned_overhead", np.nan)
            row["base_ms"] = getattr(s, "base_seconds", np.nan) * 1e3
            r.probe.close()
        out[r.name] = row
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", action="append")
    ap.add_argument("--blocks", type=int, default=30)
    ap.add_argument("--block", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=72)
    ap.add_argument("--alt", action="append", default=[], help="LABEL=SRC: another checkout's Probe beside this one")
    ap.add_argument("--kw", default="", help="extra Probe keywords as k=v,k=v (python literals)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    kw = {}
    for item in filter(None, a.kw.split(",")):
        k, v = item.split("=", 1)
        kw[k] = eval(v)  # noqa: S307 - a benchmark's command line
    cases = make_cases()
    from gradprobe import Probe
    classes = {"probe": Probe}
    for spec in a.alt:
        label, src = spec.split("=", 1)
        classes[label] = load_alt_probe(Path(src), label)
    print(f"CPU: {os.popen('lscpu').read().split('Model name:')[1].splitlines()[0].strip()}, "
          f"load {os.getloadavg()[0]:.1f}, torch {torch.__version__}, 1 thread")
    for name in a.case or ["lstm", "transformer"]:
        res = run(cases[name], a.blocks, a.block, a.warmup, {k: _Wrap(c, kw) for k, c in classes.items()})
        print(f"\n## {name}: plain {res['plain_ms']:.2f} CPU ms/step, load {os.getloadavg()[0]:.1f}")
        print("| config | measured Δ ms/step [95 % CI] | timed by the probe (mean) | plan's estimate | κ | cadence | planned |")
        print("|---|---|---|---|---|---|---|")
        for label, row in res.items():
            if label == "plain_ms":
                continue
            ci = row["ci"]
            if "timed" not in row:
                print(f"| {label} | {row['measured']*1e3:+.3f} [{ci[0]*1e3:+.3f}, {ci[1]*1e3:+.3f}] | | | | | |")
                continue
            print(f"| {label} | {row['measured']*1e3:+.3f} [{ci[0]*1e3:+.3f}, {ci[1]*1e3:+.3f}] | {row['timed']*1e3:.3f} | "
                  f"{row['planned']*1e3:.3f} | {row['kappa']:.2f} | {row['cadence']} | "
                  f"{row['planned_frac']*100:.1f} % of {row['base_ms']:.2f} ms |")
        sys.stdout.flush()


class _Wrap:
    """``cls(model)`` adapter so Run can build a probe with the caller's keywords."""

    def __init__(self, cls, kw):
        self.cls, self.kw = cls, kw

    def __call__(self, model):
        return self.cls(model, **self.kw)


if __name__ == "__main__":
    main()
