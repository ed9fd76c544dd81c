"""``gradprobe report RUN_LOG...``: rebuild the HTML report (and its PNGs) from saved run logs, no model needed.

It is the very report ``gradprobe demo`` writes (:func:`gradprobe.report.build_report` on
``gradprobe.load_run`` of each log): the run logs hold the whole result, notes included.
"""
from __future__ import annotations

from pathlib import Path

from gradprobe.errors import ConfigError
from gradprobe.report import build_report
from gradprobe.run import load_run


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="rebuild the HTML report and its plots from run logs (*.sqlite)")
    p.add_argument("logs", nargs="+", metavar="RUN_LOG", help="run-log files, or directories holding exactly one")
    p.add_argument("--out", default="gradprobe-report", help="output directory (default: %(default)s)")
    p.add_argument("--title", default=None, help="the page title (default: the runs' own, else 'gradprobe report')")
    p.set_defaults(run=run)


def run(args) -> int:
    runs = {}
    for log in args.logs:
        r = load_run(log)
        label = Path(log).stem if Path(log).suffix else Path(log).name
        if label in runs:
            raise ConfigError(f"two run logs are both called {label!r}; pass files with distinct names")
        if len(r.trace) == 0:
            raise ConfigError(f"the run log {log} holds no recorded step")
        runs[label] = r
    path = build_report(runs, args.out, title=args.title)
    worst = 0
    for label, r in runs.items():
        s = r.summary()
        worst = max(worst, 0 if s.diagnosis is None or s.diagnosis.ok else 1)
        print(f"{label}: {s.recorded} steps, verdict {s.diagnosis.verdict if s.diagnosis else '—'}")
    print(f"report: {path}")
    return worst
